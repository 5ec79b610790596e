"""FramePublisher's handling of acks and captions, without a broker (handlers called directly)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from common.config import MqttConfig
from common.messages import CaptionRecord, FrameAck, FrameMetadata
from edge.publisher import FramePublisher, format_caption
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
    assert capsys.readouterr().out == "12:34:56 f1 a man rides a bike\n"
    assert publisher.stats.captions_received == 1 and publisher.stats.captions_malformed == 2
    assert [CaptionRecord.model_validate_json(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()] == seen


def test_format_caption_of_an_error_record() -> None:
    record = _caption(caption="").model_copy(update={"error": "not an image"})
    assert format_caption(record) == "12:34:56 f1 [no caption: not an image]"
