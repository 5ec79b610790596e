"""``framecap worker``: caption every frame under ``frames/`` (../shared/DESIGN.md, Caption worker).

Frames are found two ways: the ingest's :class:`~common.messages.FrameAck` on
``$share/{share_group}/{prefix}/+/acks`` (published after the S3 write, so the object exists;
low latency), and listings of ``frames/`` against ``captions/`` (nothing is missed after a
restart or a lost ack, and objects put by other tools are captioned too). A frame whose
``captions/...json`` exists is skipped; a key already queued or in a batch is not queued twice.

Listings cost what is new, not what exists (issue 8):

- a **full pass** (at start, on SIGHUP, every ``full_list_interval_s`` if set) streams every key
  of ``frames/`` and ``captions/`` in key order and merge-joins the two streams
  (:func:`join_captions`; memory stays O(1), not O(bucket));
- a **periodic pass** (every ``list_interval_s``) finds the devices with one delimiter listing
  of ``frames/`` and lists, per device, only the ``recent_days`` most recent UTC days (and
  tomorrow, for an edge clock ahead), each from a cursor: ``StartAfter`` the last frame of that
  day such that every frame up to it has its caption and was stored at least
  ``listing_settle_s`` ago. A frame without a caption stops the cursor (it is listed again until
  it has one); the settle time keeps a frame that lands late under an earlier key (a resend
  after an ingest was stuck) above the cursor. A pass costs O(devices x days) LIST calls plus
  the keys of the last ``listing_settle_s`` and the new ones. Cursors of days that leave the
  window are dropped;
- after the worker **reconnects** to the broker (acks published while it was away are lost: a
  clean session) the next periodic pass lists the recent days without cursors;
- a frame whose fetch or write failed other than by an S3 outage (those are retried in place)
  is queued again by the next periodic pass, whatever its day.

Frames in older days whose ack was lost (an edge clock days behind, a frame put there by hand)
are found by the next full pass: ``kill -HUP`` the worker, or set ``full_list_interval_s``.

Three stages overlap, so the model never waits on S3 (issue 9): a pool of ``io_threads``
threads fetches frames (caption exists? get, decode, outbox marker) ahead of the model, at most
``prefetch`` frames ahead; the batch thread runs ``Captioner.caption_images`` (batched beam
search) on what is fetched; a writer thread writes and publishes the previous batch's records
(on the same pool) while the model runs the next. Batches are adaptive, as Triton's dynamic
batcher: an idle model takes a frame at once; frames that arrive while it is busy make the next
batch (at most ``batch_size``). After the first frame it waits (at most ``max_wait_s``) only
while more frames are being fetched, e.g. a burst of acks: a lone frame never waits.
Each frame's record goes to
``captions/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.json`` with ``If-None-Match: *`` (two
replicas never both write it) and, only if this worker wrote it, on
``{prefix}/{device_id}/captions`` at QoS 1. A corrupt or non-image object, or a key whose
``YYYY/MM/DD`` is no calendar date, gets a record with an empty caption and ``error`` set.
S3 outages are logged once and retried until S3 returns; an error no retry heals (credentials,
access, a missing bucket that ``s3.create_bucket`` does not allow to create) stops the worker
with the cause (exit 1), at start (S3 is probed) or later. The acks subscription uses a clean
session (see :mod:`cloud.service`): an ack lost with it only delays a frame to the next listing.

No caption is lost between S3 and MQTT: before writing a record the worker puts a marker
``outbox/{client_id}/{caption_key}`` and deletes it only when the broker has acknowledged
(PUBACK) the caption's publish (or another replica wrote the record first). A worker killed in
between leaves the marker, and so does a publish the broker refuses (PUBACK reason code >= 0x80,
e.g. "not authorized": logged at ERROR, counted as ``publish_refused``); the next listing
republishes the record: at once for the worker's own markers after a restart, after one more
listing interval otherwise (another replica may still be publishing). So the
device gets every caption at least once (a kill right after the PUBACK may repeat one; the
edge drops repeats by frame_id).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import numpy as np
import paho.mqtt.client as mqtt

from cloud import metrics
from cloud.outbox import OUTBOX_PREFIX, CaptionOutbox, caption_key_of
from cloud.service import (
    CloudService,
    ShareGroupClient,
    Stopping,
    add_common_arguments,
    common_overrides,
    open_store,
    retry_delays,
    run_until_signal,
    setup_logging,
)
from cloud.validation import captured_at_from, decode_image
from common.cli import device_arg
from common.config import ConfigError, WorkerConfig, load_config
from common.messages import CaptionRecord, FrameAck, MessageError
from common.storage import (
    ListedObject,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    StoredObject,
)
from common.topics import CAPTIONS_PREFIX, FRAMES_PREFIX, FrameKey, InvalidIdError, parse_frame_key

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
IO_THREADS = 2  # frames fetched at once (x3 requests each); 2x as many records written at once
# (2 + 4 + 4 = 10 S3 requests at most: botocore's default connection pool)
POLL_S = 0.2  # how often idle threads look at the stop event, seconds


class CaptionerLike(Protocol):
    """What the worker needs of ``cloud.captioning.inference.Captioner``."""

    name: str

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Caption RGB uint8 images (H, W, 3); one ``(caption, log-probability)`` each."""
        ...


def load_captioner(config: WorkerConfig) -> CaptionerLike:
    """Load the model named by ``config.model`` (the packaged default when None).

    Raises:
        ImportError: the captioning package (torch) is not installed.
        OSError, ValueError, RuntimeError: the checkpoint cannot be read or loaded.
    """
    from cloud.captioning.inference import Captioner

    return Captioner.load(
        config.model,
        device=config.device,
        precision=config.precision,
        beam_size=config.beam_size,
        max_caption_length=config.max_caption_length,
        threads=config.threads,
    )


@dataclass
class _Job:
    """One frame on its way through a batch."""

    key: str
    frame: FrameKey
    captured_at: datetime | None = None
    image: np.ndarray | None = None
    error: str | None = None
    caption: str = ""
    score: float | None = None
    marker: str | None = None  # its outbox marker, once written


def _results(futures: Sequence[Future[Any]]) -> list[Any]:
    """The futures' results in order, once all have ended; raises the first one's exception."""
    errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


def caption_key_for(key: str) -> str | None:
    """``frames/X.jpg`` -> ``captions/X.json`` (what :attr:`FrameKey.caption_key` gives for a key
    of the contract, without parsing it); None for a key that is not ``frames/...jpg``."""
    if key.startswith(FRAMES_PREFIX) and key.endswith(".jpg"):
        return f"{CAPTIONS_PREFIX}{key[len(FRAMES_PREFIX):-4]}.json"
    return None


def frame_key_for(key: str) -> str | None:
    """``captions/X.json`` -> ``frames/X.jpg``; None for a key that is not ``captions/...json``."""
    if key.startswith(CAPTIONS_PREFIX) and key.endswith(".json"):
        return f"{FRAMES_PREFIX}{key[len(CAPTIONS_PREFIX):-5]}.jpg"
    return None


def join_captions(
    frames: Iterable[ListedObject], captions: Iterable[str]
) -> Iterator[tuple[ListedObject, bool]]:
    """Merge-join a listing of frames with a listing of caption keys: each frame, in order, with
    whether its caption (:func:`caption_key_for`) is among ``captions``.

    Both inputs must be in key order (as S3 lists them). ``frames/.../X.jpg`` and
    ``captions/.../X.json`` sort alike except for ids where one is another plus a dot and more
    (``a`` and ``a.jpz``: ``a.jpg`` < ``a.jpz.jpg`` but ``a.jpz.json`` < ``a.json``): a caption
    taken ahead of its frame waits in a heap until its frame comes (or is passed), so the answer
    is exact whatever the ids. Memory: O(1) for keys of the contract (a page of each listing is
    held by the listing, not here). ``captions`` is not touched before the first frame with a
    caption key (no request for an empty listing of frames).
    """
    pending = iter(captions)
    head: str | None = None  # the next caption key, taken from ``pending`` but not yet used
    exhausted = False
    early: list[str] = []  # heap: frame keys of captions taken before their frame came
    for frame in frames:
        wanted = caption_key_for(frame.key)
        if wanted is None:
            yield frame, False
            continue
        while not exhausted:  # take every caption up to ``wanted``, in caption-key order
            if head is None:
                head = next(pending, None)
                if head is None:
                    exhausted = True
                    break
            if head > wanted:
                break
            other = frame_key_for(head)
            head = None
            if other is not None:
                heapq.heappush(early, other)
        while early and early[0] < frame.key:  # captions whose frame is not in this listing
            heapq.heappop(early)
        if early and early[0] == frame.key:
            heapq.heappop(early)
            yield frame, True
        else:
            yield frame, False


def caption_start_after(day_prefix: str, cursor: str) -> str:
    """The ``StartAfter`` of a day's caption listing that goes with a frame listing
    ``StartAfter=cursor`` (a key under ``frames/{day_prefix}``): ``captions/{day_prefix}`` and the
    cursor's id up to its first dot. Every caption of a frame after the cursor sorts after it,
    whatever the ids (see :func:`join_captions`); a few captions before it may be listed too."""
    tail = cursor[len(FRAMES_PREFIX) + len(day_prefix):]
    return f"{CAPTIONS_PREFIX}{day_prefix}{tail.split('.', 1)[0]}"


def _day_prefix(key: str) -> tuple[str, str] | None:
    """``frames/cam1/2026/12/02/x.jpg`` -> (``cam1/2026/12/02/``, ``2026/12/02``); None for a key
    with fewer levels."""
    parts = key[len(FRAMES_PREFIX):].split("/", 4)
    if len(parts) < 5:
        return None
    return "/".join(parts[:4]) + "/", "/".join(parts[1:4])


@dataclass
class ListingPass:
    """What one listing pass did (:attr:`CaptionWorker.last_pass`).

    Attributes:
        kind: ``full``, ``recent`` (from the cursors) or ``recent-uncursored`` (after a
            reconnect, or for days without a cursor yet: whole days).
        list_calls: ListObjectsV2 requests (outbox/ included).
        keys_seen: keys those requests returned.
        queued: frames without a caption queued for captioning.
        seconds: wall time of the pass.
    """

    kind: str
    list_calls: int = 0
    keys_seen: int = 0
    queued: int = 0
    seconds: float = 0.0


def _get_or_none(store: ObjectStore, key: str) -> StoredObject | None:
    """The object, or None if it is gone; raises StorageError on other failures."""
    try:
        return store.get_object(key)
    except ObjectNotFoundError:
        return None


class CaptionWorker(CloudService):
    """Captions frames under ``frames/``; see the module docstring.

    Args:
        config: broker, bucket, model and batching settings.
        captioner: the model; loaded from ``config`` by :meth:`start` when None.
        store: the object store (tests pass a fake); opened from ``config.s3`` when None.
        client_id: MQTT client_id; default ``config.mqtt.client_id``, else
            ``framecap-worker-{hostname}``.
        io_threads: frames fetched at once (three S3 requests each, two of them on a pool of
            ``2 * io_threads``); records written at once: ``2 * io_threads``.
        prefetch: most frames fetched (or being fetched) ahead of the model; default twice
            ``config.batch_size``.

    Attributes:
        counters: (property) a snapshot: ``captioned``, ``errors``, ``skipped``,
            ``notified``, ``listed``, ``batches``, ``bad_keys``, ``s3_errors``,
            ``full_passes``, ``recent_passes``.
        last_pass: the last listing pass that ended (:class:`ListingPass`), else None.
    """

    def __init__(
        self,
        config: WorkerConfig,
        captioner: CaptionerLike | None = None,
        *,
        store: ObjectStore | None = None,
        client_id: str | None = None,
        io_threads: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        io_threads = config.io_threads if io_threads is None else io_threads
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        super().__init__(
            "worker",
            config.mqtt,
            store=store,
            client_id=client_id,
            s3_errors=metrics.WORKER_S3_ERRORS,
            create_bucket=config.s3.create_bucket,
        )
        self.config = config
        self._acks_filter = self.topics.shared(config.share_group, "acks")
        self.captioner = captioner
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._bad_keys: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._outbox = CaptionOutbox(self.client_id)
        self._io_threads = io_threads
        self._pools: dict[str, ThreadPoolExecutor] = {}  # "fetch" and "write"
        self._io_lock = threading.Lock()
        self._prefetch = max(1, prefetch if prefetch is not None else 2 * config.batch_size)
        self._slots = threading.Semaphore(self._prefetch)  # frames fetched ahead of the model
        self._fetching = 0  # frames being fetched now (under self._lock)
        self._ready: queue.Queue[_Job] = queue.Queue()  # fetched, waiting for the model
        self._to_write: queue.Queue[list[_Job] | None] = queue.Queue()  # captioned batches
        self._open_markers: set[str] = set()  # written, record not yet written and published
        # listings (see the module docstring); the flags are plain attributes: a signal handler
        # and paho's thread set them
        self.last_pass: ListingPass | None = None
        self._scan_lock = threading.Lock()  # one pass at a time
        self._cursors: dict[str, str] = {}  # "cam1/2026/12/02/" -> last frame key passed
        self._full_due = True  # the first pass is a full one
        self._full_reason: str | None = None  # why one was asked for (logged by the pass)
        self._last_full_end: float | None = None  # time.monotonic() at the end of the last one
        self._uncursored_due = False  # the next periodic pass lists whole days
        self._connected_once = False
        self._retry: set[str] = set()  # keys whose fetch or write failed (a bug): queued again
        self._list_wake = threading.Event()  # a pass is wanted now (SIGHUP, reconnect, stop)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, mqtt_enabled: bool = True) -> None:
        """Load the model and the store, start the batch and list threads, connect.

        ``mqtt_enabled=False`` runs on listings alone (tests, batch use). Returns at once.

        Raises:
            ImportError, OSError, ValueError, RuntimeError: as :func:`load_captioner`.
            StorageError: S3 refuses this service (credentials, access, a missing bucket not
                created; ``permanent``).
        """
        if self.captioner is None:
            self.captioner = load_captioner(self.config)
        if self._store is None:
            self._store = open_store(self.config.s3, "worker")
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._feed_loop, name="worker-fetch", daemon=True),
            threading.Thread(target=self._batch_loop, name="worker-batches", daemon=True),
            threading.Thread(target=self._write_loop, name="worker-writes", daemon=True),
            threading.Thread(target=self._list_loop, name="worker-lister", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if mqtt_enabled:
            client = ShareGroupClient(self.config.mqtt, self.client_id)
            client.on_published(self._on_published)
            client.on_connected(self._on_connected)
            client.on_publish_refused(self._on_publish_refused)
            client.share(self._acks_filter, self._on_ack, 1)
            client.start()
            self._client = client
        logger.info(
            "worker %s: started (model %s, bucket %s, batch %d, max wait %.2f s while frames are "
            "being fetched, %d S3 threads, prefetch %d)",
            self.client_id,
            self.captioner.name,
            self.config.s3.bucket,
            self.config.batch_size,
            self.config.max_wait_s,
            self._io_threads,
            self._prefetch,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the acks share group, finish the current batch (at most ``timeout`` seconds),
        stop the threads, disconnect. Frames queued and not captioned are found by the next
        listing of any replica."""
        if isinstance(self._client, ShareGroupClient) and self._client.is_connected:
            self._client.leave(self._acks_filter, timeout_s=min(2.0, timeout / 2))
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._list_wake.set()
        writer = None
        for thread in self._threads:
            if thread.name == "worker-writes":
                writer = thread
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        self._to_write.put(None)  # after the last batch: the writer ends there
        if writer is not None:
            writer.join(max(0.0, deadline - time.monotonic()))
        self._drop_fetched()
        with self._io_lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._disconnect()

    def _drop_fetched(self) -> None:
        """On stop: forget frames fetched and not captioned; delete their outbox markers (best
        effort: a marker left behind is removed by a later listing, as its record is absent)."""
        while True:
            try:
                job = self._ready.get_nowait()
            except queue.Empty:
                return
            self._slots.release()  # a later start() fetches as far ahead again
            with self._lock:
                self._pending.discard(job.key)
            if job.marker is not None and self._store is not None:
                try:
                    self._store.delete(job.marker)
                except StorageError as err:
                    logger.debug("worker: marker %s not deleted at stop: %s", job.marker, err)
                with self._lock:
                    self._open_markers.discard(job.marker)

    @property
    def backlog(self) -> int:
        """Frames queued or in the current batch."""
        with self._lock:
            return len(self._pending)

    # -- finding frames --------------------------------------------------------------------
    def request(self, key: str) -> bool:
        """Queue ``frames/...`` key for captioning unless it is already queued or in a batch."""
        with self._lock:
            if key in self._pending or key in self._bad_keys:
                return False
            self._pending.add(key)
        self._queue.put(key)
        return True

    def _on_ack(self, message: mqtt.MQTTMessage) -> None:
        """MQTT network thread: decode the FrameAck and queue its key; never blocks."""
        try:
            ack = FrameAck.from_json(bytes(message.payload))
        except MessageError as err:
            logger.warning("worker: ignoring a bad ack on %r: %s", message.topic[:200], err)
            return
        if ack.key is None:  # the ingest refused the frame: nothing stored to caption
            self._count("rejections_seen")
            return
        self._count("notified")
        self.request(ack.key)

    def request_full_listing(self, reason: str = "SIGHUP") -> None:
        """Ask for a full listing pass now (the next pass; safe in a signal handler: it only sets
        flags). The pass logs ``worker: full listing pass requested (<reason>)``."""
        self._full_reason = reason
        self._full_due = True
        self._list_wake.set()

    def _on_connected(self, session_present: bool) -> None:
        """MQTT network thread: after a reconnect, list the recent days without cursors (acks
        published while the worker was away went nowhere: a clean session)."""
        if self._connected_once:
            with self._lock:
                self._uncursored_due = True
            logger.info("worker: reconnected to the broker; acks published while it was away are "
                        "lost, so the next listing lists the last %d days without cursors",
                        self.config.recent_days)
            self._list_wake.set()
        self._connected_once = True

    def scan(self, *, full: bool | None = None) -> int:
        """One listing pass: republish the outbox's due records, then queue every listed frame
        without a caption.

        Args:
            full: True for a full pass (every key of frames/ and captions/), False for a periodic
                one (the recent days, from the cursors), None to let the worker choose: full
                for its first pass, when one was asked for (:meth:`request_full_listing`) or
                ``full_list_interval_s`` has passed since the last; else periodic.

        Returns:
            How many keys were queued.
        Raises:
            StorageError: a listing failed (a full pass asked for is then still due).
        """
        with self._scan_lock:
            if full is None:
                every = self.config.full_list_interval_s
                full = self._full_due or (
                    every > 0 and self._last_full_end is not None
                    and time.monotonic() - self._last_full_end >= every)
            reason = None
            if full:  # taken now: a request during the pass asks for another one
                self._full_due = False
                reason, self._full_reason = self._full_reason, None
                if reason:
                    logger.info("worker: full listing pass requested (%s)", reason)
            with self._lock:
                uncursored, self._uncursored_due = self._uncursored_due, False
            kind = "full" if full else ("recent-uncursored" if uncursored else "recent")
            stats = ListingPass(kind)
            started = time.monotonic()
            store = self._require_store()
            try:
                self._republish_outbox(store, stats)
                if full:
                    self._full_pass(store, stats)
                else:
                    self._recent_pass(store, stats, uncursored)
            except BaseException:
                with self._lock:
                    self._uncursored_due = self._uncursored_due or uncursored
                if full:
                    self._full_due = True
                    self._full_reason = self._full_reason or reason
                raise
            stats.seconds = time.monotonic() - started
            if full:
                self._last_full_end = time.monotonic()
            self.last_pass = stats
        self._count("full_passes" if full else "recent_passes")
        self._count("listed", stats.queued)
        metrics.WORKER_LISTING_SECONDS.labels(stats.kind).observe(stats.seconds)
        metrics.WORKER_LISTING_REQUESTS.labels(stats.kind).inc(stats.list_calls)
        args = (stats.kind, stats.list_calls, stats.keys_seen, stats.queued, stats.seconds)
        logger.debug("worker: %s listing pass: %d LIST calls, %d keys seen, %d queued, %.3f s",
                     *args)
        if stats.queued:
            logger.info("worker: %s listing pass found %d frames without captions (%d LIST calls, "
                        "%d keys seen, %.2f s)", stats.kind, stats.queued, stats.list_calls,
                        stats.keys_seen, stats.seconds)
        return stats.queued

    def _window(self) -> tuple[list[str], datetime]:
        """The days a periodic pass lists (``YYYY/MM/DD``, UTC: tomorrow, today and the
        ``recent_days - 1`` before) and the newest LastModified a cursor may pass."""
        now = datetime.now(timezone.utc)
        today = now.date()
        days = [today + timedelta(days=1 - k) for k in range(self.config.recent_days + 1)]
        settled = now - timedelta(seconds=self.config.listing_settle_s)
        return sorted(f"{day:%Y/%m/%d}" for day in days), settled

    def _listing(self, store: ObjectStore, stats: ListingPass, prefix: str,
                 start_after: str | None = None) -> Iterator[ListedObject]:
        """``store.list_pages`` flattened, counting requests and keys into ``stats``."""
        for page in store.list_pages(prefix, start_after=start_after):
            stats.list_calls += 1
            stats.keys_seen += len(page)
            yield from page

    def _full_pass(self, store: ObjectStore, stats: ListingPass) -> None:
        """Stream frames/ against captions/ (merge join), queue the missing, set the cursors of
        the days in the window."""
        days, settled = self._window()
        frames = self._listing(store, stats, FRAMES_PREFIX)
        captions = (item.key for item in self._listing(store, stats, CAPTIONS_PREFIX))
        cursors: dict[str, str] = {}
        self._walk(join_captions(frames, captions), stats, set(days), settled, cursors)
        self._cursors = cursors

    def _recent_pass(self, store: ObjectStore, stats: ListingPass, uncursored: bool) -> None:
        """List the window's days of every device from their cursors (whole days when
        ``uncursored``); queue the missing; move the cursors on, drop the rest."""
        days, settled = self._window()
        with self._lock:  # failed frames of any day, found by an earlier pass or an ack
            retry, self._retry = self._retry, set()
        stats.queued += sum(self.request(key) for key in sorted(retry))
        devices = list(store.list_prefixes(FRAMES_PREFIX))
        stats.list_calls += 1 + len(devices) // 1000
        stats.keys_seen += len(devices)
        cursors: dict[str, str] = {}
        for device in devices:
            for day in days:
                day_prefix = f"{device[len(FRAMES_PREFIX):]}{day}/"
                cursor = None if uncursored else self._cursors.get(day_prefix)
                frames = self._listing(store, stats, FRAMES_PREFIX + day_prefix, cursor)
                captions = (item.key for item in self._listing(
                    store, stats, CAPTIONS_PREFIX + day_prefix,
                    caption_start_after(day_prefix, cursor) if cursor else None))
                found: dict[str, str] = {}
                self._walk(join_captions(frames, captions), stats, {day}, settled, found)
                moved = found.get(day_prefix, cursor)
                if moved is not None:
                    cursors[day_prefix] = moved
        self._cursors = cursors

    def _walk(self, joined: Iterable[tuple[ListedObject, bool]], stats: ListingPass,
              days: set[str], settled: datetime, cursors: dict[str, str]) -> None:
        """Queue each frame of ``joined`` without a caption; for the frames of ``days``, set
        ``cursors[day_prefix]`` to the last frame of the day up to which every frame has its
        caption (or can never have one: a key outside the contract) and was stored no later
        than ``settled``."""
        current: str | None = None
        blocked = False
        for item, captioned in joined:
            done = captioned or self._missing(item.key, stats)
            where = _day_prefix(item.key)
            if where is None or where[1] not in days:
                continue
            if where[0] != current:
                current, blocked = where[0], False
            if blocked:
                continue
            if done and item.last_modified is not None and item.last_modified <= settled:
                cursors[current] = item.key
            else:
                blocked = True

    def _missing(self, key: str, stats: ListingPass) -> bool:
        """A listed frame without a caption: queue it. True if it never needs one (a folder
        marker, a key outside the contract: logged once)."""
        if key.endswith("/") or key in self._bad_keys:
            return True
        try:  # an impossible date still names a caption key: it gets an error record
            parse_frame_key(key, check_date=False)
        except InvalidIdError as err:
            self._bad_key(key, str(err))
            return True
        if self.request(key):
            stats.queued += 1
        return False

    def _on_published(self, mid: int) -> None:
        """MQTT network thread: a publish was acknowledged; its marker can go (batch thread)."""
        self._outbox.acknowledged(mid)

    def _on_publish_refused(self, mid: int, reason: str) -> None:
        """MQTT network thread: the broker refused a caption publish; its marker stays."""
        self._count("publish_refused")
        marker = self._outbox.refused(mid)
        logger.info("worker: caption publish %s refused by the broker (%s): not delivered; its "
                    "outbox marker stays and a later listing publishes it again",
                    caption_key_of(marker) if marker else f"mid {mid}", reason)

    def _publish_caption(self, device_id: str, body: bytes, marker: str) -> None:
        """Publish a caption record at QoS 1; its outbox marker is deleted on the PUBACK."""
        if self._client is None:  # no MQTT (batch use): nothing to wait for
            self._outbox.done(marker)
            return
        info = self._client.publish(self.topics.captions(device_id), body, qos=1)
        self._outbox.published(info.mid, marker)

    def _await_pubacks(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``, not while disconnected) for the PUBACKs of the captions
        published so far, so their outbox markers go now, not a batch later."""
        deadline = time.monotonic() + timeout_s
        while self._client is not None and self._client.is_connected and time.monotonic() < deadline:
            if not self._outbox.waiting():
                return
            time.sleep(0.005)

    def _clear_outbox(self) -> None:
        """Delete the markers of acknowledged publishes (batch thread)."""
        self._outbox.clear(self._require_store())

    def _republish_outbox(self, store: ObjectStore, stats: ListingPass) -> None:
        """Republish records whose publish was never acknowledged (see cloud/outbox.py).

        Markers of frames this worker is captioning now (written, record not yet published)
        are not due: their record may not exist yet."""
        listed = {item.key for item in self._listing(store, stats, OUTBOX_PREFIX)}
        with self._lock:
            listed -= self._open_markers
        for marker in self._outbox.due(listed):
            caption_key = caption_key_of(marker)
            if not caption_key:
                logger.error("worker: outbox marker %r names no caption; dropping it", marker[:300])
                store.delete(marker)
                continue
            try:
                body = store.get(caption_key)
                record = CaptionRecord.from_json(body)
            except ObjectNotFoundError:  # killed before the record was written: not captioned
                store.delete(marker)
                continue
            except MessageError as err:
                logger.error("worker: outbox %s: record unreadable (%s); dropping it", marker, err)
                store.delete(marker)
                continue
            logger.warning("worker: frame %s of device %s: caption written but its publish not "
                           "acknowledged (a worker died, or the broker refused it); publishing "
                           "it again",
                           record.frame_id, record.device_id)
            self._count("republished")
            self._publish_caption(record.device_id, body, marker)

    def _publish_existing(self, caption_key: str, marker: str) -> None:
        """Publish the stored record ``caption_key`` whose marker ``marker`` is still there; the
        PUBACK deletes the marker (an unreadable record: the marker goes, with an error log)."""
        try:
            body = self._s3(lambda s: s.get_object(caption_key).body, f"reading {caption_key}")
            record = CaptionRecord.from_json(body)
        except (ObjectNotFoundError, MessageError) as err:
            logger.error("worker: outbox %s: record unreadable (%s); dropping the marker", marker, err)
            self._s3(lambda s: s.delete(marker), f"deleting {marker}")
        else:
            logger.warning("worker: frame %s of device %s: caption written by an earlier run but its "
                           "publish not acknowledged; publishing it again", record.frame_id, record.device_id)
            self._count("republished")
            self._publish_caption(record.device_id, body, marker)
        with self._lock:
            self._open_markers.discard(marker)

    def _bad_key(self, key: str, reason: str) -> None:
        with self._lock:
            self._bad_keys.add(key)
        self._count("bad_keys")
        logger.error(
            "worker: cannot caption %r: %s (no caption key can be derived)", key[:300], reason
        )

    def _list_loop(self) -> None:
        """A listing pass every ``list_interval_s`` (sooner when one is asked for); S3 outages
        retried with backoff."""
        delays = retry_delays(1.0, self.config.list_interval_s)
        while not self._stop.is_set():
            self._list_wake.clear()  # a request during the pass makes the next one start at once
            try:
                self.scan()
                wait = self.config.list_interval_s
                delays = retry_delays(1.0, self.config.list_interval_s)
                self._s3_back()
            except StorageError as err:
                doing = f"{err.action} (a listing pass)"
                verdict = self._s3_permanent(doing, err)
                if verdict == "failed":
                    return
                if verdict == "outage":
                    self._s3_failed(doing, err)
                wait = next(delays)
            except Exception:  # noqa: BLE001 - keep listing whatever happens
                logger.exception("worker: listing failed")
                wait = self.config.list_interval_s
            self._list_wake.wait(wait)

    # -- the pipeline: fetch -> model -> write ---------------------------------------------------
    def _pool(self, stage: str) -> ThreadPoolExecutor:
        """The S3 thread pool of ``stage``: ``fetch`` (frames), ``aux`` (the requests of one
        frame a fetch sends at once) or ``write`` (records); one each, so writes never queue
        behind prefetches and a fetch never waits for a thread of its own pool."""
        with self._io_lock:
            pool = self._pools.get(stage)
            if pool is None:
                size = self._io_threads if stage == "fetch" else 2 * self._io_threads
                pool = ThreadPoolExecutor(size, thread_name_prefix=f"worker-{stage}")
                self._pools[stage] = pool
            return pool

    def _feed_loop(self) -> None:
        """Fetch queued keys on the pool, at most ``prefetch`` ahead of the model."""
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            while not self._slots.acquire(timeout=POLL_S):
                if self._stop.is_set():
                    with self._lock:
                        self._pending.discard(key)
                    return
            with self._lock:
                self._fetching += 1
            try:
                self._pool("fetch").submit(self._fetch, key)
            except RuntimeError:  # the pool is shut down: stopping
                with self._lock:
                    self._fetching -= 1
                    self._pending.discard(key)
                self._slots.release()
                return

    def _fetch(self, key: str) -> None:
        """Pool thread: prepare one frame for the model; hand it on, or let the key go."""
        job = None
        try:
            job = self._prepare(key)
        except Stopping:
            pass
        except Exception:  # noqa: BLE001 - one bad frame must never stop the worker
            logger.exception("worker: fetching %s failed; the next listing retries it", key[:300])
            with self._lock:
                self._retry.add(key)
        finally:
            if job is not None:
                self._ready.put(job)
            with self._lock:
                self._fetching -= 1
                if job is None:
                    self._pending.discard(key)
            if job is None:
                self._slots.release()

    def _next_batch(self) -> list[_Job]:
        """Fetched frames for the model (at most ``batch_size``): block for the first (in
        POLL_S slices), take what else is fetched, and wait (at most ``max_wait_s`` after the
        first) only while more frames are being fetched or queued."""
        try:
            jobs = [self._ready.get(timeout=POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.config.max_wait_s
        while len(jobs) < self.config.batch_size:
            try:
                jobs.append(self._ready.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            with self._lock:
                coming = self._fetching > 0
            if left <= 0 or not (coming or not self._queue.empty()):
                break
            try:
                jobs.append(self._ready.get(timeout=min(left, 0.02)))
            except queue.Empty:
                continue
        return jobs

    def _batch_loop(self) -> None:
        """Run the model on fetched frames; hand each batch to the writer."""
        while not self._stop.is_set():
            jobs = self._next_batch()
            if not jobs:
                continue
            for _ in jobs:
                self._slots.release()
            try:
                ready = [job for job in jobs if job.image is not None]
                if ready:
                    self._caption(ready)
            except Exception:  # noqa: BLE001 - _caption isolates the model; this is a bug
                logger.exception("worker: batch of %d failed", len(jobs))
            for job in jobs:
                job.image = None  # the pixels are not needed any more
            self._to_write.put(jobs)

    def _write_loop(self) -> None:
        """Write and publish the records of captioned batches; delete acknowledged markers."""
        while True:
            try:
                jobs = self._to_write.get(timeout=POLL_S)
            except queue.Empty:
                jobs = []
            if jobs is None:
                return
            try:
                if jobs:
                    self._write_batch(jobs)
                else:
                    self._clear_outbox()
            except Stopping:
                return
            except Exception:  # noqa: BLE001 - one bad batch must never stop the worker
                logger.exception(
                    "worker: writing a batch of %d failed; the next listing retries it", len(jobs)
                )
                with self._lock:
                    self._retry.update(job.key for job in jobs or [])
            finally:
                with self._lock:
                    self._pending.difference_update(job.key for job in jobs or [])

    def _on_pool(self, stage: str, call: Callable[[str], _Job | None] | Callable[[_Job], None],
                 items: Sequence[object]) -> list[object]:
        """``call`` on each item on ``stage``'s pool (one item: on this thread); results in
        order.

        Raises:
            whatever a call raised (the first, in order), after all have ended.
        """
        if len(items) == 1:
            return [call(items[0])]  # type: ignore[arg-type]
        futures: list[Future[Any]] = [
            self._pool(stage).submit(call, item) for item in items  # type: ignore[arg-type]
        ]
        return _results(futures)

    def _write_batch(self, jobs: Sequence[_Job]) -> None:
        """Write and publish the jobs' records (in parallel), then wait briefly for the PUBACKs
        so their markers go now.

        Raises:
            Stopping: :meth:`stop` was called while S3 was down.
        """
        self._on_pool("write", self._finish, jobs)
        self._await_pubacks(2.0)
        self._clear_outbox()

    def process_batch(self, keys: Sequence[str]) -> None:
        """Caption ``keys`` (``frames/...``) and write and publish their records, in the
        calling thread (the S3 requests of different frames in parallel).

        Raises:
            Stopping: :meth:`stop` was called while S3 was down.
        """
        prepared = self._on_pool("fetch", self._prepare, keys)
        jobs = [job for job in prepared if isinstance(job, _Job)]
        ready = [job for job in jobs if job.image is not None]
        if ready:
            self._caption(ready)
        self._write_batch(jobs)

    def _prepare(self, key: str) -> _Job | None:
        """Parse and check one frame, fetch and decode it and write its outbox marker; None
        when there is nothing to do (a bad key, a caption already written, a vanished object).

        The three S3 requests (caption exists? the object, the marker) go out at once: a frame
        waits one round trip, not three. A marker written for a frame that needs none is
        deleted again.

        Raises:
            Stopping: :meth:`stop` was called while S3 was down.
        """
        try:
            frame = parse_frame_key(key, check_date=False)
        except InvalidIdError as err:
            self._bad_key(key, str(err))
            return None
        marker = self._outbox.marker(frame.caption_key)
        with self._lock:  # before the put: a listing meanwhile must not take it as due
            self._open_markers.add(marker)
        aux = self._pool("aux")
        date_error = frame.date_error()
        # If-None-Match: a marker already there is this worker's own from an earlier run that
        # wrote the record and died before its publish was acknowledged (see below)
        requests: list[Future[Any]] = [
            aux.submit(self._s3, lambda s: s.put_if_absent(marker, b""), f"writing {marker}")]
        if date_error is None:
            requests.append(aux.submit(self._s3, lambda s: _get_or_none(s, key), f"reading {key}"))
        try:
            exists = self._s3(lambda s: s.exists(frame.caption_key),
                              f"looking for {frame.caption_key}")
        finally:
            results = _results(requests)
        found: StoredObject | None = results[1] if date_error is None else None
        if exists and results[0] is False:
            # the record is written and an earlier run's marker says its publish was never
            # acknowledged: publish it now (what the listing's outbox pass would do); deleting
            # the marker here would lose that caption for the device
            self._publish_existing(frame.caption_key, marker)
            return None
        if exists or (date_error is None and found is None):
            if exists:
                self._count("skipped")
                metrics.WORKER_FRAMES.labels("skipped").inc()
            else:
                logger.warning("worker: frame %s of device %s: %s vanished",
                               frame.frame_id, frame.device_id, key)
            self._s3(lambda s: s.delete(marker), f"deleting {marker}")
            with self._lock:
                self._open_markers.discard(marker)
            return None
        job = _Job(key, frame, error=date_error, marker=marker)
        if found is None:
            return job  # an impossible date: an error record
        data = found.body
        job.captured_at = captured_at_from(found.metadata, frame)
        if len(data) > self.config.max_frame_bytes:
            job.error = f"object is {len(data)} bytes, more than {self.config.max_frame_bytes}"
            return job
        try:
            job.image = decode_image(data, self.config.max_pixels)
        except ValueError as err:
            job.error = str(err)
        return job

    def _caption(self, jobs: list[_Job]) -> None:
        """Run the model on the jobs' images; a frame the model fails on gets ``error``."""
        assert self.captioner is not None
        started = time.monotonic()
        try:
            images = [job.image for job in jobs if job.image is not None]
            results: list[tuple[str, float | None]] = list(self.captioner.caption_images(images))
            if len(results) != len(jobs):
                raise RuntimeError(
                    f"captioner returned {len(results)} results for {len(jobs)} images"
                )
        except Exception as err:  # noqa: BLE001 - isolate the frame that breaks the model
            logger.warning(
                "worker: batch of %d failed in the model (%s); one by one", len(jobs), err
            )
            results = [self._caption_one(job) for job in jobs]
        seconds = time.monotonic() - started
        metrics.WORKER_BATCH_SECONDS.observe(seconds)
        self._count("batches")
        logger.info(
            "worker: captioned a batch of %d in %.2f s (%.0f ms per frame)",
            len(jobs),
            seconds,
            1000 * seconds / len(jobs),
        )
        for job, (caption, score) in zip(jobs, results, strict=True):
            job.caption, job.score = caption, score

    def _caption_one(self, job: _Job) -> tuple[str, float | None]:
        assert self.captioner is not None and job.image is not None
        try:
            return self.captioner.caption_images([job.image])[0]
        except Exception as err:  # noqa: BLE001
            job.error = f"captioning failed: {type(err).__name__}: {err}"[:500]
            return "", None

    def _finish(self, job: _Job) -> None:
        """Write the job's record if absent and publish it if this worker wrote it."""
        frame = job.frame
        error = job.error
        record = CaptionRecord(
            frame_id=frame.frame_id,
            device_id=frame.device_id,
            captured_at=job.captured_at,
            caption="" if error else job.caption,
            score=None if error else job.score,
            model=self.captioner.name if self.captioner is not None else "unknown",
            frame_key=job.key,
            caption_key=frame.caption_key,
            error=error,
        )
        body = record.to_json()
        marker = job.marker or self._outbox.marker(frame.caption_key)
        if job.marker is None:
            with self._lock:
                self._open_markers.add(marker)
            self._s3(lambda s: s.put(marker, b""), f"writing {marker}")
        created = self._s3(
            lambda s: s.put_if_absent(frame.caption_key, body, content_type=JSON_CONTENT_TYPE),
            f"writing {frame.caption_key}",
        )
        result = "skipped" if not created else ("error" if error else "captioned")
        self._count({"skipped": "skipped", "error": "errors", "captioned": "captioned"}[result])
        metrics.WORKER_FRAMES.labels(result).inc()
        if not created:
            self._s3(lambda s: s.delete(marker), f"deleting {marker}")
            with self._lock:
                self._open_markers.discard(marker)
            logger.info(
                "worker: frame %s of device %s: caption already written",
                frame.frame_id,
                frame.device_id,
            )
            return
        if error:
            logger.warning(
                "worker: frame %s of device %s (%s): error record: %s",
                frame.frame_id,
                frame.device_id,
                job.key,
                error,
            )
        else:
            logger.info(
                "worker: frame %s of device %s: %r (score %.2f)",
                frame.frame_id,
                frame.device_id,
                record.caption,
                record.score,
            )
        self._publish_caption(frame.device_id, body, marker)
        with self._lock:  # the outbox tracks it from here
            self._open_markers.discard(marker)


def get_args_parser() -> argparse.ArgumentParser:
    """The ``framecap worker`` parser: :func:`~cloud.service.add_common_arguments` and the model's."""
    parser = argparse.ArgumentParser(
        prog="framecap worker",
        description="Caption every frame under frames/ in S3: write captions/ and send each "
        "caption to its device over MQTT. Options override the YAML config. SIGHUP asks for a "
        "full listing pass (every key of frames/ and captions/; periodic ones list recent days).",
    )
    add_common_arguments(parser)
    parser.add_argument("--model", metavar="CHECKPOINT",
                        help="override model, a checkpoint (default: the packaged model)")
    parser.add_argument("--device", type=device_arg,
                        help="override device: auto (cuda when a GPU is visible), cpu, cuda or "
                             "cuda:N (default: auto)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        help="override precision of the model: auto (fp16 on CUDA, fp32 on a "
                             "CPU), fp32, bf16, fp16 (CUDA only) or int8 (CPU only: the decoder "
                             "quantized) (default: auto)")
    parser.add_argument("--beam-size", type=int, metavar="N", help="override beam_size (default: 3)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="override batch_size, most frames per model batch (default: 8)")
    parser.add_argument("--list-interval", type=float, metavar="S",
                        help="override list_interval_s: list the recent days of frames/ every S "
                             "seconds to catch up (default: 30)")
    parser.add_argument("--recent-days", type=int, metavar="N",
                        help="override recent_days: UTC days a periodic listing looks at, today "
                             "and the N-1 before, and tomorrow (default: 2)")
    parser.add_argument("--full-list-interval", type=float, metavar="S",
                        help="override full_list_interval_s: list every key of frames/ and "
                             "captions/ every S seconds; 0 only at start and on SIGHUP (default: 0)")
    parser.add_argument("--listing-settle", type=float, metavar="S",
                        help="override listing_settle_s: a periodic listing resumes after frames "
                             "captioned and stored at least S seconds ago (default: 600)")
    return parser


def install_full_listing_signal(worker: CaptionWorker) -> Any:
    """Make SIGHUP ask ``worker`` for a full listing pass; returns the previous handler (None
    where the platform has no SIGHUP). Call from the main thread."""
    if not hasattr(signal, "SIGHUP"):
        return None
    return signal.signal(signal.SIGHUP, lambda *_: worker.request_full_listing("SIGHUP"))


def main(argv: Sequence[str] | None = None) -> int:
    """``framecap worker``; 0 after SIGINT/SIGTERM, 1 if the model cannot load, 2 on a bad config
    (also a file it names that is missing, a device this machine lacks, a busy metrics port)."""
    from cloud.service import start_metrics
    from common.cli import check_checkpoint, check_device, error_line
    from common.config import missing_files

    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)
    overrides = common_overrides(args) | {
        "model": args.model,
        "device": args.device,
        "precision": args.precision,
        "beam_size": args.beam_size,
        "batch_size": args.batch_size,
        "list_interval_s": args.list_interval,
        "recent_days": args.recent_days,
        "full_list_interval_s": args.full_list_interval,
        "listing_settle_s": args.listing_settle,
    }
    try:
        config = load_config(WorkerConfig, args.config, overrides)
    except ConfigError as err:
        print(f"framecap worker: invalid config:\n{err}", file=sys.stderr)
        return 2
    if args.validate_config:
        problems = missing_files(config)
        if problems:
            print("framecap worker: invalid config:\n" + "\n".join(problems), file=sys.stderr)
            return 2
        print("framecap worker: config OK")
        return 0
    problem = check_device(config.device)
    if problem is None:
        from cloud.captioning.caption import check_precision

        problem = check_precision(config.precision, config.device)
    if problem is not None:
        print(f"framecap worker: {problem}", file=sys.stderr)
        return 2
    problem = check_checkpoint(config.model) if config.model is not None else None
    if problem is not None:
        print(f"framecap worker: cannot load the model: {problem}", file=sys.stderr)
        return 1
    try:
        captioner = load_captioner(config)
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        print(
            f"framecap worker: cannot load the model {config.model or '(default)'}: {error_line(err)}",
            file=sys.stderr,
        )
        return 1
    problem = start_metrics(config.metrics_port)
    if problem is not None:
        print(f"framecap worker: {problem}", file=sys.stderr)
        return 2
    worker = CaptionWorker(config, captioner)
    install_full_listing_signal(worker)
    return run_until_signal(worker, "worker")
