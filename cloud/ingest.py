"""``framecap ingest``: frames from MQTT into S3, then the acks (../shared/DESIGN.md, Ingest).

Each replica subscribes to ``$share/{share_group}/{prefix}/+/frames`` (MQTT v5 shared
subscription, 4.8.2) so replicas split the load, with a clean session (a replaced replica
strands nothing in the broker; see :mod:`cloud.service`) and manual acks. At start it probes
S3 (credentials, bucket) and refuses to start on an error no retry heals. On stop it first
leaves the share group (UNSUBSCRIBE), so new frames go to the other replicas, then stores and
acks the frames it already received, then disconnects. The paho callback only enqueues; a pool
of ``io_threads`` threads validates each frame and puts it under
``frames/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.jpg`` with ``If-None-Match: *`` (a redelivered
frame never makes a second object nor replaces the bytes), several frames at once (issue 9: one
S3 round trip at a time capped the ingest); THEN one thread, taking the frames in the order
their PUBLISHes arrived, sends each MQTT PUBACK (in that order, MQTT 5.0, 4.6) and publishes a
:class:`~common.messages.FrameAck` on ``{prefix}/{device_id}/acks`` at QoS 1 (the worker's
persistent session reads the acks too: it must not lose one while it restarts). The in-memory
queue is bounded by the broker: it sends at most its in-flight limit of unacked QoS 1 messages
(mosquitto ``max_inflight_messages``).

While S3 is down a frame is retried with backoff, never acked and never dropped; the outage is
logged once. A permanent S3 error (credentials, access, a missing bucket that
``s3.create_bucket`` does not allow to create) stops the service with the cause (exit 1); the
frame stays unacked. An invalid frame is logged with device, frame and reason, counted, acked (so the
broker does not redeliver it forever) and skipped; when it names its frame_id, the device is sent a
:class:`~common.messages.FrameAck` with ``rejected`` (the reason), so that it drops the frame
instead of resending it for ever (except for an unknown schema version: an upgraded ingest will
take that frame).
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from cloud import metrics
from cloud.service import (
    CloudService,
    ShareGroupClient,
    Stopping,
    add_common_arguments,
    common_overrides,
    open_store,
    run_until_signal,
    setup_logging,
)
from cloud.validation import InvalidFrame, ValidFrame, validate_frame
from common.config import ConfigError, IngestConfig, load_config
from common.messages import FrameAck
from common.storage import ObjectNotFoundError, ObjectStore, StorageError

# Refusals a device should not take as final: the frame may be taken later (a newer schema).
RETRYABLE_REFUSALS = frozenset({"schema_version"})
REJECTIONS_PER_S = 10.0  # rejections published per device and second, sustained
REJECTIONS_BURST = 50  # ... and at once
REJECTION_DEVICES = 10_000  # devices whose budget is remembered (the least recent forgotten)


class RejectionBudget:
    """A token bucket per device for the rejections the ingest publishes: a device (or an
    account allowed to publish under many device ids) that floods invalid frames gets at most
    ``burst`` rejections at once and ``per_s`` a second after that, so the ingest's publishes,
    the broker's fan-out and the worker's reads do not grow with the flood. A frame whose
    rejection is held back is resent by its device later and rejected then. Remembers at most
    ``devices`` devices (the least recently refused is forgotten: its bucket starts full again).
    Thread-safe."""

    def __init__(self, per_s: float = REJECTIONS_PER_S, burst: int = REJECTIONS_BURST,
                 devices: int = REJECTION_DEVICES, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self.devices, self._clock = per_s, burst, devices, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def take(self, device_id: str) -> bool:
        """Spend one rejection of ``device_id``'s budget; False if none is left."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.pop(device_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
            allowed = tokens >= 1.0
            self._buckets[device_id] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.devices:
                self._buckets.popitem(last=False)
            return allowed

logger = logging.getLogger(__name__)

JPEG_CONTENT_TYPE = "image/jpeg"
DRAIN_QUIET_S = 0.3  # on stop, after leaving the share group: a pause this long ends the drain
IO_THREADS = 8  # frames validated and stored at once


@dataclass
class _Inbound:
    """A frame message as received, waiting for the worker thread."""

    topic: str
    payload: bytes
    user_properties: list[tuple[str, str]]
    mid: int
    qos: int
    generation: int
    received_at: float = field(default_factory=time.monotonic)


# what became of a frame: refused (why), or stored / duplicate / conflict, with the frame
_Outcome = InvalidFrame | tuple[str, ValidFrame]


class IngestService(CloudService):
    """Stores MQTT frames in S3 and acknowledges them; see the module docstring.

    Args:
        config: broker, bucket, share group and the payload limits.
        store: the object store (tests pass a fake); opened from ``config.s3`` at
            :meth:`start` when None.
        client_id: MQTT client_id; default ``config.mqtt.client_id``, else
            :func:`default_client_id`.
        io_threads: frames validated and stored in S3 at once.

    Attributes:
        counters: (property) a snapshot: ``received``, ``stored``, ``duplicates``,
            ``conflicts``, ``invalid``, ``invalid.{reason}``, ``s3_errors``, ``acks_published``,
            ``rejections_published``, ``rejections_suppressed``.
    """

    def __init__(
        self,
        config: IngestConfig,
        *,
        store: ObjectStore | None = None,
        client_id: str | None = None,
        io_threads: int | None = None,
    ) -> None:
        io_threads = config.io_threads if io_threads is None else io_threads
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        super().__init__(
            "ingest",
            config.mqtt,
            store=store,
            client_id=client_id,
            s3_errors=metrics.INGEST_S3_ERRORS,
            create_bucket=config.s3.create_bucket,
        )
        self.config = config
        self._frames_filter = self.topics.shared(config.share_group, "frames")
        self._last_received = 0.0  # time.monotonic() of the last frame received
        self._queue: queue.Queue[_Inbound | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._acker: threading.Thread | None = None
        self._io_threads = io_threads
        self._pool: ThreadPoolExecutor | None = None
        # frames in the order they arrived, with their validation and S3 outcome to come
        self._in_order: queue.Queue[tuple[_Inbound, Future[_Outcome]] | None] = queue.Queue()
        self._generation = 0
        self._busy = 0  # frames received and not yet handled (queued or in hand)
        self._rejections = RejectionBudget()  # per device: a flood of bad frames is not echoed

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Open and probe the store, start the worker thread and connect; returns at once.

        Raises:
            StorageError: S3 refuses this service (credentials, access, a missing bucket not
                created; ``permanent``), or the store cannot be opened.
        """
        if self._store is None:
            self._store = open_store(self.config.s3, "ingest")
        client = ShareGroupClient(self.config.mqtt, self.client_id, manual_ack=True)
        client.on_connected(self._on_connected)
        client.share(self._frames_filter, self._on_message, 1)
        self._client = client
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="ingest-s3")
        self._thread = threading.Thread(target=self._run, name="ingest-worker", daemon=True)
        self._acker = threading.Thread(target=self._ack_loop, name="ingest-acks", daemon=True)
        self._thread.start()
        self._acker.start()
        client.start()
        logger.info(
            "ingest %s: started (bucket %s, share group %s)",
            self.client_id,
            self.config.s3.bucket,
            self.config.share_group,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Leave the share group, store and ack the frames already received, stop the worker
        thread and disconnect; at most ``timeout`` seconds in all.

        A frame not stored by then (S3 down) stays unacked: the broker drops it with the
        session and the edge, which has no ack for it, sends it again.
        """
        deadline = time.monotonic() + timeout
        client = self._client
        if isinstance(client, ShareGroupClient) and client.is_connected and self.failure is None:
            left = client.leave(self._frames_filter, timeout_s=min(2.0, timeout / 2))
            logger.info("ingest %s: left share group %s (%s); storing the %d frames received",
                        self.client_id, self.config.share_group,
                        "confirmed" if left else "no answer", self.backlog)
            self._drain(deadline)
        self._stop.set()
        self._queue.put(None)
        for thread in (self._thread, self._acker):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._disconnect()

    def _drain(self, deadline: float) -> None:
        """Wait until the frames received are handled and none came for DRAIN_QUIET_S (the
        broker may still send what it had queued for this client), or until ``deadline``."""
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            with self._lock:
                idle = self._busy == 0 and self._queue.empty()
                quiet = time.monotonic() - self._last_received >= DRAIN_QUIET_S
            if idle and quiet:
                return
            time.sleep(0.02)

    @property
    def backlog(self) -> int:
        """Frames received and not yet handled."""
        return self._queue.qsize()

    # -- MQTT network thread: enqueue only -------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        with self._lock:
            self._generation += 1

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        props = getattr(message.properties, "UserProperty", None) or []
        with self._lock:
            generation = self._generation
            self._last_received = time.monotonic()
            self._busy += 1
        self._queue.put(
            _Inbound(
                message.topic,
                bytes(message.payload),
                list(props),
                message.mid,
                message.qos,
                generation,
            )
        )

    # -- worker threads ----------------------------------------------------------------
    def _run(self) -> None:
        """Hand each received frame to the pool, and to the acker in arrival order."""
        assert self._pool is not None
        try:
            while not self._stop.is_set():
                item = self._queue.get()
                if item is None:
                    break
                try:
                    future = self._pool.submit(self._check_and_store, item)
                except RuntimeError:  # the pool is shut down: stopping
                    break
                self._in_order.put((item, future))
        finally:
            self._in_order.put(None)

    def _ack_loop(self) -> None:
        """PUBACK and FrameAck each frame once stored, in the order the frames arrived."""
        while True:
            entry = self._in_order.get()
            if entry is None:
                return
            item, future = entry
            try:
                self._conclude(item, future.result())
            except Stopping:
                return  # S3 down at stop: this frame and the later ones stay unacked
            except Exception:  # noqa: BLE001 - one bad frame must never stop the service
                logger.exception("ingest: unexpected error on a message from %s", item.topic)
            finally:
                with self._lock:
                    self._busy -= 1

    def handle(self, item: _Inbound) -> None:
        """Validate, store, ack and acknowledge one received frame (in the calling thread).

        Raises:
            Stopping: :meth:`stop` was called while S3 was down (the frame stays unacked).
        """
        self._conclude(item, self._check_and_store(item))

    def _check_and_store(self, item: _Inbound) -> _Outcome:
        """Validate one frame and store it if valid (a pool thread).

        Raises:
            Stopping: :meth:`stop` was called while S3 was down.
        """
        self._count("received")
        try:
            frame = validate_frame(
                item.topic,
                item.payload,
                item.user_properties,
                topics=self.topics,
                max_payload_bytes=self.config.max_payload_bytes,
                max_pixels=self.config.max_pixels,
            )
        except InvalidFrame as bad:
            return bad
        return self._store_frame(frame), frame

    def _conclude(self, item: _Inbound, outcome: _Outcome) -> None:
        """Count, PUBACK and (for a stored frame) publish the FrameAck of one frame."""
        if isinstance(outcome, InvalidFrame):
            self._refuse(item, outcome)
            return
        result, frame = outcome
        self._count(
            {"stored": "stored", "duplicate": "duplicates", "conflict": "conflicts"}[result]
        )
        metrics.INGEST_FRAMES.labels(result).inc()
        self._mqtt_ack(item)
        self._publish_ack(frame)

    def _refuse(self, item: _Inbound, bad: InvalidFrame) -> None:
        logger.warning(
            "ingest: refused frame %s of device %s (%d bytes on %r): %s: %s",
            bad.frame_id or "?",
            bad.device_id or "?",
            len(item.payload),
            item.topic[:200],
            bad.reason,
            bad.detail,
        )
        self._count("invalid")
        self._count(f"invalid.{bad.reason}")
        metrics.INGEST_FRAMES.labels("invalid").inc()
        metrics.INGEST_INVALID.labels(bad.reason).inc()
        self._mqtt_ack(item)
        self._publish_rejection(bad)

    def _publish_rejection(self, bad: InvalidFrame) -> None:
        """Tell the device that sent ``bad`` not to send it again (a :class:`FrameAck` with
        ``rejected``), when the frame itself is at fault and names its frame_id: not for a
        message without usable metadata (nothing to name) nor for an unknown schema version
        (a newer device: an upgraded ingest will take the frame, so the device keeps it)."""
        if (bad.reason in RETRYABLE_REFUSALS or bad.device_id is None or bad.frame_id is None
                or self._client is None):
            return
        try:
            reason = "".join(c if c.isprintable() else "?" for c in f"{bad.reason}: {bad.detail}")
            ack = FrameAck(device_id=bad.device_id, frame_id=bad.frame_id, rejected=reason[:400])
        except ValueError:  # pydantic: a frame_id or device_id that is not a valid id: nobody to tell
            return
        if not self._rejections.take(ack.device_id):
            # over the device's budget: it resends the frame later and is told then
            self._count("rejections_suppressed")
            return
        info = self._client.publish(self.topics.acks(ack.device_id), ack.to_json(), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            logger.warning("ingest: rejection of frame %s of device %s not queued (rc %s)",
                           ack.frame_id, ack.device_id, info.rc)
            return
        self._count("rejections_published")

    def _mqtt_ack(self, item: _Inbound) -> None:
        if item.qos == 0 or self._client is None:
            return
        with self._lock:
            same_connection = item.generation == self._generation
        if not same_connection:
            # Its packet id belongs to a lost connection; the broker redelivers the message.
            logger.debug("ingest: not acking mid %d from an earlier connection", item.mid)
            return
        self._client.ack(item.mid, item.qos)

    def _publish_ack(self, frame: ValidFrame) -> None:
        meta = frame.metadata
        ack = FrameAck(device_id=meta.device_id, frame_id=meta.frame_id, key=frame.key)
        if self._client is None:
            return
        info = self._client.publish(self.topics.acks(meta.device_id), ack.to_json(), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            logger.warning(
                "ingest: ack of frame %s of device %s not queued (rc %s)",
                meta.frame_id,
                meta.device_id,
                info.rc,
            )
            return
        self._count("acks_published")

    # -- S3 --------------------------------------------------------------------------------
    def _store_frame(self, frame: ValidFrame) -> str:
        """Put the frame if absent, retrying while S3 fails.

        Returns:
            ``stored``, ``duplicate`` (same bytes already there) or ``conflict`` (other
            bytes already under the key; they are kept).
        Raises:
            Stopping: :meth:`stop` was called before S3 answered.
        """
        meta = frame.metadata
        doing = f"storing frame {meta.frame_id} of device {meta.device_id} ({frame.key})"
        created, existing = self._s3(lambda store: self._put_frame(store, frame), doing)
        if created:
            logger.info(
                "ingest: stored frame %s of device %s as %s",
                meta.frame_id,
                meta.device_id,
                frame.key,
            )
            return "stored"
        return self._compare_existing(frame, existing)

    @staticmethod
    def _put_frame(store: ObjectStore, frame: ValidFrame) -> tuple[bool, dict[str, str] | None]:
        """``(created, None)``, or ``(False, metadata of the object already there)``.

        Raises:
            StorageError: S3 failed, or the object a refused put found has vanished.
        """
        created = store.put_if_absent(
            frame.key,
            frame.payload,
            metadata=frame.metadata.to_s3_metadata(),
            content_type=JPEG_CONTENT_TYPE,
        )
        if created:
            return True, None
        try:
            return False, store.head_metadata(frame.key)
        except ObjectNotFoundError as err:
            raise StorageError(
                "head_object", store.bucket, frame.key, "gone after a refused put"
            ) from err

    def _compare_existing(self, frame: ValidFrame, existing: dict[str, str] | None) -> str:
        meta = frame.metadata
        theirs = (existing or {}).get("sha256")
        if theirs == meta.sha256:
            logger.info(
                "ingest: frame %s of device %s already stored (redelivery)",
                meta.frame_id,
                meta.device_id,
            )
            return "duplicate"
        logger.error(
            "ingest: conflict: frame %s of device %s: %s already holds other bytes "
            "(sha256 %s, received %s); keeping the stored object",
            meta.frame_id,
            meta.device_id,
            frame.key,
            (theirs or "unknown")[:12],
            meta.sha256[:12],
        )
        return "conflict"


def get_args_parser() -> argparse.ArgumentParser:
    """The ``framecap ingest`` parser: :func:`~cloud.service.add_common_arguments`."""
    parser = argparse.ArgumentParser(
        prog="framecap ingest",
        description="Store the frames devices publish over MQTT in S3 (frames/) and acknowledge "
        "each to its device. Options override the YAML config.",
    )
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``framecap ingest``; returns 0 after SIGINT/SIGTERM, 2 on a bad config (also a TLS file
    it names that is missing, a busy metrics port)."""
    from cloud.service import start_metrics
    from common.config import missing_files

    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = load_config(IngestConfig, args.config, common_overrides(args))
    except ConfigError as err:
        print(f"framecap ingest: invalid config:\n{err}", file=sys.stderr)
        return 2
    if args.validate_config:
        problems = missing_files(config)
        if problems:
            print("framecap ingest: invalid config:\n" + "\n".join(problems), file=sys.stderr)
            return 2
        print("framecap ingest: config OK")
        return 0
    problem = start_metrics(config.metrics_port)
    if problem is not None:
        print(f"framecap ingest: {problem}", file=sys.stderr)
        return 2
    return run_until_signal(IngestService(config), "ingest")
