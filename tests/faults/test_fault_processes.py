"""Processes killed with SIGKILL while the edge streams a real video, then restarted: the edge
(``framecap edge``; its spool on disk survives, a half-written spool entry is dropped, never
sent), the ingest (``framecap ingest``) mid-batch and the worker (``framecap worker``, a tiny
checkpoint) mid-batch. Afterwards every sampled frame is in S3 exactly once with the same
bytes and captioned exactly once."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import cv2
import pytest
from conftest import Pipeline
from fault_harness import (
    FRAMES_PER_S,
    VTEST,
    EdgeCaptions,
    EdgeRunner,
    FaultRow,
    SampledRecord,
    ServiceProcess,
    check_exactly_once,
    measure_recovery,
    wait_for,
)
from mqtt_subacks import SubackWatch

from common.messages import FrameMetadata
from edge.spool import encode_entry, read_entries

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLED_LINE = r": frame \S+ sampled \("


# ----------------------------------------------------------------------------- the edge


def _plant_half_written_entries(spool: Path, device_id: str) -> str:
    """Put what a crash mid-write could leave into the spool: a ``.tmp`` file cut short and a
    ``.frame`` file cut short (as a disk that lost its tail would). Returns the latter's
    frame_id, which must never reach S3."""
    ok, jpeg = cv2.imencode(".jpg", cv2.VideoCapture(str(VTEST)).read()[1])
    assert ok
    data = jpeg.tobytes()
    import hashlib

    seq = 999_999
    frame_id = f"20200101T000000000Z-{seq:06d}"
    meta = FrameMetadata(device_id=device_id, frame_id=frame_id,
                         captured_at=datetime(2020, 1, 1, tzinfo=timezone.utc), seq=seq,
                         width=768, height=576, sha256=hashlib.sha256(data).hexdigest())
    entry = encode_entry(meta, data)
    entries = spool / "entries"  # one file per frame, as earlier versions wrote
    entries.mkdir(exist_ok=True)
    (entries / f"{seq:012d}_{frame_id}.frame").write_bytes(entry[: len(entry) // 2])
    (entries / f".{seq + 1:012d}_{frame_id[:-6]}{seq + 1:06d}.frame.tmp").write_bytes(entry[:300])
    # and a segment whose only entry was cut off mid-write
    (spool / "segments" / f"{seq + 2:012d}.seg").write_bytes(entry[: len(entry) // 3])
    return frame_id


def _read_spool(spool: Path, record: SampledRecord) -> int:
    """Add every valid entry left in the spool to ``record`` (a frame spooled just before the
    kill may have missed its log line); returns how many entries there were."""
    n = 0
    for meta, _ in read_entries(spool):
        record.add(meta)
        n += 1
    return n


def test_edge_sigkill_mid_stream(pipeline: Pipeline,
                                 fault_row: Callable[[str], FaultRow]) -> None:
    """``framecap edge`` SIGKILLed after 12 frames, a half-written entry planted in its spool,
    then restarted for 10 more: the unacked frames go out, the planted one never does."""
    row = fault_row("edge SIGKILL mid-stream, restarted (+ planted half-written spool entry)")
    pipeline.start_cloud()
    captions_jsonl = pipeline.tmp / "captions.jsonl"
    spool = pipeline.tmp / "spool"
    client_id = f"edge-{pipeline.device_id}"
    edge = pipeline.edge_process(pipeline.edge_config(
        60, captions_jsonl=captions_jsonl, mqtt_fields={"client_id": client_id})).start()
    record = SampledRecord()
    edge.wait_for(SAMPLED_LINE, 60, n=12)
    edge.kill()
    record.read_log(edge.text())
    left = _read_spool(spool, record)
    planted = _plant_half_written_entries(spool, pipeline.device_id)

    again = pipeline.edge_process(pipeline.edge_config(
        10, captions_jsonl=captions_jsonl, mqtt_fields={"client_id": client_id})).start()
    restarted = time.monotonic()
    first_run = set(record.snapshot())
    row.recovery_s = measure_recovery(pipeline.view, first_run, restarted, 90)
    assert again.wait(120) == 0, again.current_text()[-3000:]
    record.read_log(again.text())
    log = again.current_text()
    assert "corrupt spool entry" in log and planted in log
    assert "deleting half-written spool file" in log
    assert "deleting half-written spool entry at the end of" in log
    assert any(planted in p.name for p in (spool / "quarantine").iterdir())
    assert planted not in pipeline.view.frame_keys()
    edge_captions = EdgeCaptions()
    edge_captions.read_jsonl(captions_jsonl)
    row.notes = (f"killed after {len(first_run)} frames, {left} unacked in its spool; "
                 "planted entry quarantined, never sent")
    check_exactly_once(row, view=pipeline.view, sampled=record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge_captions,
                       captioner=pipeline.captioner)
    assert row.sampled >= 22


# ----------------------------------------------------------------------------- ingest and worker


def _kill_mid_batch(service: ServiceProcess, edge: EdgeRunner, *, backlog: int,
                    batch_line: str) -> tuple[int, int]:
    """Pause ``service`` (SIGSTOP) while ``backlog`` frames pile up, let it go (SIGCONT) and
    SIGKILL it as soon as it logs one more ``batch_line``: it dies with frames in its hands.
    Returns (lines before the pause-release, lines at the kill)."""
    service.signal(signal.SIGSTOP)
    try:
        target = len(edge.record) + backlog
        assert wait_for(lambda: len(edge.record) >= target, backlog / FRAMES_PER_S + 30)
    finally:
        before = service.count(batch_line)
        service.signal(signal.SIGCONT)
    service.wait_for(batch_line, 60, n=before + 1)
    service.kill()
    return before, service.count(batch_line)


def test_ingest_sigkill_mid_batch(pipeline: Pipeline,
                                  fault_row: Callable[[str], FaultRow]) -> None:
    """``framecap ingest`` paused while 10 frames pile up, then SIGKILLed right after it stored
    the first of them; restarted 2 s later (same client_id: its session and unacked frames
    wait at the broker)."""
    row = fault_row("ingest SIGKILL mid-batch, restarted")
    ingest = pipeline.ingest_process().start()
    ingest.wait_for(r"mqtt \S+: connected to", 60)
    # The ingest sends its SUBSCRIBE right after that line; the worker's SUBACK below comes after
    # mosquitto (one thread, packets in arrival order) handled it. (Its SUBACK is logged at
    # DEBUG only, which the subprocess does not print.)
    with SubackWatch() as subacks:
        subacks.wait_for(pipeline.start_worker())
    edge = EdgeRunner(pipeline.edge_config(40)).start()
    try:
        assert wait_for(lambda: len(edge.record) >= 6, 30)
        before, at_kill = _kill_mid_batch(ingest, edge, backlog=10, batch_line=r"stored frame ")
        time.sleep(2.0)
        ingest.start()
        restarted = time.monotonic()
        row.recovery_s = measure_recovery(pipeline.view, set(edge.record.snapshot()), restarted, 90)
        summary = edge.join(120)
    finally:
        edge.daemon.request_stop()
    assert summary.drained and summary.error is None
    row.notes = f"killed after storing {at_kill - before} of a backlog of 10+ frames"
    check_exactly_once(row, view=pipeline.view, sampled=edge.record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge.captions,
                       captioner=pipeline.captioner)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny random captioning checkpoint (cloud.captioning.testing) for ``framecap worker``."""
    try:
        from cloud.captioning.testing import make_tiny_checkpoint
    except ImportError as err:
        pytest.skip(f"cloud.captioning (torch) unavailable: {err}")
    yield make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def test_worker_sigkill_mid_batch(pipeline: Pipeline, tiny_model: Path,
                                  fault_row: Callable[[str], FaultRow]) -> None:
    """``framecap worker`` (a real model, tiny) paused while 16 frames pile up, SIGKILLed as
    soon as it logs the first caption record of its next batch (between the S3 write and the
    publish, or just after), and restarted 1 s later: its listing finds what has no caption
    and its outbox republishes what was written but not acknowledged."""
    row = fault_row("worker SIGKILL mid-batch, restarted")
    pipeline.start_ingest()
    worker = pipeline.worker_process(tiny_model).start()
    worker.wait_for(r"worker \S+: started", 180)
    worker.wait_for(r"mqtt \S+: connected to", 30)
    edge = EdgeRunner(pipeline.edge_config(40)).start()
    try:
        assert wait_for(lambda: len(edge.record) >= 4, 30)
        _kill_mid_batch(worker, edge, backlog=16, batch_line=r"worker: frame \S+ of device \S+: '")
        captions_at_kill = len(pipeline.view.caption_keys())
        stored_at_kill = len(pipeline.view.frame_keys())
        time.sleep(1.0)
        worker.start()
        restarted = time.monotonic()
        row.recovery_s = measure_recovery(pipeline.view, set(edge.record.snapshot()), restarted, 180)
        summary = edge.join(120)
    finally:
        edge.daemon.request_stop()
    assert summary.drained and summary.error is None
    republished = worker.count("publishing it again")
    row.notes = (f"killed with {stored_at_kill - captions_at_kill} of {stored_at_kill} stored "
                 "frames uncaptioned; recovery includes loading the model"
                 + (f"; {republished} caption(s) written but not acknowledged republished from "
                    "the outbox" if republished else ""))
    check_exactly_once(row, view=pipeline.view, sampled=edge.record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge.captions)
