"""Access (issue 4, item 3): the edge over TLS, and secrets that never reach a log line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cloud.ingest import IngestService
from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig
from edge.daemon import EdgeDaemon

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


def _secrets(stack_ns, *users: str) -> list[str]:
    """The S3 secret keys and MQTT passwords (the access key id is an identifier, not a secret:
    it travels in every signed request's Authorization header)."""
    s3 = [stack_ns.stack.s3_credentials(role)[1] for role in ("admin", "ingest", "worker", "web")]
    return [*s3, *(stack_ns.stack.password(u) for u in users)]


def test_edge_connects_over_tls_and_its_frames_are_stored(stack_ns, shared_dir, tmp_path) -> None:
    device_id = stack_ns.device("tls")
    mqtt = stack_ns.mqtt_config(device_id, tls=True)
    assert mqtt.tls is not None and mqtt.port == stack_ns.stack.mqtt_tls_port
    ingest = IngestService(
        IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
        client_id=stack_ns.client_id("ingest"),
    )
    ingest.start()
    try:
        assert ingest.wait_connected(10)
        config = EdgeConfig(
            device_id=device_id, source=str(shared_dir / "videos" / "vtest.avi"), max_frames=3,
            mqtt=mqtt, sampling=SamplingConfig(interval_s=2.0, scene_change=False),
            spool=SpoolConfig(directory=tmp_path / "spool"), drain_timeout_s=60,
        )
        summary = EdgeDaemon(config, print_captions=False).run()
    finally:
        ingest.stop()
    assert summary.drained and summary.frames_acked == 3
    assert len(list(stack_ns.storage().list_keys(f"frames/{device_id}/"))) == 3


def test_secrets_never_appear_in_logs_in_process(stack_ns, shared_dir, tmp_path, caplog) -> None:
    """Edge and ingest at DEBUG (paho, boto3 and botocore included): no secret in any record."""
    device_id = stack_ns.device("logs")
    caplog.set_level(logging.DEBUG)
    ingest = IngestService(
        IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
        client_id=stack_ns.client_id("ingest"),
    )
    ingest.start()
    try:
        assert ingest.wait_connected(10)
        config = EdgeConfig(
            device_id=device_id, source=str(shared_dir / "videos" / "vtest.avi"), max_frames=2,
            mqtt=stack_ns.mqtt_config(device_id),
            sampling=SamplingConfig(interval_s=2.0, scene_change=False),
            spool=SpoolConfig(directory=tmp_path / "spool"), drain_timeout_s=60,
        )
        assert EdgeDaemon(config, print_captions=False).run().drained
    finally:
        ingest.stop()
    text = caplog.text + repr(config) + repr(ingest.config)
    assert "frames" in text and device_id in text  # the logs did record the run
    for secret in _secrets(stack_ns, "ingest", device_id):
        assert secret not in text


def test_ingest_process_takes_secrets_from_the_environment_and_never_logs_them(
    stack_ns, tmp_path
) -> None:
    """`framecap ingest -v` with a config file that holds no secret: they come from the env
    (the ingest's own S3 identity, as `framecap stack env --user ingest` prints it)."""
    stack_ns.ensure_bucket()
    stack_ns.stack.grant_bucket(stack_ns.bucket)
    key_id, secret = stack_ns.stack.s3_credentials("ingest")
    config = {
        "mqtt": {"host": stack_ns.stack.host, "port": stack_ns.stack.mqtt_port,
                 "username": "ingest", "topic_prefix": stack_ns.prefix,
                 "client_id": stack_ns.client_id("ingest")},
        "s3": {"endpoint_url": stack_ns.stack.s3_endpoint, "bucket": stack_ns.bucket},
    }
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAMECAP_", "AWS_"))}
    env.update(FRAMECAP_MQTT_PASSWORD=stack_ns.stack.password("ingest"),
               FRAMECAP_S3_ACCESS_KEY_ID=key_id, FRAMECAP_S3_SECRET_ACCESS_KEY=secret)
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "ingest", "--config", str(path), "-v"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    connected = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "connected to" in line:  # CONNACK checked the password; S3 was probed before
                connected.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        connected.wait(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-2000:]
    assert "connected to" in out, out[-2000:]
    for value in _secrets(stack_ns, "ingest"):
        assert value not in out
