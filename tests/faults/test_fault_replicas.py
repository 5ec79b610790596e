"""Replicas that come and go while the edge streams a real video (issue 8, items 3 and 5).

- An ingest replica replaced by one with a new client id (a container's new hostname), beside
  a second replica: nothing is stranded in the broker (share-group consumers use clean
  sessions) and no frame waits for the edge's resend.
- An ingest replica SIGKILLed and replaced under a new client id: the frames it held are lost
  with its session; the edge resends them once later frames were acked, seconds later, not
  ``resend_after_s`` later.
- The broker restarted while the ingest is away, the edge reconnecting first: mosquitto PUBACKs
  the edge's frames and drops them (no share-group member yet); they arrive seconds after the
  ingest is back, not ``resend_after_s`` later.

Afterwards every sampled frame is in S3 exactly once with the same bytes and captioned once.
The edge's ``resend_after_s`` is 30 s here, so a frame that waited for it shows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Pipeline
from fault_harness import (
    FRAMES_PER_S,
    EdgeRunner,
    FaultRow,
    ServiceProcess,
    check_exactly_once,
    measure_recovery,
    mqtt_section,
    wait_for,
    write_yaml,
)

import edge.daemon as edge_daemon
from cloud.ingest import IngestService
from common.config import IngestConfig, SpoolConfig
from edge.publisher import FramePublisher

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESEND_AFTER_S = 30.0


@pytest.fixture
def replicas(pipeline: Pipeline) -> Iterator[list[IngestService]]:
    """In-process ingest replicas made by the test (stopped at the end)."""
    made: list[IngestService] = []
    yield made
    for service in made:
        service.stop(timeout=5)


def _replica(pipeline: Pipeline, made: list[IngestService], name: str) -> IngestService:
    config = IngestConfig(mqtt=pipeline.ns.mqtt_config("ingest"), s3=pipeline.ns.s3_config())
    service = IngestService(config, client_id=pipeline.ns.client_id(name))
    made.append(service)
    service.start()
    assert service.wait_connected(10)
    return service


def _edge(pipeline: Pipeline, frames: int) -> EdgeRunner:
    spool = SpoolConfig(directory=pipeline.tmp / "spool", resend_after_s=RESEND_AFTER_S)
    return EdgeRunner(pipeline.edge_config(frames, spool=spool)).start()


def _finish(pipeline: Pipeline, edge: EdgeRunner, row: FaultRow, total: int) -> None:
    summary = edge.join(total / FRAMES_PER_S + 120)
    assert summary.error is None and summary.drained, summary
    check_exactly_once(row, view=pipeline.view, sampled=edge.record.snapshot(),
                       message_log=pipeline.message_log, edge_captions=edge.captions,
                       captioner=pipeline.captioner)
    assert row.sampled == total


def _subscribed(pipeline: Pipeline, *members: Callable[[], bool]) -> None:
    """Publish a payload that is no frame on the device's frames topic until every member of
    the ingest group says it received one (it refuses it): all of them are subscribed."""
    topic = pipeline.ns.topics.frames(pipeline.device_id)

    def all_in() -> bool:
        if all(member() for member in members):
            return True
        pipeline.message_log.client.publish(topic, b"not a frame", qos=1)
        return False

    assert wait_for(all_in, 30, 0.2), "the ingest replicas did not all subscribe"


def _received(service: IngestService) -> Callable[[], bool]:
    return lambda: service.counters.get("invalid", 0) > 0


def _refused(proc: ServiceProcess) -> Callable[[], bool]:
    return lambda: proc.count("refused frame") > 0


def test_ingest_replica_replaced_under_a_new_client_id(
        pipeline: Pipeline, replicas: list[IngestService], fault_row: Callable[[str], FaultRow],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas; one stops (as a container does on SIGTERM) and a new one with another
    client id takes its place. With persistent sessions the old one kept its round-robin turn
    and every second frame waited in the broker for the edge's resend."""
    row = fault_row("ingest replica replaced (new client id, 2 replicas)")
    # Only a real wait shows: no early resend of frames overtaken by later acks.
    monkeypatch.setattr(edge_daemon, "FramePublisher",
                        functools.partial(FramePublisher, overtaken_grace_s=RESEND_AFTER_S))
    pipeline.start_worker()
    old = _replica(pipeline, replicas, "ingest-a")
    other = _replica(pipeline, replicas, "ingest-b")
    _subscribed(pipeline, _received(old), _received(other))
    total = int(14 * FRAMES_PER_S)
    edge = _edge(pipeline, total)
    try:
        assert wait_for(lambda: len(edge.record) >= 4 * FRAMES_PER_S, 40)
        old.stop()
        replaced = time.monotonic()
        _replica(pipeline, replicas, "ingest-a2")
        assert wait_for(lambda: len(edge.record) >= 10 * FRAMES_PER_S, 40)
        sampled = set(edge.record.snapshot())
        row.recovery_s = measure_recovery(pipeline.view, sampled, time.monotonic(), 60)
        waited = time.monotonic() - replaced
        _finish(pipeline, edge, row, total)
    finally:
        edge.daemon.request_stop()
    publisher = edge.daemon._publisher
    assert publisher is not None
    assert publisher.stats.resent == 0, "frames were stranded and needed the edge's resend"
    assert row.recovery_s < 5.0 and waited < RESEND_AFTER_S
    row.notes = (f"old replica left at frame {4 * FRAMES_PER_S:g}; frames resent by the edge: "
                 f"{publisher.stats.resent}")


def _ingest_process(pipeline: Pipeline, name: str) -> ServiceProcess:
    client_id = pipeline.ns.client_id(name)
    config = write_yaml(pipeline.tmp / f"{name}.yaml", {
        "mqtt": mqtt_section(pipeline.ns.mqtt_config("ingest"), client_id),
        "s3": {"endpoint_url": pipeline.stack.s3_endpoint, "bucket": pipeline.ns.ensure_bucket(),
               "path_style": True},
    })
    proc = ServiceProcess(name, ["ingest", "--config", str(config)], pipeline.env("ingest"),
                          Path(pipeline.tmp / f"{name}.log"))
    pipeline.processes.append(proc)
    return proc


def test_ingest_replica_killed_and_replaced(
        pipeline: Pipeline, replicas: list[IngestService],
        fault_row: Callable[[str], FaultRow]) -> None:
    """A replica (a process) SIGKILLed mid-stream and replaced by one with a new client id;
    another replica runs throughout. What the dead one held is resent by the edge once later
    frames are acked: seconds, not resend_after_s."""
    row = fault_row("ingest replica SIGKILLed, replaced (new client id, 2 replicas)")
    pipeline.start_worker()
    doomed = _ingest_process(pipeline, "ingest-k").start()
    doomed.wait_for(r"ingest \S+: started", 60)
    other = _replica(pipeline, replicas, "ingest-b")
    _subscribed(pipeline, _refused(doomed), _received(other))
    total = int(14 * FRAMES_PER_S)
    edge = _edge(pipeline, total)
    try:
        assert wait_for(lambda: len(edge.record) >= 4 * FRAMES_PER_S, 40)
        doomed.kill()
        killed = time.monotonic()
        _ingest_process(pipeline, "ingest-k2").start().wait_for(r"ingest \S+: started", 60)
        sampled = set(edge.record.snapshot())
        row.recovery_s = measure_recovery(pipeline.view, sampled, killed, 60)
        _finish(pipeline, edge, row, total)
    finally:
        edge.daemon.request_stop()
    publisher = edge.daemon._publisher
    resent = publisher.stats.resent if publisher is not None else 0
    row.notes = f"{resent} frames resent by the edge (overtaken by later acks)"
    assert row.recovery_s < RESEND_AFTER_S / 2, row.recovery_s


def test_broker_restart_with_the_edge_reconnecting_first(
        pipeline: Pipeline, replicas: list[IngestService],
        fault_row: Callable[[str], FaultRow]) -> None:
    """mosquitto restarted (SIGTERM) while the ingest is away; the edge reconnects and sends
    first, the broker PUBACKs and drops those frames (mosquitto 2.0.11 restores no shared
    subscription); then the ingest comes back."""
    row = fault_row("broker restart with the edge reconnecting first")
    stack = pipeline.stack
    pipeline.start_worker()
    ingest = _replica(pipeline, replicas, "ingest-r")
    _subscribed(pipeline, _received(ingest))
    total = int(14 * FRAMES_PER_S)
    edge = _edge(pipeline, total)
    try:
        assert wait_for(lambda: len(edge.record) >= 3 * FRAMES_PER_S, 40)
        ingest.stop()
        stack.restart_mosquitto()
        publisher = edge.daemon._publisher
        assert publisher is not None
        sent = publisher.stats.published + publisher.stats.resent
        assert wait_for(lambda: publisher.client.is_connected
                        and publisher.stats.published + publisher.stats.resent > sent + 2, 30), (
            "the edge did not reconnect and send")
        dropped = set(edge.record.snapshot())
        _replica(pipeline, replicas, "ingest-r2")
        back = time.monotonic()
        row.recovery_s = measure_recovery(pipeline.view, dropped, back, 60)
        _finish(pipeline, edge, row, total)
    finally:
        edge.daemon.request_stop()
        if not stack.mosquitto.running():
            stack.start_mosquitto()
    row.notes = (f"{publisher.stats.resent} frames resent by the edge; recovery counted from "
                 "the ingest's return")
    assert row.recovery_s < RESEND_AFTER_S / 3, row.recovery_s
