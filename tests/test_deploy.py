"""deploy/ parses and agrees with the code: YAML loads, example configs validate, compose refers
to files that exist, the systemd unit runs ``framecap edge``, the Dockerfiles install the right
extra, and the broker ACL example keeps devices apart on the real mosquitto."""

from __future__ import annotations

import configparser
import re
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from common.config import EdgeConfig, IngestConfig, WebConfig, WorkerConfig, load_config
from common.stack import find_mosquitto, mosquitto_password_hash, mqtt_connack, pick_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")))
def test_yaml_files_load(path: str) -> None:
    assert yaml.safe_load((DEPLOY / path).read_text()) is not None


@pytest.mark.parametrize(("name", "cls"), [("edge", EdgeConfig), ("ingest", IngestConfig), ("worker", WorkerConfig),
                                                   ("web", WebConfig)])
def test_example_configs_validate(name: str, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FRAMECAP_MQTT_PASSWORD", "FRAMECAP_S3_ACCESS_KEY_ID", "FRAMECAP_S3_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    config = load_config(cls, DEPLOY / "config" / f"{name}.yaml")
    assert config.mqtt.username  # each example names its broker account
    if name != "edge":
        assert config.s3.endpoint_url == "http://seaweedfs:8333"


def test_compose_services_refer_to_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mosquitto", "seaweedfs", "ingest", "worker"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (DEPLOY / host).exists(), f"{name}: {host} is missing"
        mounted = {v.split(":")[1] for v in service.get("volumes", []) if v.startswith(".")}
        command = service.get("command", [])
        if isinstance(command, list) and "--config" in command:
            assert command[command.index("--config") + 1] in mounted, name
    assert services["ingest"]["command"][0] == "ingest" and services["worker"]["command"][0] == "worker"
    env_example = (DEPLOY / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text())):
        assert f"{var}=" in env_example, f"{var} is not in .env.example"


def test_systemd_unit_runs_framecap_edge() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "framecap-edge.service")
    exec_start = unit["Service"]["ExecStart"]
    assert exec_start.split()[0].startswith("/") and " edge " in f" {exec_start} "
    assert exec_start.split()[0].endswith("/framecap")
    assert "--config" in exec_start
    assert unit["Service"]["Restart"] in {"always", "on-failure"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_dockerfiles_start_from_a_base_and_install_the_right_extra() -> None:
    edge = _instructions(DEPLOY / "Dockerfile.edge")
    cloud = _instructions(DEPLOY / "Dockerfile.cloud")
    for steps in (edge, cloud):
        assert next(w for w, _ in steps if w != "ARG") == "FROM"
    edge_runs = " ".join(a for w, a in edge if w == "RUN")
    cloud_runs = " ".join(a for w, a in cloud if w == "RUN")
    assert "'.[edge]'" in edge_runs and "torch" not in edge_runs and "[cloud" not in edge_runs
    assert "l4t" in " ".join(a for w, a in edge if w in {"ARG", "FROM"})
    assert "'.[cloud,web]'" in cloud_runs and "torch==" in cloud_runs
    for steps in (edge, cloud):
        for word, args in steps:
            if word == "COPY":
                for source in args.split()[:-1]:
                    assert (REPO / source).exists(), source


def test_broker_config_refuses_anonymous_and_raises_queues() -> None:
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["allow_anonymous"] == "false" and settings["persistence"] == "true"
    assert int(settings["max_queued_messages"]) >= 100000 and settings["max_queued_bytes"] == "0"
    assert subprocess.run(["sh", "-n", str(DEPLOY / "mosquitto" / "entrypoint.sh")]).returncode == 0


@pytest.mark.integration
def test_acl_example_keeps_devices_apart_on_real_mosquitto(tmp_path: Path) -> None:
    """mosquitto with deploy/'s config and ACL (paths moved into tmp_path)."""
    try:
        binary = find_mosquitto()
    except Exception as err:  # noqa: BLE001 - StackError: no broker here
        pytest.skip(str(err))
    port = pick_port()
    passwords = {"cam1": "pw-cam1", "cam2": "pw-cam2", "ingest": "pw-ingest"}
    (tmp_path / "passwd").write_text("".join(f"{u}:{mosquitto_password_hash(p)}\n" for u, p in passwords.items()))
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("/mosquitto/data/passwd", str(tmp_path / "passwd"))
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    conf = conf.replace("/mosquitto/config/acl", str(DEPLOY / "mosquitto" / "acl.example"))
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1").replace("log_dest stdout", "log_dest stderr")
    (tmp_path / "mosquitto.conf").write_text("user root\n" + conf)
    broker = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.PIPE)
    got: list[tuple[str, bytes]] = []
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                assert mqtt_connack("127.0.0.1", port, "ingest", "pw-ingest") == 0
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)
        assert mqtt_connack("127.0.0.1", port, None, None) != 0
        subscribed = threading.Event()
        ingest = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ingest.username_pw_set("ingest", "pw-ingest")
        ingest.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
        ingest.on_subscribe = lambda *a: subscribed.set()
        ingest.connect("127.0.0.1", port)
        ingest.loop_start()
        ingest.subscribe("$share/ingest/framecap/+/frames", qos=1)
        assert subscribed.wait(5)
        cam1 = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        cam1.username_pw_set("cam1", "pw-cam1")
        cam1.connect("127.0.0.1", port)
        cam1.loop_start()
        cam1.publish("framecap/cam2/frames", b"forged", qos=1).wait_for_publish(5)
        cam1.publish("framecap/cam1/frames", b"genuine", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert got == [("framecap/cam1/frames", b"genuine")]
        for client in (cam1, ingest):
            client.disconnect()
            client.loop_stop()
    finally:
        broker.terminate()
        broker.wait(10)
