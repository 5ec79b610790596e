"""Fixtures of the fault tests: the pipeline under test and the fault table.

- ``pipeline``: a :class:`Pipeline` on the session's real stack under this test's own topic
  prefix, bucket and device: in-process ingest and worker (:class:`FakeCaptioner`) on demand,
  or their CLIs as subprocesses; a :class:`MessageLog`; everything stopped at the end.
- ``fault_row``: ``fault_row(name) -> FaultRow``, recorded for the table with the test's outcome.

The table: with ``FRAMECAP_FAULTS_TABLE=docs/faults.md`` (``make faults`` sets it) the rows of
the session are written there as markdown at the end, in :data:`FAULT_ORDER`.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fault_harness import (
    FRAMES_PER_S,
    SAMPLE_INTERVAL_S,
    VTEST,
    BucketView,
    FakeCaptioner,
    FaultRow,
    MessageLog,
    ServiceProcess,
    mqtt_section,
    outage_s,
    write_yaml,
)
from mqtt_subacks import SubackWatch

from cloud.ingest import IngestService
from cloud.worker import CaptionWorker
from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig, WorkerConfig

logger = logging.getLogger(__name__)

FAULT_ORDER = (
    "broker SIGKILL mid-stream, restarted",
    "broker down",
    "S3 (SeaweedFS) down",
    "edge SIGKILL mid-stream, restarted (+ planted half-written spool entry)",
    "ingest SIGKILL mid-batch, restarted",
    "worker SIGKILL mid-batch, restarted",
    "edge cut off from the broker",
    "spool full (live source, link down, spool of 5)",
    "ingest replica replaced (new client id, 2 replicas)",
    "ingest replica SIGKILLed, replaced (new client id, 2 replicas)",
    "broker restart with the edge reconnecting first",
    "hostile device tries to join the ingest's and worker's share groups",
    "mosquitto SIGKILLed mid-stream, healed by `framecap stack up`",
    "SeaweedFS SIGKILLed mid-stream, healed by `framecap stack up`",
)

_ROWS: list[tuple[str, FaultRow]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Keep each phase's report on the item, so ``fault_row`` knows whether the test passed."""
    outcome: Any = yield  # pluggy hands the wrapper its Result here
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def fault_row(request: pytest.FixtureRequest) -> Iterator[Callable[[str], FaultRow]]:
    """``fault_row(name)``: a :class:`FaultRow` for the table; ``passed`` is set from the test's
    outcome after it ran."""
    made: list[FaultRow] = []

    def make(name: str) -> FaultRow:
        row = FaultRow(fault=name)
        made.append(row)
        _ROWS.append((request.node.nodeid, row))
        return row

    yield make
    report = getattr(request.node, "rep_call", None)
    for row in made:
        row.passed = bool(report is not None and report.passed)


def _order(row: FaultRow) -> int:
    for i, name in enumerate(FAULT_ORDER):
        if row.fault.startswith(name):
            return i
    return len(FAULT_ORDER)


def write_table(path: Path, rows: list[FaultRow], seconds: float) -> None:
    """Write the fault table (markdown) to ``path``."""
    lines = [
        "# Fault results",
        "",
        "Written by `make faults` (the fault tests in `tests/faults/`, against the real mosquitto",
        "and SeaweedFS on 127.0.0.1; do not edit by hand). In every run the edge reads",
        f"`../shared/videos/vtest.avi` in real time and samples one frame per {SAMPLE_INTERVAL_S:g} s",
        f"of video ({FRAMES_PER_S:g} frames a second) while the fault happens.",
        "",
        "- **sampled**: frames the edge sampled and spooled (its own record: frame_id and sha256).",
        "- **stored**: of those, frames in S3 exactly once with the same bytes (sha256).",
        "- **captioned**: of those, frames with one caption record in S3 (no error) whose caption",
        "  was published over MQTT and handled once by the edge.",
        "- **duplicates**: every second effect: a second S3 object or caption record for a frame,",
        "  a caption the edge handled twice, or a second model run (in-process worker). Repeated",
        "  MQTT publishes (QoS 1 is at least once; the edge resends frames, the worker's outbox may",
        "  republish a caption) are not effects: the ingest and the edge drop them by frame_id.",
        "- **recovery time**: from the end of the fault (server restarted, link restored) until",
        "  every frame sampled before that moment is stored and captioned.",
        "- The only loss allowed is a full spool on a live source: the oldest frames are dropped,",
        "  counted and logged (the spool full row; a video file pauses instead).",
        "- The hostile device row counts the victim device's frames; its notes compare the",
        "  victim's p95 capture -> caption latency (at the edge) before the hostile device came and",
        "  while it was there, in the same run.",
        "- The healed rows: a server of the local stack SIGKILLed while frames flow, then",
        "  `framecap stack up` on the same state directory restarts only that server; recovery",
        "  is counted from when `stack up` returned.",
        "",
        "| fault | sampled | stored | captioned | duplicates | recovery time | result | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in sorted(rows, key=_order):
        recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.1f} s"
        lines.append(f"| {row.fault} | {row.sampled} | {row.stored} | {row.captioned} | "
                     f"{row.duplicates} | {recovery} | {'pass' if row.passed else 'FAIL'} | "
                     f"{row.notes} |")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"Outage length: {outage_s():g} s (`FRAMECAP_FAULT_OUTAGE_S`). Run {when} on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}); the fault tests took {seconds:.0f} s.",
        "",
        "Regenerate: `make faults`.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


@pytest.fixture(scope="session", autouse=True)
def fault_table() -> Iterator[None]:
    """At the end of the session, write the table if ``$FRAMECAP_FAULTS_TABLE`` names a file."""
    started = time.monotonic()
    yield
    target = os.environ.get("FRAMECAP_FAULTS_TABLE")
    rows = [row for _, row in _ROWS]
    if target and rows:
        write_table(Path(target), rows, time.monotonic() - started)
        print(f"\nfault table written to {target}")


class Pipeline:
    """The cloud side of one fault test and the means to check it (see the module doc)."""

    def __init__(self, stack_ns: Any, tmp_path: Path) -> None:
        self.ns = stack_ns
        self.stack = stack_ns.stack
        self.tmp = tmp_path
        self.device_id: str = stack_ns.device("cam")
        self.captioner = FakeCaptioner()
        self.view = BucketView(stack_ns.storage(connect_timeout_s=1.0, read_timeout_s=5.0,
                                                max_attempts=1), self.device_id)
        self.message_log = MessageLog(stack_ns.mqtt_config("admin"), stack_ns.client_id("log"))
        self.message_log.start()
        self.ingest: IngestService | None = None
        self.worker: CaptionWorker | None = None
        self.processes: list[ServiceProcess] = []
        self._ingest_id = stack_ns.client_id("ingest")
        self._worker_id = stack_ns.client_id("worker")

    # -- in-process services ---------------------------------------------------------------
    def start_ingest(self) -> IngestService:
        config = IngestConfig(mqtt=self.ns.mqtt_config("ingest"), s3=self.ns.s3_config(role="ingest"))
        self.ingest = IngestService(config, client_id=self._ingest_id)
        self.ingest.start()
        assert self.ingest.wait_connected(10)
        return self.ingest

    def start_worker(self) -> CaptionWorker:
        config = WorkerConfig(mqtt=self.ns.mqtt_config("worker"), s3=self.ns.s3_config(role="worker"),
                              batch_size=8, max_wait_s=0.2, list_interval_s=5.0)
        self.worker = CaptionWorker(config, self.captioner, client_id=self._worker_id)
        self.worker.start()
        assert self.worker.wait_connected(10)
        return self.worker

    def start_cloud(self) -> None:
        """In-process ingest and worker, subscribed (the broker's SUBACKs came) before the edge
        starts."""
        with SubackWatch() as subacks:
            self.start_ingest()
            self.start_worker()
            for service in (self.ingest, self.worker):
                subacks.wait_for(service)

    # -- subprocesses ----------------------------------------------------------------------
    def env(self, user: str) -> dict[str, str]:
        """Secrets for a child process (MQTT password of ``user``, S3 keys); never printed."""
        self.stack.grant_bucket(self.ns.ensure_bucket())
        key_id, secret = self.stack.s3_credentials(user if user in ("ingest", "worker", "web") else "admin")
        return {"FRAMECAP_MQTT_PASSWORD": self.stack.password(user),
                "FRAMECAP_S3_ACCESS_KEY_ID": key_id, "FRAMECAP_S3_SECRET_ACCESS_KEY": secret}

    def _s3_section(self) -> dict[str, Any]:
        return {"endpoint_url": self.stack.s3_endpoint, "bucket": self.ns.ensure_bucket(),
                "path_style": True}

    def ingest_process(self) -> ServiceProcess:
        """``framecap ingest --config ingest.yaml`` (not started)."""
        config = write_yaml(self.tmp / "ingest.yaml", {
            "mqtt": mqtt_section(self.ns.mqtt_config("ingest"), self._ingest_id),
            "s3": self._s3_section(),
        })
        proc = ServiceProcess("ingest", ["ingest", "--config", str(config)], self.env("ingest"),
                              self.tmp / "ingest.log")
        self.processes.append(proc)
        return proc

    def worker_process(self, model: Path) -> ServiceProcess:
        """``framecap worker --config worker.yaml --model MODEL`` (not started)."""
        config = write_yaml(self.tmp / "worker.yaml", {
            "mqtt": mqtt_section(self.ns.mqtt_config("worker"), self._worker_id),
            "s3": self._s3_section(),
            "device": "cpu", "beam_size": 1, "batch_size": 8, "max_wait_s": 0.3,
            "list_interval_s": 5.0,
        })
        proc = ServiceProcess("worker", ["worker", "--config", str(config), "--model", str(model)],
                              self.env("worker"), self.tmp / "worker.log")
        self.processes.append(proc)
        return proc

    def edge_process(self, config: EdgeConfig) -> ServiceProcess:
        """``framecap edge --config edge.yaml`` for ``config`` (not started)."""
        data = config.model_dump(mode="json", exclude_none=True)
        data["mqtt"] = mqtt_section(config.mqtt, config.mqtt.client_id or f"edge-{self.device_id}")
        path = write_yaml(self.tmp / "edge.yaml", data)
        proc = ServiceProcess("edge", ["edge", "--config", str(path)], self.env(self.device_id),
                              self.tmp / "edge.log")
        self.processes.append(proc)
        return proc

    # -- the edge --------------------------------------------------------------------------
    def edge_config(self, max_frames: int, **fields: Any) -> EdgeConfig:
        """vtest.avi read in real time, one frame per SAMPLE_INTERVAL_S, ``max_frames`` of them."""
        mqtt_fields = fields.pop("mqtt_fields", {})
        values: dict[str, Any] = {
            "device_id": self.device_id, "source": str(VTEST), "playback_speed": 1.0,
            "sampling": SamplingConfig(interval_s=SAMPLE_INTERVAL_S, scene_change=False),
            "spool": SpoolConfig(directory=self.tmp / "spool", resend_after_s=10.0),
            "max_frames": max_frames, "drain_timeout_s": 180.0, "wait_for_captions_s": 60.0,
            "mqtt": self.ns.mqtt_config(self.device_id).model_copy(update=mqtt_fields),
        }
        return EdgeConfig(**(values | fields))

    def close(self) -> None:
        for proc in self.processes:
            proc.stop()
        if self.worker is not None:
            self.worker.stop(timeout=5)
        if self.ingest is not None:
            self.ingest.stop(timeout=5)
        self.message_log.stop()


@pytest.fixture
def pipeline(stack_ns: Any, tmp_path: Path, shared_dir: Path) -> Iterator[Pipeline]:
    """A :class:`Pipeline` for this test (nothing started but its message log)."""
    if not VTEST.is_file():
        pytest.skip(f"{VTEST} is absent")
    pipe = Pipeline(stack_ns, tmp_path)
    try:
        yield pipe
    finally:
        pipe.close()
