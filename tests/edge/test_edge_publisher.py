"""FramePublisher's handling of acks and captions, without a broker (handlers called directly)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from common.config import MqttConfig
from common.messages import CaptionRecord, FrameAck, FrameMetadata
from edge.publisher import (
    FramePublisher,
    caption_line,
    format_caption,
    parse_caption_line,
    percentile,
)
from edge.spool import FrameSpool

T = datetime(2026, 1, 31, 12, 34, 56, tzinfo=timezone.utc)


@pytest.fixture
def publisher(tmp_path: Path) -> FramePublisher:
    spool = FrameSpool(tmp_path / "spool", "cam-1")
    jpeg = b"\xff\xd8fake\xff\xd9"
    spool.put(FrameMetadata(device_id="cam-1", frame_id="f1", captured_at=T, seq=spool.allocate_seq(),
                            width=2, height=2, sha256=hashlib.sha256(jpeg).hexdigest()), jpeg)
    return FramePublisher("cam-1", MqttConfig(port=1), spool, captions_jsonl=tmp_path / "c.jsonl")


def _caption(frame_id: str = "f1", caption: str = "a man rides a bike") -> CaptionRecord:
    return CaptionRecord(frame_id=frame_id, device_id="cam-1", captured_at=T, caption=caption,
                         score=-2.0, model="m", frame_key="k.jpg", caption_key="k.json")


def test_acks_remove_frames_and_bad_acks_are_counted(publisher: FramePublisher) -> None:
    ack = FrameAck(device_id="cam-1", frame_id="f1", key="frames/cam-1/2026/01/31/f1.jpg")
    publisher._handle_ack(ack.to_json())
    assert len(publisher.spool) == 0 and publisher.stats.acked == 1
    publisher._handle_ack(ack.to_json())  # duplicate
    publisher._handle_ack(b"not json")
    publisher._handle_ack(json.dumps({"schema_version": 9, "frame_id": "f1"}).encode())
    publisher._handle_ack(FrameAck(device_id="cam-2", frame_id="f1", key="x").to_json())
    assert publisher.stats.acks_unknown == 1 and publisher.stats.acks_malformed == 3


def test_captions_are_printed_written_and_bad_ones_counted(publisher: FramePublisher, capsys,
                                                           tmp_path: Path) -> None:
    seen: list[CaptionRecord] = []
    publisher.on_caption = seen.append
    publisher._handle_caption(_caption().to_json())
    publisher._handle_caption(b"{")
    publisher._handle_caption(json.dumps({"schema_version": 1, "frame_id": "../x"}).encode())
    assert capsys.readouterr().out == "f1\ta man rides a bike\t-2.000\n"  # frame_id, caption, score
    assert publisher.stats.captions_received == 1 and publisher.stats.captions_malformed == 2
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert [parse_caption_line(x)[0] for x in lines] == seen


def test_each_caption_line_records_when_it_arrived_and_the_summary_has_its_latency(
    publisher: FramePublisher, tmp_path: Path
) -> None:
    """Issue 9: received_at (UTC) beside each caption; p50/p95 of capture -> caption."""
    from datetime import timedelta

    for i, delay_ms in enumerate([100, 120, 140, 900]):
        arrived = T + timedelta(milliseconds=delay_ms)
        publisher._handle_caption(_caption(f"f{i + 2}").to_json(), received_at=arrived)
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["received_at"] == "2026-01-31T12:34:56.100000Z"
    record, received_at = parse_caption_line(lines[3])
    assert record.frame_id == "f5" and received_at == T + timedelta(milliseconds=900)
    assert received_at is not None and received_at.tzinfo is not None
    p50, p95 = publisher.caption_latency_ms()
    assert p50 == pytest.approx(140.0, abs=20.1) and p95 == pytest.approx(900.0)
    # a caption without a time (from before) still reads
    old = _caption("f9").model_dump_json()
    assert parse_caption_line(old) == (_caption("f9"), None)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(101)], 0.95) == 95.0


def test_format_caption_of_an_error_record() -> None:
    record = _caption(caption="").model_copy(update={"error": "not an image", "score": None})
    assert format_caption(record) == "f1\t(no caption: not an image)\t-"


class _FakeClient:
    """Stands in for MqttClient: records publishes, always connected."""

    is_connected = True

    def __init__(self) -> None:
        self.sent: list[int] = []

    def publish(self, topic: str, payload: bytes | str, **_: object) -> object:
        self.sent.append(len(self.sent) + 1)
        return type("Info", (), {"rc": 0, "mid": self.sent[-1]})()

    def ack(self, mid: int, qos: int) -> None:
        pass


def _streaming(publisher: FramePublisher, frames: int = 1) -> _FakeClient:
    """Spool ``frames - 1`` more frames, publish them all and let the broker PUBACK each."""
    for i in range(2, frames + 1):
        jpeg = f"jpeg{i}".encode()
        publisher.spool.put(FrameMetadata(device_id="cam-1", frame_id=f"f{i}", captured_at=T,
                                          seq=publisher.spool.allocate_seq(), width=2, height=2,
                                          sha256=hashlib.sha256(jpeg).hexdigest()), jpeg)
    client = _FakeClient()
    publisher.client = client  # type: ignore[assignment]
    publisher._fill_window()
    for mid in list(client.sent):
        publisher._dispatch("puback", mid)
    return client


def _age(publisher: FramePublisher, frame_id: str, seconds: float) -> None:
    item = publisher._in_flight[frame_id]
    item.sent_at -= seconds
    if item.overtaken_at is not None:
        item.overtaken_at -= seconds


def test_frames_are_resent_after_resend_after_s_when_nothing_happened(
        publisher: FramePublisher) -> None:
    client = _streaming(publisher)
    _age(publisher, "f1", 29.0)
    publisher._resend_overdue()
    assert len(client.sent) == 1
    _age(publisher, "f1", 1.0)
    publisher._resend_overdue()
    assert len(client.sent) == 2 and publisher.stats.resent == 1


def test_after_a_reconnect_unacked_frames_are_resent_within_a_short_grace(
        publisher: FramePublisher) -> None:
    """A restarted broker PUBACKs the frames the edge sends before the ingest subscribed again,
    and drops them: they are sent again after reconnect_grace_s (doubling), not 30 s later."""
    client = _streaming(publisher)
    publisher._dispatch("connected", False)
    assert len(client.sent) == 2  # the PUBACKed frame is resent at once
    publisher._dispatch("puback", 2)  # ... and PUBACKed (and dropped: no ingest yet)
    grace = publisher.reconnect_grace_s
    assert grace < publisher.resend_after_s
    _age(publisher, "f1", grace)
    publisher._resend_overdue()
    assert len(client.sent) == 3
    _age(publisher, "f1", grace)  # the next wait is twice as long
    publisher._resend_overdue()
    assert len(client.sent) == 3
    _age(publisher, "f1", grace)
    publisher._resend_overdue()
    assert len(client.sent) == 4
    # The ingest is back: an ack of a frame sent since the reconnect ends the fast resends.
    publisher._handle_ack(FrameAck(device_id="cam-1", frame_id="f1", key="k").to_json())
    assert publisher._reconnected_at_order is None and len(publisher.spool) == 0


def test_a_frame_overtaken_by_a_later_ack_is_resent_soon(publisher: FramePublisher) -> None:
    """f1 went to an ingest replica that died (its clean session, and f1, are gone); f2 and f3
    were acked by another: f1 is resent overtaken_grace_s later, not resend_after_s."""
    client = _streaming(publisher, frames=3)
    assert len(client.sent) == 3
    publisher._handle_ack(FrameAck(device_id="cam-1", frame_id="f2", key="k").to_json())
    publisher._resend_overdue()
    assert len(client.sent) == 3  # not at once: a slower replica may still ack it
    _age(publisher, "f1", publisher.overtaken_grace_s)
    publisher._resend_overdue()
    assert len(client.sent) == 4 and publisher._in_flight["f1"].overtaken_at is None
    assert "f3" in publisher._in_flight and publisher._in_flight["f3"].attempts == 1


def test_the_captions_jsonl_is_bounded_by_rotation(tmp_path: Path) -> None:
    from edge.publisher import append_line

    path = tmp_path / "captions.jsonl"
    lines = [caption_line(_caption(f"f{i}"), T) for i in range(40)]
    limit = 3 * len(lines[0]) + 10  # three lines a file
    for line in lines:
        append_line(path, line, max_bytes=limit)
    old = Path(f"{path}.1")
    assert path.stat().st_size <= limit and old.stat().st_size <= limit
    kept = old.read_text().splitlines() + path.read_text().splitlines()
    assert kept == lines[-len(kept):] and len(kept) >= 4  # whole lines, the newest, in order
    assert all(parse_caption_line(line)[0].frame_id.startswith("f") for line in kept)


def test_notify_wakes_the_publisher_thread_only_when_nothing_else_will(
        publisher: FramePublisher) -> None:
    """Issue 9: a spooled frame wakes the publisher's network wait, unless a wake-up is already
    pending or a PUBACK is on its way (it wakes the thread, which then publishes the frame)."""
    wakeups: list[int] = []
    publisher.client.wakeup = lambda: wakeups.append(1)  # type: ignore[method-assign]
    publisher.notify()
    publisher.notify()
    assert len(wakeups) == 1  # the second finds one pending
    publisher._wake_pending = False  # what the thread does after each network pass
    publisher._mids[7] = "f1"  # a publish awaiting its PUBACK
    publisher.notify()
    assert len(wakeups) == 1
    publisher._mids.clear()
    publisher.notify()
    assert len(wakeups) == 2
