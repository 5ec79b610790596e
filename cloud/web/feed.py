"""What fills the caption index: MQTT (new captions, device status) and S3 (``reindex``).

- :class:`CaptionFeed` subscribes ``{prefix}/+/captions`` and ``{prefix}/+/status`` with a
  clean session (the index is rebuilt from S3, so nothing needs to wait on the broker while
  the web process is away; each replica hears every caption). Payloads are decoded once, here,
  at the boundary; a bad one is logged (device and reason), counted and skipped. A writer
  thread upserts captions in batches (up to ``batch_size`` docs or ``batch_wait_s``), then hands
  each caption this feed had not heard before to its listeners (the live hub, the alert
  manager). Status ``online``/``offline`` goes to :meth:`CaptionIndex.set_status`.
- :func:`reindex` lists ``captions/`` in S3 and upserts every record that parses: the index is a
  cache that can always be rebuilt from the bucket.
- :meth:`CaptionFeed.feed_status` says whether the broker and S3 answer, and if not, since when
  (the pages show it and keep serving what is indexed).
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from cloud.web.index import CaptionIndex
from cloud.web.model import CaptionDoc
from common.config import WebConfig, redact_url
from common.messages import STATUS_OFFLINE, STATUS_ONLINE, CaptionRecord, MessageError
from common.mqtt import MqttClient
from common.storage import ObjectNotFoundError, ObjectStore, StorageError
from common.topics import CAPTIONS, CAPTIONS_PREFIX, STATUS, InvalidIdError, Topics

if TYPE_CHECKING:
    from cloud.web.metrics import WebMetrics

logger = logging.getLogger(__name__)

Listener = Callable[[CaptionDoc], object]
"""Called with each caption the feed hears for the first time, after it is indexed."""

DEFAULT_BATCH_SIZE = 200
DEFAULT_BATCH_WAIT_S = 0.05
DEFAULT_QUEUE_SIZE = 100_000
RECENT_KEYS = 100_000
"""Captions remembered as heard, so a redelivered one is not sent to listeners twice."""


def default_client_id(host: str | None = None) -> str:
    """``framecap-web-{hostname}-{random}``: a clean session per process, so replicas on one
    host never take each other's connection."""
    return f"framecap-web-{(host or socket.gethostname())[:32]}-{secrets.token_hex(4)}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S UTC")


@dataclass
class _Status:
    device_id: str
    status: str
    at: datetime


# -- reindex from S3 ------------------------------------------------------------------------


@dataclass
class ReindexResult:
    """Counts of one :func:`reindex` run.

    Attributes:
        listed: ``.json`` objects listed under ``captions/``.
        indexed: records upserted (new or replaced).
        new: of those, rows the index did not hold before.
        skipped: objects that are not a valid caption record (counted, logged, skipped).
        failed: objects that could not be read from S3 (logged).
        seconds: wall time of the run.
    """

    listed: int = 0
    indexed: int = 0
    new: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        """The counts as a JSON-ready dict."""
        return asdict(self)


def parse_caption_object(key: str, body: bytes) -> CaptionDoc:
    """A ``captions/...json`` object as a :class:`CaptionDoc`.

    Raises:
        MessageError: not a caption record, or one whose device is not the key's
            (``captions/{device_id}/...``).
    """
    record = CaptionRecord.from_json(body)
    if not key.startswith(f"{CAPTIONS_PREFIX}{record.device_id}/"):
        raise MessageError(f"record of device {record.device_id!r} stored under another device's key")
    return CaptionDoc.from_record(record)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def reindex(
    store: ObjectStore,
    index: CaptionIndex,
    progress: bool = True,
    *,
    batch_size: int = 500,
    workers: int = 4,
    metrics: WebMetrics | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[ReindexResult], None] | None = None,
) -> ReindexResult:
    """Rebuild the index from S3: list ``captions/`` (paginated), GET each ``.json`` on a pool
    of ``workers`` threads, parse, upsert in batches of ``batch_size``.

    Idempotent (rows are keyed by the frame), so it can run beside the live feed. An object that
    does not parse is logged (key and reason), counted in ``skipped`` and skipped; one that cannot
    be read is logged and counted in ``failed``. Shows a tqdm progress line when ``progress`` and
    stderr is a terminal. ``stop`` ends it early (between batches).

    Raises:
        StorageError: ``captions/`` cannot be listed (S3 down, no bucket, credentials).
        CaptionIndexError: the index refused a batch.
    """
    result = ReindexResult()
    t0 = time.monotonic()
    bar: Any = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="reindex", unit="caption", file=sys.stderr)

    def fetch(key: str) -> CaptionDoc | str | None:
        try:
            body = store.get(key)
        except ObjectNotFoundError:
            return None  # deleted since it was listed
        except StorageError as err:
            logger.warning("reindex: cannot read s3://%s/%s: %s", store.bucket, key, err.reason)
            return "failed"
        try:
            return parse_caption_object(key, body)
        except MessageError as err:
            logger.warning("reindex: skipped s3://%s/%s: %s", store.bucket, key, err)
            return "skipped"

    keys = (k for k in store.list_keys(CAPTIONS_PREFIX) if k.endswith(".json"))
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="reindex") as pool:
            for chunk in _chunks(keys, batch_size):
                if stop is not None and stop.is_set():
                    logger.info("reindex: stopped after %d objects", result.listed)
                    break
                result.listed += len(chunk)
                docs: list[CaptionDoc] = []
                for outcome in pool.map(fetch, chunk):
                    if isinstance(outcome, CaptionDoc):
                        docs.append(outcome)
                    elif outcome == "skipped":
                        result.skipped += 1
                        if metrics is not None:
                            metrics.invalid_captions.labels("s3").inc()
                    elif outcome == "failed":
                        result.failed += 1
                if docs:
                    result.new += index.upsert(docs)
                    result.indexed += len(docs)
                    if metrics is not None:
                        metrics.captions_indexed.inc(len(docs))
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(skipped=result.skipped, failed=result.failed, refresh=False)
                if on_progress is not None:
                    on_progress(result)
    finally:
        if bar is not None:
            bar.close()
        result.seconds = round(time.monotonic() - t0, 3)
    logger.info(
        "reindex of s3://%s/%s: %d listed, %d indexed (%d new), %d skipped, %d unreadable in %.1f s",
        store.bucket, CAPTIONS_PREFIX, result.listed, result.indexed, result.new, result.skipped,
        result.failed, result.seconds,
    )
    return result


# -- the live feed --------------------------------------------------------------------------


class CaptionFeed:
    """MQTT captions and status into the index, and each new caption to the listeners.

    Args:
        config: the web config (``mqtt`` for the broker and prefix, ``s3`` for the bucket).
        index: where captions and statuses go.
        on_new: listeners called (on the writer thread, after the upsert) with each caption this
            feed hears for the first time: ``LiveHub.publish``, ``AlertManager.check``. A
            listener that raises is logged and the others still run.
        store: the bucket for :meth:`reindex_in_background` and the S3 probe (made from
            ``config.s3`` when None).
        metrics: counters and gauges to update, if any.
        client_id: MQTT client_id; default ``config.mqtt.client_id``, else
            :func:`default_client_id`.
        batch_size: most captions per upsert.
        batch_wait_s: longest wait to fill a batch, seconds.
        s3_probe_interval_s: how often to check that S3 answers, seconds (0: never).

    Thread-safe. :meth:`start` connects in the background; :meth:`stop` drains the queue.
    """

    def __init__(
        self,
        config: WebConfig,
        index: CaptionIndex,
        *,
        on_new: Sequence[Listener] = (),
        store: ObjectStore | None = None,
        metrics: WebMetrics | None = None,
        client_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        s3_probe_interval_s: float = 15.0,
    ) -> None:
        self.config = config
        self.index = index
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = metrics
        self.batch_size = max(1, batch_size)
        self.batch_wait_s = batch_wait_s
        self.s3_probe_interval_s = s3_probe_interval_s
        self.client_id = client_id or config.mqtt.client_id or default_client_id()
        # A clean session that the broker forgets at once: nothing to keep for a cache.
        mqtt_config = config.mqtt.model_copy(update={"session_expiry_s": 0})
        self.client = MqttClient(mqtt_config, self.client_id, clean_start=True)
        self.client.subscribe(self.topics.all_devices(CAPTIONS), self._on_caption, qos=1)
        self.client.subscribe(self.topics.all_devices(STATUS), self._on_status, qos=1)
        self.client.on_connected(self._on_connected)
        self.client.on_disconnected(self._on_disconnected)
        self._store = store
        self._listeners: list[Listener] = list(on_new)
        self._queue: queue.Queue[CaptionDoc | _Status] = queue.Queue(maxsize=queue_size)
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = _utc_now()
        self._mqtt_down_since: datetime | None = self._started_at
        self._s3_ok: bool | None = None
        self._s3_down_since: datetime | None = None
        self._s3_error: str | None = None
        self._last_caption_at: datetime | None = None
        self._reindex: dict[str, Any] = {"running": False}

    # -- lifecycle ---------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Also call ``listener(doc)`` for each new caption (see ``on_new``)."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def store(self) -> ObjectStore:
        """The bucket of ``config.s3`` (opened on first use; fails fast, 3 attempts)."""
        if self._store is None:
            self._store = ObjectStore(self.config.s3, connect_timeout_s=3.0, read_timeout_s=15.0,
                                      max_attempts=3)
        return self._store

    def start(self) -> None:
        """Start the writer thread, the S3 probe and the MQTT connection; returns at once."""
        self._stop.clear()
        self._spawn(self._write_loop, "feed-writer")
        if self.s3_probe_interval_s > 0:
            self._spawn(self._probe_loop, "feed-s3-probe")
        self.client.start()

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected to the broker and subscribed (within ``timeout`` seconds)."""
        return self.client.wait_connected(timeout)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Disconnect, index what is queued, stop the threads (a running reindex stops between
        batches)."""
        self.client.stop()
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        logger.info("feed %s: stopped; %s", self.client_id, self.counters)

    @property
    def counters(self) -> dict[str, int]:
        """``received``, ``indexed``, ``new``, ``invalid``, ``mismatched``, ``statuses``,
        ``dropped`` (queue full), ``index_errors``, ``listener_errors``."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- MQTT (paho's thread: decode, check, queue; never block) ------------------------
    def _on_connected(self, session_present: bool) -> None:
        with self._lock:
            self._mqtt_down_since = None
        if self.metrics is not None:
            self.metrics.up.labels("mqtt").set(1)

    def _on_disconnected(self) -> None:
        with self._lock:
            if self._mqtt_down_since is None:
                self._mqtt_down_since = _utc_now()
        if self.metrics is not None:
            self.metrics.up.labels("mqtt").set(0)

    def _topic_device(self, message: mqtt.MQTTMessage) -> str | None:
        try:
            return self.topics.parse(message.topic)[0]
        except InvalidIdError as err:
            self._count("invalid")
            logger.warning("feed: message on %r skipped: %s", message.topic[:200], err)
            return None

    def _on_caption(self, message: mqtt.MQTTMessage) -> None:
        device_id = self._topic_device(message)
        if device_id is None:
            return
        self._count("received")
        try:
            record = CaptionRecord.from_json(bytes(message.payload))
        except MessageError as err:
            self._count("invalid")
            if self.metrics is not None:
                self.metrics.invalid_captions.labels("mqtt").inc()
            logger.warning("feed: caption from device %s skipped: %s", device_id, err)
            return
        if record.device_id != device_id:
            self._count("mismatched")
            if self.metrics is not None:
                self.metrics.invalid_captions.labels("mqtt").inc()
            logger.warning("feed: caption of device %s frame %s skipped: it came on device %s's topic",
                           record.device_id, record.frame_id, device_id)
            return
        self._enqueue(CaptionDoc.from_record(record))

    def _on_status(self, message: mqtt.MQTTMessage) -> None:
        device_id = self._topic_device(message)
        if device_id is None:
            return
        if not message.payload:
            return  # a retained status being cleared
        status = bytes(message.payload[:32]).decode("utf-8", "replace").strip()
        if status not in (STATUS_ONLINE, STATUS_OFFLINE):
            self._count("invalid")
            logger.warning("feed: status of device %s skipped: %r is not online/offline", device_id, status)
            return
        self._enqueue(_Status(device_id, status, _utc_now()))

    def _enqueue(self, item: CaptionDoc | _Status) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")
            logger.warning("feed: queue full (%d); %s dropped (reindex recovers it)",
                           self._queue.maxsize, getattr(item, "frame_id", "a status"))

    # -- writer thread ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - the writer must survive anything
                self._count("index_errors")
                logger.exception("feed: writing a batch of %d to the index failed", len(batch))

    def _write(self, batch: list[CaptionDoc | _Status]) -> None:
        docs: dict[tuple[str, str], CaptionDoc] = {}
        for item in batch:
            if isinstance(item, _Status):
                self.index.set_status(item.device_id, item.status, item.at)
                self._count("statuses")
            else:
                docs[(item.device_id, item.frame_id)] = item
        if not docs:
            return
        rows = list(docs.values())
        self.index.upsert(rows)
        self._count("indexed", len(rows))
        if self.metrics is not None:
            self.metrics.observe_indexed(rows)
        fresh = []
        with self._lock:
            self._last_caption_at = _utc_now()
            for key, doc in docs.items():
                if key in self._recent:
                    self._recent.move_to_end(key)
                    continue
                self._recent[key] = None
                fresh.append(doc)
            while len(self._recent) > RECENT_KEYS:
                self._recent.popitem(last=False)
            listeners = list(self._listeners)
        self._count("new", len(fresh))
        for doc in fresh:
            for listener in listeners:
                try:
                    listener(doc)
                except Exception:  # noqa: BLE001 - one listener must not stop the others
                    self._count("listener_errors")
                    logger.exception("feed: listener %r failed on device %s frame %s",
                                     listener, doc.device_id, doc.frame_id)

    # -- S3 --------------------------------------------------------------------------------
    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            self.probe_s3()
            self._stop.wait(self.s3_probe_interval_s)

    def probe_s3(self) -> bool:
        """List one key under ``captions/`` to see whether S3 answers; records the result."""
        try:
            next(iter(self.store.list_keys(CAPTIONS_PREFIX, page_size=1)), None)
        except StorageError as err:
            self._s3_state(False, err.reason)
            return False
        except Exception as err:  # noqa: BLE001 - a probe reports, never raises
            self._s3_state(False, f"{type(err).__name__}: {err}")
            return False
        self._s3_state(True)
        return True

    def _s3_state(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            was = self._s3_ok
            self._s3_ok = ok
            self._s3_error = error
            if ok:
                self._s3_down_since = None
            elif self._s3_down_since is None:
                self._s3_down_since = _utc_now()
        if self.metrics is not None:
            self.metrics.up.labels("s3").set(1 if ok else 0)
        if not ok and was is not False:
            logger.error("feed: S3 %s unreachable: %s", self._s3_where(), error)
        elif ok and was is False:
            logger.warning("feed: S3 %s answers again", self._s3_where())

    def _s3_where(self) -> str:
        return redact_url(self.config.s3.endpoint_url or "AWS") + f" bucket {self.config.s3.bucket}"

    def reindex(self, progress: bool = False, **kwargs: Any) -> ReindexResult:
        """:func:`reindex` from this feed's bucket into its index (progress shown in
        :meth:`feed_status`). Raises like :func:`reindex`."""
        with self._lock:
            if self._reindex.get("running"):
                raise RuntimeError("a reindex is already running")
            self._reindex = {"running": True, "started_at": _utc_now().isoformat(timespec="seconds")}

        def on_progress(result: ReindexResult) -> None:
            with self._lock:
                self._reindex.update(result.as_dict())

        try:
            result = reindex(self.store, self.index, progress, metrics=self.metrics, stop=self._stop,
                             on_progress=on_progress, **kwargs)
        except StorageError as err:
            self._s3_state(False, err.reason)
            with self._lock:
                self._reindex.update(running=False, error=str(err))
            raise
        except Exception as err:
            with self._lock:
                self._reindex.update(running=False, error=f"{type(err).__name__}: {err}")
            raise
        self._s3_state(True)
        with self._lock:
            self._reindex = {"running": False, **result.as_dict(),
                             "finished_at": _utc_now().isoformat(timespec="seconds")}
        return result

    def reindex_in_background(self) -> threading.Thread:
        """Run :meth:`reindex` on a thread (errors are logged, and shown by feed_status)."""

        def run() -> None:
            try:
                self.reindex()
            except StorageError as err:
                logger.error("reindex from S3 failed: %s; the index serves what it holds", err)
            except Exception:  # noqa: BLE001
                logger.exception("reindex from S3 failed")

        return self._spawn(run, "feed-reindex")

    # -- status ------------------------------------------------------------------------------
    def feed_status(self) -> dict[str, Any]:
        """Where the feed stands, JSON-ready.

        Keys: ``mqtt_connected`` (bool), ``s3_ok`` (bool, None before the first check),
        ``last_caption_at`` (ISO 8601 UTC when a caption was last indexed from MQTT, or None),
        ``behind`` (None, or a sentence such as "MQTT broker 127.0.0.1:1883 unreachable since
        12:03:04 UTC; showing what is indexed"), ``reindex`` (running, counts) and ``counters``.
        """
        connected = self.client.is_connected
        with self._lock:
            mqtt_down = self._mqtt_down_since
            s3_ok, s3_down, s3_error = self._s3_ok, self._s3_down_since, self._s3_error
            last = self._last_caption_at
            reindex_state = dict(self._reindex)
            counts = dict(self._counts)
        problems = []
        if not connected:
            m = self.config.mqtt
            refused = self.client.last_connack_failure
            since = _clock(mqtt_down or self._started_at)
            if refused:
                problems.append(f"MQTT broker {m.host}:{m.port} refused the connection ({refused}) since {since}")
            else:
                problems.append(f"MQTT broker {m.host}:{m.port} unreachable since {since}")
        if s3_ok is False:
            problems.append(f"S3 {self._s3_where()} unreachable since {_clock(s3_down or _utc_now())}"
                            + (f" ({s3_error})" if s3_error else ""))
        behind = "; ".join(problems) + "; showing what is indexed" if problems else None
        return {
            "mqtt_connected": connected,
            "s3_ok": s3_ok,
            "last_caption_at": last.isoformat(timespec="seconds") if last else None,
            "behind": behind,
            "reindex": reindex_state,
            "counters": counts,
        }
