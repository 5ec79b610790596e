"""Faults of the servers while the edge streams a real video: the broker killed (SIGKILL) and
restarted, the broker down for 30 s, S3 (SeaweedFS) down for 30 s. Afterwards every sampled
frame is in S3 exactly once with the same bytes and captioned exactly once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from conftest import Pipeline
from fault_harness import (
    FRAMES_PER_S,
    EdgeRunner,
    FaultRow,
    check_exactly_once,
    measure_recovery,
    outage_s,
    wait_for,
)

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _stream_through(pipeline: Pipeline, row: FaultRow, *, before_s: float, after_s: float,
                    fault_s: float, begin: Callable[[], None], end: Callable[[], None]) -> None:
    """Stream ``before_s + fault_s + after_s`` seconds of video; call ``begin`` once
    ``before_s`` seconds of frames were sampled and ``end`` ``fault_s`` seconds later; then
    measure the recovery and check that every frame arrived exactly once."""
    pipeline.start_cloud()
    total = int((before_s + fault_s + after_s) * FRAMES_PER_S)
    edge = EdgeRunner(pipeline.edge_config(total)).start()
    try:
        assert wait_for(lambda: len(edge.record) >= before_s * FRAMES_PER_S, before_s + 30)
        before = len(edge.record)
        begin()
        time.sleep(fault_s)
        at_fault = len(edge.record)
        end()
        ended = time.monotonic()
        sampled_by_end = set(edge.record.snapshot())
        row.recovery_s = measure_recovery(pipeline.view, sampled_by_end, ended, 120)
        summary = edge.join(total / FRAMES_PER_S + 120)
    finally:
        edge.daemon.request_stop()
    assert summary.error is None and summary.drained, summary
    assert summary.frames_dropped == 0
    publisher = edge.daemon._publisher
    resent = publisher.stats.resent if publisher is not None else 0
    row.notes = (f"{at_fault - before} frames sampled during the fault, "
                 f"{resent} resent by the edge" + (f"; {row.notes}" if row.notes else ""))
    check_exactly_once(row, view=pipeline.view, sampled=edge.record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge.captions,
                       captioner=pipeline.captioner)
    assert row.sampled == total


def test_broker_sigkill_mid_stream(pipeline: Pipeline,
                                   fault_row: Callable[[str], FaultRow]) -> None:
    """mosquitto SIGKILLed while frames flow (it loses what it had not autosaved: frames it
    PUBACKed, acks it had queued) and restarted 2 s later."""
    stack = pipeline.stack
    row = fault_row("broker SIGKILL mid-stream, restarted")

    def kill_with_frames_queued() -> None:
        # The ingest goes away (cleanly: its persistent session stays) so the broker holds
        # frames it PUBACKed to the edge and queued for the ingest; then the broker dies.
        assert pipeline.ingest is not None
        pipeline.ingest.stop()
        time.sleep(3.0)
        row.notes = "the ingest left 3 s before the kill, so the broker held frames for it"
        stack.kill_mosquitto()

    def restart() -> None:
        stack.start_mosquitto()
        pipeline.start_ingest()

    try:
        _stream_through(pipeline, row, before_s=6, fault_s=2, after_s=8,
                        begin=kill_with_frames_queued, end=restart)
    finally:
        stack.start_mosquitto()


def test_broker_down(pipeline: Pipeline, fault_row: Callable[[str], FaultRow]) -> None:
    """mosquitto stopped (SIGTERM) for 30 s while the edge keeps sampling, then started."""
    stack = pipeline.stack
    row = fault_row(f"broker down {outage_s():g} s")
    try:
        _stream_through(pipeline, row, before_s=5, fault_s=outage_s(), after_s=5,
                        begin=stack.stop_mosquitto, end=stack.start_mosquitto)
    finally:
        stack.start_mosquitto()


def test_s3_down(pipeline: Pipeline, fault_row: Callable[[str], FaultRow]) -> None:
    """SeaweedFS killed for 30 s while frames keep coming, then started (its data kept)."""
    stack = pipeline.stack
    row = fault_row(f"S3 (SeaweedFS) down {outage_s():g} s")
    try:
        _stream_through(pipeline, row, before_s=5, fault_s=outage_s(), after_s=5,
                        begin=stack.kill_seaweedfs, end=stack.start_seaweedfs)
    finally:
        stack.start_seaweedfs()
