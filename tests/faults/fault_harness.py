"""The machinery of the fault tests: the pipeline under test, what each part recorded, the checks.

A fault test runs the real code against the session's real mosquitto and SeaweedFS: an
:class:`~edge.daemon.EdgeDaemon` (in-process, or ``python -m common.cli edge`` as a
subprocess) reads ``../shared/videos/vtest.avi`` in real time (``playback_speed`` 1, one frame
sampled per :data:`SAMPLE_INTERVAL_S` of video), an :class:`~cloud.ingest.IngestService` and a
:class:`~cloud.worker.CaptionWorker` (in-process with :class:`FakeCaptioner`, or their CLIs as
subprocesses), and a :class:`MessageLog` that counts every ack and caption published.

While the fault happens, the edge keeps sampling. Afterwards :func:`check_exactly_once` proves
that every sampled frame is in S3 once with the bytes the edge hashed, has one caption record,
one caption publish, one caption at the edge, and that the model saw it once; it returns the
:class:`FaultRow` the test prints and ``make faults`` writes to docs/faults.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from mqtt_subacks import SubackWatch

from common.config import EdgeConfig, MqttConfig
from common.messages import CaptionRecord, FrameAck, FrameMetadata, MessageError
from common.mqtt import MqttClient
from common.storage import StorageError
from edge.daemon import EdgeDaemon, EdgeSummary
from edge.publisher import parse_caption_line

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
VTEST = REPO_DIR.parent / "shared" / "videos" / "vtest.avi"
SAMPLE_INTERVAL_S = 0.5  # video seconds between sampled frames: 2 frames a wall second at speed 1
FRAMES_PER_S = 1.0 / SAMPLE_INTERVAL_S


def outage_s() -> float:
    """How long the 30-second faults last: ``$FRAMECAP_FAULT_OUTAGE_S`` (local runs), else 30."""
    return float(os.environ.get("FRAMECAP_FAULT_OUTAGE_S", "30"))


# ----------------------------------------------------------------------------- the row


@dataclass
class FaultRow:
    """One line of the fault table: ``fault | sampled | stored | captioned | duplicates | recovery``.

    ``stored``: sampled frames in S3 once with the same bytes; ``captioned``: sampled frames with
    one caption record, published and handled once by the edge; ``duplicates``: every second
    effect (an extra S3 object or caption record, a caption the edge handled twice, a second
    model run); ``republished``: caption publishes repeated over MQTT (at least once, QoS 1),
    which the edge dropped as repeats;
    ``recovery_s``: from the end of the fault until every frame sampled before that end was
    stored and captioned; ``dropped``: frames a full spool dropped (the one loss allowed).
    """

    fault: str
    sampled: int = 0
    stored: int = 0
    captioned: int = 0
    duplicates: int = 0
    recovery_s: float | None = None
    dropped: int = 0
    republished: int = 0
    notes: str = ""
    passed: bool = False

    def line(self) -> str:
        """``fault | sampled | stored | captioned | duplicates | recovery time``."""
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        return (f"{self.fault} | {self.sampled} | {self.stored} | {self.captioned} | "
                f"{self.duplicates} | {recovery}")


# ----------------------------------------------------------------------------- fakes and observers


class FakeCaptioner:
    """A deterministic, fast stand-in for the model (the model is tested elsewhere).

    Captions each RGB uint8 image ``(H, W, 3)`` as ``"frame <sha256 prefix of its pixels>"`` with
    score -1.0, and counts the images it captioned (:attr:`runs`), so a test can prove the
    worker never ran the model twice on a frame. ``delay_s`` makes each batch take that long.
    """

    name = "fault-fake-captioner"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.runs = 0
        self._lock = threading.Lock()

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for image in images:
            digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
            with self._lock:
                self.runs += 1
            out.append((f"frame {digest[:12]}", -1.0))
        return out

    def extra_runs(self, frames: int) -> int:
        """Model runs beyond one per frame, for ``frames`` frames captioned in all."""
        with self._lock:
            return max(0, self.runs - frames)


class MessageLog:
    """Counts every FrameAck and CaptionRecord published under a topic prefix, per frame_id.

    An admin MQTT client with a persistent session (it survives a broker restart) subscribed
    to ``{prefix}/+/acks`` and ``{prefix}/+/captions``.
    """

    def __init__(self, config: MqttConfig, client_id: str) -> None:
        self.acks: Counter[str] = Counter()
        self.captions: Counter[str] = Counter()
        self._lock = threading.Lock()
        prefix = config.topic_prefix
        self.client = MqttClient(config, client_id, clean_start=False)
        self.client.subscribe(f"{prefix}/+/acks", self._on_ack, 1)
        self.client.subscribe(f"{prefix}/+/captions", self._on_caption, 1)

    def start(self) -> None:
        """Connect, and return once the broker granted both subscriptions (their SUBACKs)."""
        with SubackWatch() as subacks:
            self.client.start()
            assert self.client.wait_connected(10), "message log could not connect"
            subacks.wait_for(self.client)

    def stop(self) -> None:
        self.client.stop()

    def _on_ack(self, message: mqtt.MQTTMessage) -> None:
        try:
            ack = FrameAck.from_json(bytes(message.payload))
        except MessageError:
            return
        with self._lock:
            self.acks[ack.frame_id] += 1

    def _on_caption(self, message: mqtt.MQTTMessage) -> None:
        try:
            record = CaptionRecord.from_json(bytes(message.payload))
        except MessageError:
            return
        with self._lock:
            self.captions[record.frame_id] += 1

    def caption_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.captions)


class SampledRecord:
    """The edge's record of what it sampled: frame_id -> sha256 of the JPEG, in order.

    In-process it is fed by :class:`EdgeDaemon`'s ``on_spooled`` hook; for an edge subprocess
    :meth:`read_log` parses its "frame ... sampled ... and spooled (..., sha256 ...)" lines.
    """

    _LINE = re.compile(r": frame (\S+) sampled \(.*sha256 ([0-9a-f]{64})\)")

    def __init__(self) -> None:
        self.frames: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, metadata: FrameMetadata) -> None:
        with self._lock:
            self.frames[metadata.frame_id] = metadata.sha256

    def read_log(self, text: str) -> None:
        with self._lock:
            for frame_id, sha in self._LINE.findall(text):
                self.frames[frame_id] = sha

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self.frames)

    def __len__(self) -> int:
        with self._lock:
            return len(self.frames)


class EdgeCaptions:
    """Captions that came back to the edge, per frame_id (the ``on_caption`` hook).

    In-process it also keeps each frame's capture -> caption latency (:meth:`latencies`): the
    wall clock when its first caption was handed on minus the record's ``captured_at``.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._latency: dict[str, tuple[datetime, float]] = {}  # frame_id -> (captured_at, s)
        self._lock = threading.Lock()

    def add(self, record: CaptionRecord) -> None:
        now = datetime.now(timezone.utc)
        with self._lock:
            self.counts[record.frame_id] += 1
            if record.captured_at is not None and record.frame_id not in self._latency:
                self._latency[record.frame_id] = (
                    record.captured_at, (now - record.captured_at).total_seconds())

    def latencies(self) -> dict[str, tuple[datetime, float]]:
        """frame_id -> (captured_at UTC, capture -> caption at the edge in seconds), for the
        captions the ``on_caption`` hook saw (not filled by :meth:`read_jsonl`)."""
        with self._lock:
            return dict(self._latency)

    def read_jsonl(self, path: Path) -> None:
        """Count the lines of an edge's ``captions_jsonl`` (subprocess edges)."""
        counts: Counter[str] = Counter()
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(MessageError):
                    counts[parse_caption_line(line)[0].frame_id] += 1  # lines carry received_at too
        with self._lock:
            self.counts = counts

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


# ----------------------------------------------------------------------------- processes


class EdgeRunner:
    """An in-process :class:`EdgeDaemon` on its own thread, recording what it samples."""

    def __init__(self, config: EdgeConfig, **daemon_args: Any) -> None:
        self.record = SampledRecord()
        self.captions = EdgeCaptions()
        self.daemon = EdgeDaemon(config, print_captions=False, on_spooled=self.record.add,
                                 on_caption=self.captions.add, **daemon_args)
        self.summary: EdgeSummary | None = None
        self._thread = threading.Thread(target=self._run, name="edge-runner", daemon=True)

    def _run(self) -> None:
        self.summary = self.daemon.run()

    def start(self) -> EdgeRunner:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> EdgeSummary:
        """Wait for the run to end (stop it after ``timeout_s``) and return its summary."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.daemon.request_stop()
            self._thread.join(15)
        assert self.summary is not None, "the edge daemon did not return"
        return self.summary


class ServiceProcess:
    """A ``python -m common.cli ...`` subprocess with its output in a log file.

    Started in its own session; :meth:`kill` sends SIGKILL to its PID only.
    """

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "common.cli", *args]
        self.env = dict(os.environ, **env, PYTHONUNBUFFERED="1")
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ServiceProcess:
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.starts + 1}: {' '.join(self.args[1:])}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.args, cwd=REPO_DIR, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        logger.info("%s: started pid %d", self.name, self.proc.pid)
        return self

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def current_text(self) -> str:
        """The output of the latest start only."""
        return self.text().rsplit("===== start ", 1)[-1]

    def count(self, pattern: str, *, current: bool = True) -> int:
        return len(re.findall(pattern, self.current_text() if current else self.text()))

    def wait_for(self, pattern: str, timeout_s: float, *, n: int = 1) -> None:
        """Wait until the latest start has printed ``n`` lines matching ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count(pattern) >= n:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"{pattern!r}:\n{self.current_text()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout_s:.0f} s:\n"
                             f"{self.current_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 15 s (cleanup)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write a config file (no secrets in it: they come from the environment)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mqtt_section(config: MqttConfig, client_id: str) -> dict[str, Any]:
    """The ``mqtt:`` section of a YAML config for ``config`` (password left to the env)."""
    return {"host": config.host, "port": config.port, "topic_prefix": config.topic_prefix,
            "username": config.username, "client_id": client_id}


# ----------------------------------------------------------------------------- S3 views


class BucketView:
    """What S3 holds for one device: frames and caption records (fast-failing client)."""

    def __init__(self, store: Any, device_id: str) -> None:
        self.store = store
        self.device_id = device_id

    def frame_keys(self) -> dict[str, list[str]]:
        """frame_id -> keys under frames/{device_id}/ (more than one key would be a duplicate)."""
        out: dict[str, list[str]] = {}
        for key in self.store.list_keys(f"frames/{self.device_id}/"):
            out.setdefault(Path(key).stem, []).append(key)
        return out

    def caption_keys(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key in self.store.list_keys(f"captions/{self.device_id}/"):
            out.setdefault(Path(key).stem, []).append(key)
        return out

    def done(self, frame_ids: set[str]) -> bool:
        """True if every frame in ``frame_ids`` is stored and has a caption record (False while
        S3 does not answer)."""
        try:
            return frame_ids <= set(self.frame_keys()) and frame_ids <= set(self.caption_keys())
        except StorageError:
            return False


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def measure_recovery(view: BucketView, sampled: set[str], since: float, timeout_s: float) -> float:
    """Seconds from ``since`` (the fault's end) until every frame of ``sampled`` is stored and
    captioned; fails the test after ``timeout_s``."""
    assert wait_for(lambda: view.done(sampled), timeout_s, 0.2), (
        f"{len(sampled)} frames sampled before the fault ended were not all stored and "
        f"captioned {timeout_s:.0f} s after it")
    return time.monotonic() - since


# ----------------------------------------------------------------------------- the check


def check_exactly_once(
    row: FaultRow,
    *,
    view: BucketView,
    sampled: dict[str, str],
    message_log: MessageLog,
    edge_captions: EdgeCaptions,
    captioner: FakeCaptioner | None = None,
    allowed_missing: set[str] = frozenset(),  # type: ignore[assignment]
    timeout_s: float = 60.0,
) -> FaultRow:
    """Fill ``row`` from what S3, the message log and the edge hold, print it, then assert.

    Every frame of ``sampled`` (frame_id -> sha256) must be stored once with those bytes and
    captioned once; frames in ``allowed_missing`` (dropped by a full spool) must be absent.

    Raises:
        AssertionError: a frame lost, stored with other bytes, or anything duplicated.
    """
    expected = set(sampled) - allowed_missing
    wait_for(lambda: view.done(expected), timeout_s, 0.2)
    wait_for(lambda: expected <= set(message_log.caption_counts()), 10)
    wait_for(lambda: expected <= set(edge_captions.snapshot()), 10)
    time.sleep(1.0)  # let a late duplicate show up
    frames = view.frame_keys()
    captions = view.caption_keys()
    published = message_log.caption_counts()
    at_edge = edge_captions.snapshot()
    problems: list[str] = []
    stored = 0
    for frame_id in sorted(expected):
        keys = frames.get(frame_id, [])
        if not keys:
            problems.append(f"frame {frame_id} not in S3")
            continue
        body = view.store.get_object(keys[0])
        digest = hashlib.sha256(body.body).hexdigest()
        meta = FrameMetadata.from_s3_metadata(body.metadata)
        if digest != sampled[frame_id] or meta.sha256 != sampled[frame_id]:
            problems.append(f"frame {frame_id}: S3 bytes sha256 {digest[:12]} != sampled "
                            f"{sampled[frame_id][:12]}")
            continue
        stored += 1
    captioned = 0
    for frame_id in sorted(expected):
        if not captions.get(frame_id):
            problems.append(f"frame {frame_id}: no caption record in S3")
            continue
        record = CaptionRecord.from_json(view.store.get(captions[frame_id][0]))
        if record.error or not record.caption:
            problems.append(f"frame {frame_id}: caption record has an error: {record.error}")
        elif published.get(frame_id, 0) < 1:
            problems.append(f"frame {frame_id}: caption never published over MQTT")
        elif at_edge.get(frame_id, 0) < 1:
            problems.append(f"frame {frame_id}: caption never reached the edge")
        else:
            captioned += 1
    unexpected = sorted(set(frames) - expected)
    if unexpected:
        problems.append(f"{len(unexpected)} frames in S3 that were not sampled or were dropped: "
                        f"{unexpected[:5]}")
    model_twice = captioner.extra_runs(len(expected)) if captioner is not None else 0
    duplicates = (sum(len(k) - 1 for k in frames.values()) + sum(len(k) - 1 for k in captions.values())
                  + sum(n - 1 for n in at_edge.values() if n > 1) + model_twice)
    if duplicates:
        problems.append(f"{duplicates} duplicates: at the edge "
                        f"{dict((k, n) for k, n in at_edge.items() if n > 1)}, "
                        f"model runs beyond one a frame {model_twice}")
    row.republished = sum(n - 1 for n in published.values() if n > 1)
    if row.republished:
        row.notes += (f"{'; ' if row.notes else ''}{row.republished} caption publishes repeated, "
                      "dropped by the edge")
    row.sampled = len(sampled)
    row.stored = stored
    row.captioned = captioned
    row.duplicates = duplicates
    print(f"\nFAULT ROW: {row.line()}" + (f"  ({row.notes})" if row.notes else ""))
    assert not problems, "\n".join(problems[:20])
    assert stored == captioned == len(expected)
    return row


@contextlib.contextmanager
def cleanup(*closers: Callable[[], Any]) -> Iterator[None]:
    """Run every closer at the end, whatever happens (errors logged, not raised)."""
    try:
        yield
    finally:
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - cleanup must go on
                logger.exception("cleanup step failed")
