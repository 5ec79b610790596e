"""The edge daemon against a real mosquitto and a tiny fake ingest written with paho.

The fake ingest subscribes to every device's frames, checks the metadata user properties and
the JPEG, publishes a caption and then a FrameAck, as the real ingest and worker would.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from edge_helpers import Broker, moving_frames, write_clip

from common.config import EdgeConfig
from common.messages import CaptionRecord, FrameAck, FrameMetadata
from common.topics import Topics, frame_key
from edge.daemon import EdgeDaemon
from edge.spool import FrameSpool

pytestmark = pytest.mark.integration
TOPICS = Topics()


class FakeIngest:
    """Receives frames, validates them, and (when ``acking``) captions and acks each."""

    def __init__(self, port: int) -> None:
        self.acking = True
        self.received: list[FrameMetadata] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-ingest",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(TOPICS.all_devices("frames"), qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(5), "fake ingest did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            props = getattr(msg.properties, "UserProperty", None)
            meta = FrameMetadata.from_user_properties(props)
            meta.check_payload(bytes(msg.payload))
            assert TOPICS.parse(msg.topic) == (meta.device_id, "frames")
            img = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.shape[:2] == (meta.height, meta.width)
        except Exception as err:  # noqa: BLE001 - recorded for the test to assert on
            self.errors.append(f"{msg.topic}: {err!r}")
            return
        with self.lock:
            self.received.append(meta)
        if not self.acking:
            return
        key = frame_key(meta.device_id, meta.frame_id, meta.captured_at)
        caption = CaptionRecord(
            frame_id=meta.frame_id, device_id=meta.device_id, captured_at=meta.captured_at,
            caption=f"a street seen in frame {meta.seq}", score=-1.5, model="fake",
            frame_key=key, caption_key=key.replace("frames/", "captions/").replace(".jpg", ".json"),
        )
        client.publish(TOPICS.captions(meta.device_id), caption.to_json(), qos=1)
        ack = FrameAck(device_id=meta.device_id, frame_id=meta.frame_id, key=key)
        client.publish(TOPICS.acks(meta.device_id), ack.to_json(), qos=1)

    def ids(self) -> list[str]:
        with self.lock:
            return [m.frame_id for m in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ingest(edge_broker: Broker) -> Any:
    fake = FakeIngest(edge_broker.port)
    yield fake
    fake.close()


def _config(tmp_path: Path, broker: Broker, source: Path, **extra: Any) -> EdgeConfig:
    return EdgeConfig.model_validate({
        "device_id": "cam-1",
        "source": str(source),
        "drain_timeout_s": 20,
        "captions_jsonl": str(tmp_path / "captions.jsonl"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
        "sampling": {"interval_s": 0.1, "scene_change": False},
        "spool": {"directory": str(tmp_path / "spool")},
        **extra,
    })


def _retained_status(port: int) -> str:
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *a: cl.subscribe(TOPICS.status("cam-1"), qos=1)

    def on_message(cl: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        got.append(bytes(m.payload))
        done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(5)
    c.disconnect()
    c.loop_stop()
    return got[0].decode() if got else ""


def test_daemon_drains_a_30_frame_clip_and_exits(tmp_path: Path, edge_broker: Broker,
                                                 ingest: FakeIngest) -> None:
    clip = write_clip(tmp_path / "clip30.avi", moving_frames(30))
    captions: list[CaptionRecord] = []
    t0 = time.monotonic()
    summary = EdgeDaemon(_config(tmp_path, edge_broker, clip), on_caption=captions.append,
                         print_captions=False).run()
    assert time.monotonic() - t0 < 20
    assert ingest.errors == []
    assert summary.drained and summary.exit_code == 0 and summary.error is None
    assert (summary.frames_read, summary.frames_sampled, summary.frames_acked) == (30, 30, 30)
    assert summary.frames_pending == 0 and summary.frames_dropped == 0
    assert len(FrameSpool(tmp_path / "spool", "cam-1")) == 0
    ids = ingest.ids()
    assert len(set(ids)) == 30
    assert sorted({m.seq for m in ingest.received}) == list(range(30))
    assert summary.captions_received == len(captions) >= 29  # the last may race the drain
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(lines) == summary.captions_received
    assert json.loads(lines[0])["caption"].startswith("a street seen in frame")
    assert "received_at" in json.loads(lines[0])
    p50, p95 = summary.caption_latency_p50_ms, summary.caption_latency_p95_ms
    assert p50 is not None and p95 is not None and 0 <= p50 <= p95
    assert json.loads(summary.to_json())["caption_latency_p95_ms"] == round(p95, 1)
    assert _retained_status(edge_broker.port) == "offline"


def test_restarted_edge_delivers_unacked_frames_and_never_a_corrupt_one(
    tmp_path: Path, edge_broker: Broker, ingest: FakeIngest
) -> None:
    ingest.acking = False
    clip = write_clip(tmp_path / "clip10.avi", moving_frames(10))
    first = EdgeDaemon(_config(tmp_path, edge_broker, clip, drain_timeout_s=1.0),
                       print_captions=False).run()
    assert not first.drained and first.exit_code == 1
    assert first.frames_sampled == 10 and first.frames_pending == 10 and first.frames_acked == 0
    spool = FrameSpool(tmp_path / "spool", "cam-1")
    spooled = [e.frame_id for e in spool]
    assert len(spooled) == 10
    oldest = next(iter(spool))  # the oldest entry rots on disk while the edge is down
    assert oldest.offset is not None  # in a segment file, with the others
    data = bytearray(oldest.path.read_bytes())
    data[oldest.offset + oldest.size - 100] ^= 0xFF
    oldest.path.write_bytes(bytes(data))
    del spool

    ingest.acking = True
    seen_before = len(ingest.received)
    short = write_clip(tmp_path / "clip3.avi", moving_frames(3))
    second = EdgeDaemon(_config(tmp_path, edge_broker, short), print_captions=False).run()
    assert second.drained and second.exit_code == 0
    assert second.frames_sampled == 3 and second.frames_acked == 12
    resent = ingest.ids()[seen_before:]
    assert set(spooled[1:]) <= set(resent)
    assert spooled[0] not in resent  # quarantined, never sent corrupt
    new_seqs = sorted(m.seq for m in ingest.received[seen_before:] if m.frame_id not in spooled)
    assert new_seqs == [10, 11, 12]  # seq survives the restart
    assert ingest.errors == []
    assert datetime.now(timezone.utc) > ingest.received[-1].captured_at


def _wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_broker_killed_mid_stream_loses_no_frame(tmp_path: Path, edge_broker: Broker,
                                                 ingest: FakeIngest) -> None:
    ingest.acking = False  # the broker holds PUBACKed frames nobody has acked yet
    clip = write_clip(tmp_path / "clip12.avi", moving_frames(12))
    config = _config(tmp_path, edge_broker, clip, drain_timeout_s=30,
                     spool={"directory": str(tmp_path / "spool"), "resend_after_s": 1.5})
    daemon = EdgeDaemon(config, print_captions=False)
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        assert _wait_for(lambda: len(set(ingest.ids())) == 12, 10)
        edge_broker.kill()
        ingest.acking = True
        edge_broker.start()  # same port, empty: every session and message is gone
        runner.join(30)
    finally:
        daemon.request_stop()
        runner.join(10)
    summary = result[0]
    assert summary.drained and summary.frames_acked == 12 and summary.frames_pending == 0
    assert ingest.errors == []


def test_video_file_waits_for_a_full_spool_instead_of_dropping(
    tmp_path: Path, edge_broker: Broker, ingest: FakeIngest
) -> None:
    clip = write_clip(tmp_path / "clip20.avi", moving_frames(20))
    config = _config(tmp_path, edge_broker, clip,
                     spool={"directory": str(tmp_path / "spool"), "max_frames": 3})
    summary = EdgeDaemon(config, print_captions=False).run()
    assert summary.drained and summary.frames_acked == 20 and summary.frames_dropped == 0


def _jsonl_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["frame_id"] for line in path.read_text().splitlines()]


def test_a_caption_is_acked_only_once_written_so_a_restart_gets_it_again(
    tmp_path: Path, edge_broker: Broker, ingest: FakeIngest, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8 item 8: the JSONL cannot be written (its directory is missing); the captions must
    not be acknowledged, so the broker delivers them again to the next run, which writes them."""
    caplog.set_level(logging.INFO, logger="edge.publisher")
    jsonl = tmp_path / "later" / "captions.jsonl"
    clip = write_clip(tmp_path / "clip3.avi", moving_frames(3))
    first = EdgeDaemon(_config(tmp_path, edge_broker, clip, captions_jsonl=str(jsonl)),
                       print_captions=False).run()
    assert first.drained and first.frames_acked == 3
    assert _wait_for(lambda: sum("cannot append caption" in r.getMessage()
                                 for r in caplog.records) >= 1, 10)
    assert not jsonl.exists()

    jsonl.parent.mkdir()  # the disk is back
    one = write_clip(tmp_path / "clip1.avi", moving_frames(1))
    daemon = EdgeDaemon(_config(tmp_path, edge_broker, one, captions_jsonl=str(jsonl)),
                        print_captions=False)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert _wait_for(lambda: len(_jsonl_ids(jsonl)) >= 4, 20), _jsonl_ids(jsonl)
    finally:
        daemon.request_stop()
        runner.join(20)
    ids = _jsonl_ids(jsonl)
    assert len(ids) == len(set(ids)) == 4  # the 3 redelivered and the new one, each once
    assert set(ingest.ids()) == set(ids)


def test_a_failed_caption_write_is_retried_in_process(
    tmp_path: Path, edge_broker: Broker, ingest: FakeIngest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.publisher")
    jsonl = tmp_path / "later" / "captions.jsonl"
    clip = write_clip(tmp_path / "clip3.avi", moving_frames(3))
    daemon = EdgeDaemon(_config(tmp_path, edge_broker, clip, captions_jsonl=str(jsonl),
                                wait_for_captions_s=30), print_captions=False)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert _wait_for(lambda: any("cannot append caption" in r.getMessage()
                                     for r in caplog.records), 10)
        jsonl.parent.mkdir()
        assert _wait_for(lambda: len(_jsonl_ids(jsonl)) >= 3, 20), _jsonl_ids(jsonl)
    finally:
        daemon.request_stop()
        runner.join(20)
    ids = _jsonl_ids(jsonl)
    assert sorted(ids) == sorted(set(ingest.ids())) and len(ids) == 3
