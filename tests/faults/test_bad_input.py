"""Bad input that the unit tests of tests/cloud, tests/edge, tests/test_config.py and
tests/test_topics_messages.py do not already cover end to end (issue 4, item 2):

- device_ids and frame_ids that try to escape their topic level or S3 key (``../``, ``/``,
  ``+``, ``#``, NUL, very long) sent to the real ingest over the real broker: each refused with
  one log line naming device, frame and reason, a counter, nothing in S3, and the ingest goes
  on (a good frame after them is stored);
- a real video file that stops mid-file: the frames before the cut are delivered, the run
  says so (log line, ``source_ended_early``), nothing crashes;
- a video source that does not exist, through ``framecap edge``: exit status 1 and a message
  naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fault_harness import REPO_DIR, VTEST, wait_for
from mqtt_subacks import SubackWatch

from cloud.ingest import IngestService
from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig
from common.messages import FrameMetadata
from common.mqtt import MqttClient
from edge.daemon import EdgeDaemon

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 31, 12, 0, 0, tzinfo=timezone.utc)


def _jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    return data.tobytes()


def _publish_raw(stack_ns: Any, topic: str, payload: bytes, props: list[tuple[str, str]]) -> bool:
    """Publish with a plain paho client, as another MQTT client would; True once the broker
    dropped the connection (within 10 s)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    config = stack_ns.mqtt_config("admin")
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=stack_ns.client_id("nul"),
                      protocol=mqtt.MQTTv5)
    raw.username_pw_set(config.username, config.password.get_secret_value() if config.password else None)
    connected, dropped = threading.Event(), threading.Event()
    raw.on_connect = lambda client, userdata, flags, rc, properties: connected.set()
    raw.on_disconnect = lambda *args: dropped.set()
    raw.connect(config.host, config.port)
    raw.loop_start()
    try:
        assert connected.wait(10)
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = props
        raw.publish(topic, payload, qos=1, properties=properties)
        return dropped.wait(10)
    finally:
        raw.loop_stop()
        raw.disconnect()


def _props(payload: bytes, device_id: str, frame_id: str) -> list[tuple[str, str]]:
    meta = FrameMetadata(device_id="cam1", frame_id="f1", captured_at=NOW, seq=0, width=64,
                         height=48, sha256=hashlib.sha256(payload).hexdigest())
    return [(k, {"fc-device-id": device_id, "fc-frame-id": frame_id}.get(k, v))
            for k, v in meta.to_user_properties()]


ESCAPING_IDS = ["../x", "a/b", "a+b", "a#b", "x" * 300, "..", "-lead", "ca\u0301m"]
CONTROL_IDS = ["a\x00b", "cam1\n"]  # mosquitto refuses these itself: "Malformed UTF-8"


def test_escaping_ids_are_refused_at_the_ingest_with_device_frame_and_reason(
    stack_ns: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Escaping ids in the metadata (a device's own topic) and in the topic's device level
    (an account allowed to publish anywhere, as a misconfigured ACL would allow)."""
    caplog.set_level(logging.WARNING, logger="cloud.ingest")
    service = IngestService(IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
                            client_id=stack_ns.client_id("ingest"))
    with SubackWatch() as subacks:
        service.start()
        assert service.wait_connected(10)
        subacks.wait_for(service)  # the ingest's share subscription is in place
    admin = MqttClient(stack_ns.mqtt_config("admin"), stack_ns.client_id("admin"), clean_start=True)
    admin.start()
    topics = stack_ns.topics
    payload = _jpeg()
    try:
        assert admin.wait_connected(10)
        sent = 0
        for bad in ESCAPING_IDS:  # as frame_id, then as device_id, in the metadata
            for props in (_props(payload, "cam1", bad), _props(payload, bad, "f-bad")):
                admin.publish(topics.frames("cam1"), payload, qos=1, user_properties=props)
                sent += 1
        for level in ("..", "x" * 300, "a b", "-lead"):  # the topic's device_id level
            admin.publish(f"{stack_ns.prefix}/{level}/frames", payload, qos=1,
                          user_properties=_props(payload, "cam1", "f-topic"))
            sent += 1
        # NUL and other control characters in a UTF-8 string are malformed MQTT (5.0, 1.5.4):
        # mosquitto drops the publisher's connection and the frame never reaches the ingest.
        # Our own client refuses to send NUL; another client (plain paho) sends it. A throwaway
        # client each, stopped once dropped (paho would resend it at every reconnect).
        with pytest.raises(ValueError, match="control character"):
            admin.publish(topics.frames("cam1"), payload, qos=1,
                          user_properties=_props(payload, "cam1", "f\x00nul"))
        for bad in CONTROL_IDS:
            dropped = _publish_raw(stack_ns, topics.frames("cam1"), payload,
                                   _props(payload, "cam1", bad))
            assert dropped, "mosquitto kept a client that sent a malformed PUBLISH"
        admin.publish(topics.frames("cam1"), payload, qos=1,
                      user_properties=_props(payload, "cam1", "f-good"))
        assert wait_for(lambda: service.counters.get("stored", 0) == 1, 30)
        assert wait_for(lambda: service.counters.get("invalid", 0) >= sent, 10)
    finally:
        admin.stop()
        service.stop()
    counts = service.counters
    refused = counts.get("invalid", 0)
    assert refused == sent and counts.get("stored") == 1, counts
    reasons = {k for k in counts if k.startswith("invalid.")}
    assert reasons <= {"invalid.bad_metadata", "invalid.bad_topic", "invalid.device_mismatch"}
    assert counts.get("invalid.bad_topic", 0) == 4
    lines = [r.getMessage() for r in caplog.records if "refused frame" in r.getMessage()]
    assert len(lines) == refused
    for line in lines:  # device, frame and reason, escaped: no raw NUL or newline in a log line
        assert " of device " in line and (": bad_" in line or ": device_mismatch" in line), line
        assert "\x00" not in line and "\n" not in line and len(line) < 1200, line
    keys = list(stack_ns.storage().list_keys(""))
    assert [k for k in keys if k.startswith("frames/")] == ["frames/cam1/2026/01/31/f-good.jpg"]


def _truncated_copy(path: Path, frames: int) -> Path:
    """The first ``frames`` frames of vtest.avi as an MJPG .avi, then cut in the middle of its
    data (as a copy interrupted mid-file would leave it)."""
    cap = cv2.VideoCapture(str(VTEST))
    writer = None
    for _ in range(frames):
        ok, image = cap.read()
        assert ok
        if writer is None:
            h, w = image.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
        writer.write(image)
    cap.release()
    assert writer is not None
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_video_that_stops_mid_file_delivers_what_it_had(
    stack_ns: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip = _truncated_copy(tmp_path / "cut.avi", 40)
    device_id = stack_ns.device("cut")
    service = IngestService(IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest")),
                            client_id=stack_ns.client_id("ingest"))
    service.start()
    caplog.set_level(logging.INFO, logger="edge.capture")
    try:
        assert service.wait_connected(10)
        config = EdgeConfig(device_id=device_id, source=str(clip), mqtt=stack_ns.mqtt_config(device_id),
                            sampling=SamplingConfig(interval_s=0.5, scene_change=False),
                            spool=SpoolConfig(directory=tmp_path / "spool"), drain_timeout_s=60)
        summary = EdgeDaemon(config, print_captions=False).run()
    finally:
        service.stop()
    assert summary.error is None and summary.drained and summary.source_ended_early
    assert 0 < summary.frames_read < 40
    assert summary.frames_sampled == summary.frames_acked > 0
    stored = list(stack_ns.storage().list_keys(f"frames/{device_id}/"))
    assert len(stored) == summary.frames_sampled
    assert any("ended early" in r.getMessage() for r in caplog.records)


def test_a_missing_video_file_exits_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-video.avi"
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "edge", "--device-id", "cam1", "--source", str(missing),
         "--spool-dir", str(tmp_path / "spool"), "--mqtt-port", "1"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["frames_read"] == 0 and str(missing) in summary["error"]
    assert "does not exist" in proc.stderr
