"""deploy/ parses and agrees with the code and with itself (issue 8 items 12 and 14).

YAML loads and the example configs validate; compose refers to files that exist or that a
documented step makes; the example edge config reaches a port compose publishes, with TLS where
the broker listens with TLS, and connects there on the real mosquitto; the broker limits packets
with ``max_packet_size``; no service account gets a device's rights (acl.example on the real
mosquitto, the dynamic security roles entrypoint.sh writes); the systemd unit and the edge image
run a ``framecap`` that the install script makes (run here into a temporary prefix), with an
OpenCV that has GStreamer and no PyPI OpenCV.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import EdgeConfig, IngestConfig, WebConfig, WorkerConfig, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent
SCRIPTS = DEPLOY / "scripts"
PREFIX = "framecap"  # topic prefix of every example


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


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "framecap-edge.service")
    return unit


def _broker_conf(text: str | None = None) -> tuple[dict[str, str], dict[int, dict[str, str]]]:
    """mosquitto.conf as (settings before the first listener, {port: that listener's settings})."""
    text = text if text is not None else (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    general: dict[str, str] = {}
    listeners: dict[int, dict[str, str]] = {}
    current = general
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            current = listeners.setdefault(int(value.split()[0]), {})
        else:
            current[key] = value.strip()
    return general, listeners


def _published(service: dict[str, Any]) -> dict[int, str]:
    """{container port: host interface} of a compose service's ``ports``."""
    out = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        out[int(parts[-1].split("/")[0])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return out


def _install_prefix(script: str) -> str:
    match = re.search(r"^prefix=(\S+)$", script, re.MULTILINE)
    assert match, "install-edge.sh sets no default prefix"
    return match.group(1)


def _filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")))
def test_yaml_files_load(path: str) -> None:
    assert yaml.safe_load((DEPLOY / path).read_text()) is not None


@pytest.mark.parametrize(("name", "cls"), [("edge", EdgeConfig), ("ingest", IngestConfig), ("worker", WorkerConfig),
                                                   ("web", WebConfig)])
def test_example_configs_validate(name: str, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FRAMECAP_MQTT_PASSWORD", "FRAMECAP_S3_ACCESS_KEY_ID", "FRAMECAP_S3_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    config: Any = load_config(cls, DEPLOY / "config" / f"{name}.yaml")
    assert config.mqtt.username  # each example names its broker account
    assert config.mqtt.topic_prefix == PREFIX
    if name != "edge":
        assert config.s3.endpoint_url == "http://seaweedfs:8333"
        assert (config.mqtt.host, config.mqtt.port) == ("mosquitto", 1883)  # compose's network


def test_compose_services_refer_to_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mosquitto", "seaweedfs", "ingest", "worker"} <= set(services)
    made_by_steps = {"./mosquitto/certs": SCRIPTS / "make-certs.sh"}  # not in git: keys
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host in made_by_steps:
                assert "make-certs.sh" in (DEPLOY / "compose.yaml").read_text()  # the documented step
                assert "mosquitto/certs" in made_by_steps[host].read_text()
            elif host.startswith("."):
                assert (DEPLOY / host).exists(), f"{name}: {host} is missing"
        mounted = {v.split(":")[1] for v in service.get("volumes", []) if v.startswith(".")}
        command = service.get("command", [])
        if isinstance(command, list) and "--config" in command:
            assert command[command.index("--config") + 1] in mounted, name
    assert services["ingest"]["command"][0] == "ingest" and services["worker"]["command"][0] == "worker"
    env_example = (DEPLOY / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text())):
        assert f"{var}=" in env_example, f"{var} is not in .env.example"


def test_the_example_edge_config_reaches_a_listener_compose_publishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 14: the edge example's port is published beyond the host, the broker listens there,
    with TLS exactly when the edge uses TLS, with the files make-certs.sh writes and mounts."""
    monkeypatch.delenv("FRAMECAP_MQTT_PASSWORD", raising=False)
    edge = load_config(EdgeConfig, DEPLOY / "config" / "edge.yaml").mqtt
    mosquitto = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["mosquitto"]
    published = _published(mosquitto)
    assert edge.port in published, f"compose does not publish the edge's port {edge.port}"
    assert published[edge.port] not in {"127.0.0.1", "localhost", "::1"}, "devices are on other hosts"
    _, listeners = _broker_conf()
    assert edge.port in listeners, f"mosquitto.conf has no listener {edge.port}"
    listener = listeners[edge.port]
    tls_keys = {"cafile", "certfile", "keyfile"}
    assert (edge.tls is not None) == (tls_keys <= set(listener)), "TLS on one side only"
    # plain MQTT carries passwords in the clear: never published beyond the host
    for port, where in published.items():
        if not tls_keys <= set(listeners[port]):
            assert where == "127.0.0.1", f"plain port {port} published on {where}"
    assert edge.tls is not None and edge.tls.ca_certs is not None
    certs_mount = next(v.split(":")[1] for v in mosquitto["volumes"] if v.startswith("./mosquitto/certs:"))
    make_certs = (SCRIPTS / "make-certs.sh").read_text()
    for key in sorted(tls_keys):
        path = Path(listener[key])
        assert path.parent == Path(certs_mount) and path.name in make_certs, key
    assert edge.tls.ca_certs.name == Path(listener["cafile"]).name  # the devices' copy of ca.crt


def test_broker_config_refuses_anonymous_and_raises_queues() -> None:
    general, _ = _broker_conf()
    assert general["allow_anonymous"] == "false" and general["persistence"] == "true"
    assert int(general["max_queued_messages"]) >= 100000 and general["max_queued_bytes"] == "0"
    assert subprocess.run(["sh", "-n", str(DEPLOY / "mosquitto" / "entrypoint.sh")]).returncode == 0


def test_broker_limits_packets_with_max_packet_size() -> None:
    """Item 14: ``message_size_limit`` is deprecated in mosquitto 2.0; ``max_packet_size`` bounds
    the whole packet, so it must leave room for the largest payload the ingest accepts."""
    general, listeners = _broker_conf()
    every = {key for settings in (general, *listeners.values()) for key in settings}
    assert "message_size_limit" not in every
    ingest = load_config(IngestConfig, DEPLOY / "config" / "ingest.yaml")
    edge = load_config(EdgeConfig, DEPLOY / "config" / "edge.yaml")
    limit = int(general["max_packet_size"])
    assert edge.encoding.max_bytes < ingest.max_payload_bytes <= limit - 1024  # topic + properties


# -- service accounts hold no device rights -------------------------------------------------
def test_acl_example_has_no_pattern_a_service_account_would_match() -> None:
    """A ``pattern`` line applies to every account, services included: none may remain."""
    lines = [line.split() for line in (DEPLOY / "mosquitto" / "acl.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert not [line for line in lines if line[0] == "pattern"]
    user = None
    for line in lines:
        if line[0] == "user":
            user = line[1]
        elif line[0] == "topic" and user not in {"ingest", "worker", "web"}:
            assert line[-1].startswith(f"{PREFIX}/{user}/"), f"{user} may use {line[-1]}"


def test_entrypoint_dynsec_roles_give_services_no_device_rights(tmp_path: Path) -> None:
    """The roles deploy/mosquitto/entrypoint.sh writes: no service may publish any device's
    frames or status; each device only its own topics; a device may not be named like a service."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mosquitto").write_text("#!/bin/sh\nexit 0\n")
    (fake / "mosquitto").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FRAMECAP_MOSQUITTO_DATA": str(tmp_path),
           "FRAMECAP_MQTT_INGEST_PASSWORD": "a", "FRAMECAP_MQTT_WORKER_PASSWORD": "b",
           "FRAMECAP_MQTT_WEB_PASSWORD": "c", "FRAMECAP_MQTT_DEVICES": "cam1:d cam2:e"}
    entrypoint = str(DEPLOY / "mosquitto" / "entrypoint.sh")
    run = subprocess.run(["sh", entrypoint], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    dynsec = json.loads((tmp_path / "dynamic-security.json").read_text())
    roles = {r["rolename"]: r["acls"] for r in dynsec["roles"]}
    assert {c["username"]: [r["rolename"] for r in c["roles"]] for c in dynsec["clients"]} == {
        "ingest": ["ingest"], "worker": ["worker"], "web": ["web"], "cam1": ["device:cam1"], "cam2": ["device:cam2"]}
    device_topics = [f"{PREFIX}/{d}/{k}" for d in ("cam1", "ingest", "worker", "web") for k in ("frames", "status")]
    for service in ("ingest", "worker", "web"):
        for acl in roles[service]:
            if acl["acltype"] == "publishClientSend" and acl["allow"]:
                assert not [t for t in device_topics if _filter_matches(acl["topic"], t)], (service, acl)
    for device in ("cam1", "cam2"):
        grants = {(a["acltype"], a["topic"]) for a in roles[f"device:{device}"] if a["allow"]}
        own = {("publishClientSend", f"{PREFIX}/{device}/{k}") for k in ("frames", "status")}
        own |= {(t, f"{PREFIX}/{device}/{k}") for k in ("acks", "captions", "alerts")
                for t in ("subscribePattern", "publishClientReceive")}
        assert grants == own
    assert not any(dynsec["defaultACLAccess"][k] for k in ("publishClientSend", "publishClientReceive", "subscribe"))
    for name in ("ingest", "worker", "web", "admin"):
        refused = subprocess.run(["sh", entrypoint], env={**env, "FRAMECAP_MQTT_DEVICES": f"{name}:x"},
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and "named like a service" in refused.stderr, name


class _Client:
    """A bare MQTT v5 client recording the topics (and payload sizes) it receives."""

    def __init__(self, port: int, user: str, password: str, *, tls_ca: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, int]] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"{user}-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, len(m.payload)))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{user}: no CONNACK"

    def subscribe(self, topic_filter: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self._subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _start_broker(cmd: list[str], env: dict[str, str] | None, port: int,
                  wait_until: Callable[..., bool]) -> subprocess.Popen[bytes]:
    from common.stack import mqtt_connack

    broker = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)

    def up() -> bool:
        try:
            mqtt_connack("127.0.0.1", port, "nobody", "x")
            return True
        except OSError:
            assert broker.poll() is None, broker.stderr.read() if broker.stderr else b""
            return False

    if not wait_until(up, 10):
        broker.terminate()
        pytest.fail("the broker did not start")
    return broker


def _need_mosquitto() -> str:
    from common.stack import find_dynsec_plugin, find_mosquitto
    from common.stack.process import StackError

    try:
        find_mosquitto()
        plugin = find_dynsec_plugin()
    except StackError as err:
        pytest.skip(str(err))
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    return plugin


@pytest.fixture
def deploy_broker(tmp_path: Path, wait_until: Callable[..., bool]) -> Iterator[dict[str, Any]]:
    """deploy/mosquitto as compose runs it (entrypoint.sh, mosquitto.conf with both listeners,
    certificates from make-certs.sh), on free loopback ports, paths moved into tmp_path."""
    from common.stack import pick_port

    plugin = _need_mosquitto()
    certs = tmp_path / "certs"
    made = subprocess.run(["sh", str(SCRIPTS / "make-certs.sh"), "localhost", "127.0.0.1"],
                          env={**os.environ, "FRAMECAP_CERT_DIR": str(certs)}, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert {"ca.crt", "server.crt", "server.key", ".gitignore"} <= {p.name for p in certs.iterdir()}
    plain, tls = pick_port(), pick_port()
    while tls == plain:
        tls = pick_port()
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", plugin)
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/").replace("/mosquitto/config/certs/", f"{certs}/")
    conf = conf.replace("listener 1883", f"listener {plain} 127.0.0.1")
    conf = conf.replace("listener 8883", f"listener {tls} 127.0.0.1").replace("log_dest stdout", "log_dest stderr")
    (tmp_path / "mosquitto.conf").write_text("user root\n" + conf)
    env = {"PATH": os.environ["PATH"], "FRAMECAP_MOSQUITTO_DATA": str(tmp_path),
           "FRAMECAP_MOSQUITTO_CONF": str(tmp_path / "mosquitto.conf"),
           "FRAMECAP_MQTT_INGEST_PASSWORD": "pw-ingest", "FRAMECAP_MQTT_WORKER_PASSWORD": "pw-worker",
           "FRAMECAP_MQTT_WEB_PASSWORD": "pw-web", "FRAMECAP_MQTT_DEVICES": "cam1:pw-cam1 cam2:pw-cam2"}
    broker = _start_broker(["sh", str(DEPLOY / "mosquitto" / "entrypoint.sh")], env, plain, wait_until)
    try:
        yield {"plain": plain, "tls": tls, "ca": certs / "ca.crt"}
    finally:
        broker.terminate()
        broker.wait(10)


@pytest.mark.integration
def test_the_example_edge_config_connects_to_the_compose_broker_over_tls(
        deploy_broker: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/config/edge.yaml as it is (TLS, its user name), only the address and the CA file
    moved, through the edge's own MQTT client: CONNACK on the broker's TLS listener."""
    from common.mqtt import MqttClient

    monkeypatch.setenv("FRAMECAP_MQTT_PASSWORD", "pw-cam1")
    config = load_config(EdgeConfig, DEPLOY / "config" / "edge.yaml", {
        "mqtt.host": "localhost", "mqtt.port": deploy_broker["tls"], "mqtt.tls.ca_certs": str(deploy_broker["ca"])})
    assert config.mqtt.tls is not None and not config.mqtt.tls.insecure
    client = MqttClient(config.mqtt, client_id=f"cam1-{uuid.uuid4().hex[:6]}", clean_start=True)
    client.start()
    try:
        assert client.wait_connected(10), "the edge example did not connect over TLS"
    finally:
        client.stop()


@pytest.mark.integration
def test_the_compose_broker_bounds_packets(deploy_broker: dict[str, Any], wait_until: Callable[..., bool]) -> None:
    """max_packet_size on the real broker: a 200 KB frame passes, a 1.1 MB one is refused (its
    sender disconnected) and never delivered."""
    port = deploy_broker["plain"]
    ingest = _Client(port, "ingest", "pw-ingest")
    cam1 = _Client(deploy_broker["tls"], "cam1", "pw-cam1", tls_ca=deploy_broker["ca"], host="localhost")
    cam2 = _Client(port, "cam2", "pw-cam2")
    try:
        ingest.subscribe(f"$share/ingest/{PREFIX}/+/frames")
        cam1.publish(f"{PREFIX}/cam1/frames", b"x" * 200_000)
        assert wait_until(lambda: len(ingest.messages) == 1, 10)
        cam1.client.publish(f"{PREFIX}/cam1/frames", b"y" * 1_100_000, qos=1)
        assert wait_until(cam1.disconnected.is_set, 10), "an oversize packet did not end the connection"
        cam2.publish(f"{PREFIX}/cam2/frames", b"z")
        assert wait_until(lambda: len(ingest.messages) == 2, 10)
        assert ingest.messages == [(f"{PREFIX}/cam1/frames", 200_000), (f"{PREFIX}/cam2/frames", 1)]
    finally:
        for c in (ingest, cam1, cam2):
            c.close()


@pytest.mark.integration
def test_acl_example_gives_service_accounts_no_device_rights(tmp_path: Path, wait_until: Callable[..., bool]) -> None:
    """acl.example on the real mosquitto: a service account cannot publish frames or status as a
    device named like it (the old `pattern` lines allowed it), a device only its own."""
    from common.stack import pick_port

    _need_mosquitto()
    users = ("ingest", "worker", "web", "cam1", "cam2")
    passwd = tmp_path / "passwd"
    for i, user in enumerate(users):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, f"pw-{user}"],
                       check=True, capture_output=True)
    port = pick_port()
    (tmp_path / "m.conf").write_text(
        f"user root\nper_listener_settings false\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {DEPLOY / 'mosquitto' / 'acl.example'}\nlog_dest stderr\nlistener {port} 127.0.0.1\n")
    from common.stack import find_mosquitto

    broker = _start_broker([find_mosquitto(), "-c", str(tmp_path / "m.conf")], None, port, wait_until)
    clients = {u: _Client(port, u, f"pw-{u}") for u in users}
    try:
        ingest, web = clients["ingest"], clients["web"]
        ingest.subscribe(f"{PREFIX}/+/frames")
        ingest.subscribe(f"{PREFIX}/+/status")
        web.subscribe(f"{PREFIX}/+/status")
        web.subscribe(f"{PREFIX}/+/captions")
        for service in ("ingest", "worker", "web"):
            for kind in ("frames", "status"):
                clients[service].publish(f"{PREFIX}/{service}/{kind}", b"forged by a service")
        clients["cam1"].publish(f"{PREFIX}/cam2/frames", b"forged by cam1")
        clients["worker"].publish(f"{PREFIX}/cam1/captions", b"a caption")  # the worker's right
        clients["cam1"].publish(f"{PREFIX}/cam1/frames", b"a frame")  # last: the others came before
        assert wait_until(lambda: len(ingest.messages) >= 1 and len(web.messages) >= 1, 10)
        assert [t for t, _ in ingest.messages] == [f"{PREFIX}/cam1/frames"]
        assert [t for t, _ in web.messages] == [f"{PREFIX}/cam1/captions"]
    finally:
        for c in clients.values():
            c.close()
        broker.terminate()
        broker.wait(10)


# -- the edge install: systemd unit and image run what the install script makes -------------
def test_systemd_unit_runs_what_the_install_script_makes() -> None:
    """Item 14: every path the unit needs is made by deploy/scripts/install-edge.sh, the steps
    its header documents; its ExecStart is the console script pyproject declares, in that venv."""
    unit = _unit()
    service = unit["Service"]
    script = (SCRIPTS / "install-edge.sh").read_text()
    header = (DEPLOY / "systemd" / "framecap-edge.service").read_text().split("[Unit]")[0]
    assert "deploy/scripts/install-edge.sh" in header and "pip install 'framecap" not in header
    argv = service["ExecStart"].split()
    assert argv[0] == f"{_install_prefix(script)}/venv/bin/framecap"
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert re.search(r"^framecap = ", scripts, re.MULTILINE)  # the console script pip makes
    assert argv[1] == "edge" and argv[argv.index("--config") + 1] == "/etc/framecap/edge.yaml"
    for made in ("/etc/framecap/edge.yaml", service["EnvironmentFile"], "/etc/systemd/system/framecap-edge.service",
                 service["WorkingDirectory"]):
        assert made in script, f"install-edge.sh does not make {made}"
    assert re.search(r"useradd [^\n]*--groups video[^\n]*framecap", script.replace("\\\n", " "))
    assert service["User"] == "framecap" and "video" in service["SupplementaryGroups"]
    assert "PrivateTmp" not in service  # /tmp/argus_socket
    assert service["Restart"] in {"always", "on-failure"} and "2" in service["RestartPreventExitStatus"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "--system-site-packages" in script and "edge-constraints.txt" in script
    assert (SCRIPTS / "edge-constraints.txt").is_file()
    assert subprocess.run(["sh", "-n", str(SCRIPTS / "install-edge.sh")]).returncode == 0


def test_dockerfiles_start_from_a_base_and_install_the_right_things() -> None:
    edge = _instructions(DEPLOY / "Dockerfile.edge")
    cloud = _instructions(DEPLOY / "Dockerfile.cloud")
    for steps in (edge, cloud):
        assert next(w for w, _ in steps if w != "ARG") == "FROM"
    edge_runs = " ".join(a for w, a in edge if w == "RUN")
    cloud_runs = " ".join(a for w, a in cloud if w == "RUN")
    # item 12: no PyPI OpenCV on the Jetson; the install script (its checks included) does the venv
    assert "torch" not in edge_runs and "[cloud" not in edge_runs and "[edge]" not in edge_runs
    assert "opencv-python" not in edge_runs and "pip install" not in edge_runs
    install = re.search(r"install-edge\.sh --no-service --prefix (\S+)", edge_runs)
    assert install, "Dockerfile.edge does not run install-edge.sh --no-service"
    entrypoint = json.loads(next(a for w, a in edge if w == "ENTRYPOINT"))
    assert entrypoint[:2] == [f"{install.group(1)}/venv/bin/framecap", "edge"]
    assert "l4t" in " ".join(a for w, a in edge if w in {"ARG", "FROM"})
    assert next(a for w, a in reversed(edge) if w == "USER") == "framecap"
    assert re.search(r"useradd .*--groups video", edge_runs)
    text = (DEPLOY / "Dockerfile.edge").read_text()
    for needed in ("--runtime nvidia", "-v /tmp/argus_socket:/tmp/argus_socket", "--group-add"):
        assert needed in text, needed  # how the non-root user reaches nvargus
    assert "'.[cloud,web]'" in cloud_runs and "torch==" in cloud_runs
    for steps in (edge, cloud):
        for word, args in steps:
            if word == "COPY":
                for source in args.split()[:-1]:
                    assert (REPO / source).exists(), source


def _copy_like_the_edge_image(dest: Path) -> None:
    """Copy what Dockerfile.edge COPYs into ``dest`` (its WORKDIR), and nothing else."""
    for word, args in _instructions(DEPLOY / "Dockerfile.edge"):
        if word != "COPY":
            continue
        *sources, target = args.split()
        for source in sources:
            to = dest / target / Path(source).name if target.endswith("/") else dest / target
            to.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, to, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(REPO / source, to)


SYSTEM_PYTHON = "/usr/bin/python3"
PIPELINE = "videotestsrc num-buffers=5 ! video/x-raw,width=160,height=120 ! videoconvert ! video/x-raw,format=BGR ! appsink"


@pytest.mark.slow
def test_the_install_script_makes_the_venv_the_unit_and_image_run(tmp_path: Path) -> None:
    """install-edge.sh --venv-only, on the files the image copies, offline: it makes
    PREFIX/venv/bin/framecap with no PyPI OpenCV in the venv; with a system OpenCV that has
    GStreamer it succeeds and that venv opens a GStreamer pipeline through edge.capture,
    without one it exits 2 with the fix."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, setuptools, venv"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot make a venv and build framecap offline")
    src = tmp_path / "src"
    _copy_like_the_edge_image(src)
    prefix = tmp_path / "opt"
    env = {**os.environ, "FRAMECAP_PIP_ARGS": "--no-index --no-deps --no-build-isolation"}
    env.pop("VIRTUAL_ENV", None)
    # Offline there is no build isolation, and the system setuptools may predate PEP 639 license
    # strings (pyproject.toml asks for >= 77, which a real install fetches): lend it this
    # environment's setuptools, and nothing else, for the build.
    import setuptools

    shim = tmp_path / "setuptools-shim"
    site = Path(setuptools.__file__).resolve().parents[1]
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if (site / name).is_dir():
            shutil.copytree(site / name, shim / name)
    env["PYTHONPATH"] = str(shim)
    run = subprocess.run(["sh", str(src / "deploy" / "scripts" / "install-edge.sh"), "--venv-only",
                          "--prefix", str(prefix)], env=env, capture_output=True, text=True, timeout=300)
    framecap = prefix / "venv" / "bin" / "framecap"
    assert framecap.is_file(), run.stdout + run.stderr
    assert framecap.read_text().startswith(f"#!{prefix}/venv/bin/python")  # that venv's
    python = str(prefix / "venv" / "bin" / "python")
    dists = subprocess.run([python, "-c", "import importlib.metadata as m; print([d.metadata['Name'] for d in m.distributions()])"],
                           capture_output=True, text=True, check=True).stdout
    assert "opencv-python" not in dists.lower() and "framecap" in dists
    system_gst = subprocess.run([SYSTEM_PYTHON, "-c", "import cv2, sys; sys.exit(0 if 'YES' in "
                                 "[l for l in cv2.getBuildInformation().splitlines() if 'GStreamer:' in l][0] else 1)"],
                                capture_output=True)
    if system_gst.returncode != 0:  # no system OpenCV with GStreamer here: refused, with the fix
        assert run.returncode == 2, run.stdout + run.stderr
        assert "--system-site-packages" in run.stderr and "python3-opencv" in run.stderr
        return
    assert run.returncode == 0, run.stdout + run.stderr
    assert "GStreamer YES" in run.stdout
    opened = subprocess.run([python, "-c", (
        "import itertools; from edge.capture import FrameSource\n"
        f"s = FrameSource({PIPELINE!r}, reopen_max_s=1)\n"
        "frames = list(itertools.islice(s.frames(), 3)); s.stop()\n"
        "print([f.image.shape for f in frames])")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert opened.stdout.strip() == "[(120, 160, 3), (120, 160, 3), (120, 160, 3)]", opened.stderr
