"""The edge's link to the broker fails: cut for 30 s through a TCP proxy while the edge keeps
sampling; and a full spool, the only loss allowed: a live source, the link down, a spool of 5
frames, so the oldest frames are dropped, counted and logged, and the newest still arrive."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import cv2
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
from proxy import TcpProxy

from common.config import EdgeConfig, SpoolConfig
from edge.capture import Capture, FrameSource, SourceKind

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def proxy(pipeline: Pipeline) -> TcpProxy:
    """A :class:`TcpProxy` in front of the session's mosquitto."""
    p = TcpProxy(pipeline.stack.host, pipeline.stack.mqtt_port).start()
    yield p
    p.close()


def test_edge_cut_off_from_the_broker(pipeline: Pipeline, proxy: TcpProxy,
                                      fault_row: Callable[[str], FaultRow]) -> None:
    """The link silently drops everything for 30 s (the edge is not told), then its dead
    connections are reset and it reconnects; frames sampled meanwhile wait in the spool."""
    row = fault_row(f"edge cut off from the broker {outage_s():g} s")
    pipeline.start_cloud()
    before_s, after_s = 5.0, 5.0
    total = int((before_s + outage_s() + after_s) * FRAMES_PER_S)
    config = pipeline.edge_config(total, mqtt_fields={"port": proxy.port})
    edge = EdgeRunner(config).start()
    try:
        assert wait_for(lambda: len(edge.record) >= before_s * FRAMES_PER_S, before_s + 30)
        proxy.cut()
        time.sleep(outage_s())
        pending = edge.daemon.summary().frames_pending
        proxy.restore()
        ended = time.monotonic()
        row.recovery_s = measure_recovery(pipeline.view, set(edge.record.snapshot()), ended, 120)
        summary = edge.join(total / FRAMES_PER_S + 120)
    finally:
        edge.daemon.request_stop()
    assert summary.error is None and summary.drained and summary.frames_dropped == 0
    row.notes = (f"{pending} frames waiting in the spool when the link came back; "
                 f"{proxy.dropped_bytes // 1024} KiB thrown away by the dead link")
    check_exactly_once(row, view=pipeline.view, sampled=edge.record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge.captions,
                       captioner=pipeline.captioner)


class _RealTimeCapture:
    """``cv2.VideoCapture`` of a file, read no faster than its frame rate (a camera)."""

    def __init__(self, path: str) -> None:
        self.cap = cv2.VideoCapture(path)
        self.period = 1.0 / (self.cap.get(cv2.CAP_PROP_FPS) or 10.0)
        self.next_at = time.monotonic()

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return bool(self.cap.isOpened())

    def read(self):  # type: ignore[no-untyped-def]
        delay = self.next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.next_at = max(self.next_at + self.period, time.monotonic() - 1.0)
        return self.cap.read()

    def get(self, prop: int) -> float:
        return float(self.cap.get(prop))

    def release(self) -> None:
        self.cap.release()


def camera_like_source(config: EdgeConfig, stop_event: threading.Event) -> FrameSource:
    """vtest.avi as a live camera: real time, wall-clock timestamps, never pauses for a full
    spool (the edge drops its oldest frames instead), reopened (looped) at its end."""

    def opener(source: str, kind: SourceKind) -> Capture:
        return _RealTimeCapture(source)

    source = FrameSource(config.source, stop_event=stop_event, opener=opener,
                         reopen_min_s=0.1, reopen_max_s=0.1, label=config.device_id)
    source.kind = SourceKind.STREAM  # live: the capture loop never waits on the spool
    return source


def test_full_spool_drops_the_oldest_frames_only(
    pipeline: Pipeline, proxy: TcpProxy, fault_row: Callable[[str], FaultRow],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Link down from the start, a camera-like source, a spool of 5 frames: of 16 sampled,
    the 11 oldest are dropped (counted, one log line each); the 5 newest are delivered once."""
    row = fault_row("spool full (live source, link down, spool of 5)")
    pipeline.start_cloud()
    proxy.cut()
    total, keep = 16, 5
    config = pipeline.edge_config(
        total, playback_speed=0.0, spool=SpoolConfig(directory=pipeline.tmp / "spool", max_frames=keep, resend_after_s=10.0),
        mqtt_fields={"port": proxy.port},
    )
    caplog.set_level(logging.WARNING, logger="edge.spool")
    edge = EdgeRunner(config, source_factory=camera_like_source).start()
    try:
        assert wait_for(lambda: len(edge.record) >= total, total / FRAMES_PER_S + 30)
        assert wait_for(lambda: edge.daemon.summary().frames_dropped == total - keep, 5)
        proxy.restore()
        ended = time.monotonic()
        sampled = edge.record.snapshot()
        newest = set(list(sampled)[-keep:])
        row.recovery_s = measure_recovery(pipeline.view, newest, ended, 60)
        summary = edge.join(60)
    finally:
        edge.daemon.request_stop()
    dropped_ids = set(list(sampled)[:-keep])
    assert summary.frames_dropped == total - keep and summary.frames_sampled == total
    assert summary.drained and summary.frames_pending == 0
    drop_lines = [r.getMessage() for r in caplog.records if "dropped: spool full" in r.getMessage()]
    assert len(drop_lines) == total - keep
    assert {line.split(" frame ", 1)[1].split(" ", 1)[0] for line in drop_lines} == dropped_ids
    row.dropped = summary.frames_dropped
    row.notes = (f"{row.dropped} oldest frames dropped, each counted and logged; "
                 f"the {keep} newest delivered")
    check_exactly_once(row, view=pipeline.view, sampled=sampled, allowed_missing=dropped_ids,
                       message_log=pipeline.message_log, edge_captions=edge.captions,
                       captioner=pipeline.captioner)
    assert row.stored == row.captioned == keep
