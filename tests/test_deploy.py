"""deploy/ parses and agrees with the code: YAML loads, example configs validate, compose refers
to files that exist, the systemd unit runs ``framecap edge``, the Dockerfiles install the right
extra, and the broker ACL example keeps devices apart on the real mosquitto."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import EdgeConfig, IngestConfig, WebConfig, WorkerConfig, load_config

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
