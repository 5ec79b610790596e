"""``framecap ingest``: frames from MQTT into S3, then the acks (../shared/DESIGN.md, Ingest).

Each replica subscribes to ``$share/{share_group}/{prefix}/+/frames`` (MQTT v5 shared
subscription, 4.8.2) so replicas split the load, with a persistent session
(``clean_start=False``) and manual acks. The paho callback only enqueues; one worker thread
validates each frame, puts it under ``frames/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.jpg`` with
``If-None-Match: *`` (a redelivered frame never makes a second object nor replaces the bytes),
THEN sends the MQTT PUBACK, then publishes a :class:`~common.messages.FrameAck` on
``{prefix}/{device_id}/acks`` at QoS 1. One thread keeps the PUBACKs in the order the
PUBLISHes arrived (MQTT 5.0, 4.6). The in-memory queue is bounded by the broker: it sends at
most its in-flight limit of unacked QoS 1 messages (mosquitto ``max_inflight_messages``).

While S3 is down a frame is retried with backoff, never acked and never dropped; the outage is
logged once. An invalid frame is logged with device, frame and reason, counted, acked (so the
broker does not redeliver it forever) and skipped.
"""

from __future__ import annotations

import argparse
import logging
import queue
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import paho.mqtt.client as mqtt

from cloud import metrics
from common.config import ConfigError, IngestConfig, S3Config, load_config
from common.messages import (
    SCHEMA_VERSION,
    USER_PROPERTY_PREFIX,
    FrameAck,
    FrameMetadata,
    MessageError,
)
from common.mqtt import MqttClient
from common.storage import ObjectNotFoundError, ObjectStore, StorageError
from common.topics import FRAMES, InvalidIdError, Topics, frame_key, validate_id

logger = logging.getLogger(__name__)

JPEG_CONTENT_TYPE = "image/jpeg"


def open_store(config: S3Config) -> ObjectStore:
    """The bucket of ``config``; calls fail fast (3 attempts, 3 s connect) so outages show.

    Creates the bucket when ``config.create_bucket``; if S3 does not answer yet, says so and
    goes on (every later call retries).
    """
    store = ObjectStore(config, connect_timeout_s=3.0, read_timeout_s=15.0, max_attempts=3)
    if config.create_bucket:
        try:
            store.ensure_bucket()
        except StorageError as err:
            logger.warning("bucket %s not checked at start: %s", config.bucket, err)
    return store


def retry_delays(first_s: float = 0.5, max_s: float = 10.0) -> Iterator[float]:
    """Endless backoff delays in seconds: ``first_s``, doubling, capped at ``max_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


# -- validation --------------------------------------------------------------------------
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # ITU-T T.81, Table B.1


class InvalidFrame(Exception):
    """A frame message the ingest refuses; ``reason`` is a short label used as a counter."""

    def __init__(
        self, reason: str, detail: str, device_id: str | None = None, frame_id: str | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id
        self.frame_id = frame_id


@dataclass(frozen=True)
class ValidFrame:
    """A frame that passed :func:`validate_frame`, with its object key."""

    metadata: FrameMetadata
    payload: bytes
    key: str


def jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from a JPEG's first SOF segment, without decoding.

    Walks the marker segments of ITU-T T.81 (B.1.1.2) up to the first start-of-frame.

    Raises:
        ValueError: not a JPEG (no SOI), or the segments end or break before a SOF.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError("no JPEG start-of-image marker")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("image data before any start-of-frame marker")
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            raise ValueError(f"segment length {length} at byte {i}")
        if marker in _SOF_MARKERS:
            if i + 9 > n or length < 7:
                break
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    raise ValueError("JPEG ends before its start-of-frame marker")


def _loggable(value: object, limit: int = 64) -> str | None:
    """``value`` if it is a safe id, else its escaped repr cut to ``limit`` (no log injection)."""
    if value is None:
        return None
    try:
        return validate_id(value, "id")
    except InvalidIdError:
        return ascii(value)[:limit]


def _metadata(props: Sequence[tuple[str, str]], device_id: str) -> FrameMetadata:
    names = {name for name, _ in props if name.startswith(USER_PROPERTY_PREFIX)}
    if not names:
        raise InvalidFrame("missing_metadata", "no fc-* user properties", device_id)
    schema = dict(props).get(USER_PROPERTY_PREFIX + "schema")
    frame_id = _loggable(dict(props).get(USER_PROPERTY_PREFIX + "frame-id"))
    if schema is not None and schema != str(SCHEMA_VERSION):
        raise InvalidFrame(
            "schema_version", f"unknown schema version {schema[:16]!r}", device_id, frame_id
        )
    try:
        return FrameMetadata.from_user_properties(props)
    except MessageError as err:
        raise InvalidFrame("bad_metadata", str(err)[:300], device_id, frame_id) from err


def _check_image(payload: bytes, meta: FrameMetadata, max_pixels: int) -> None:
    ids = (meta.device_id, meta.frame_id)
    try:
        width, height = jpeg_dimensions(payload)
    except ValueError as err:
        raise InvalidFrame("not_jpeg", str(err), *ids) from err
    if (width, height) != (meta.width, meta.height):
        raise InvalidFrame(
            "size_mismatch",
            f"JPEG is {width}x{height}, metadata says {meta.width}x{meta.height}",
            *ids,
        )
    if width * height > max_pixels:
        raise InvalidFrame("too_many_pixels", f"{width}x{height} > {max_pixels} pixels", *ids)
    if not payload.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise InvalidFrame("truncated_jpeg", "no end-of-image marker", *ids)
    try:
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise InvalidFrame("undecodable", f"OpenCV: {err}"[:300], *ids) from err
    if image is None:
        raise InvalidFrame("undecodable", "OpenCV cannot decode the JPEG", *ids)
    if image.shape[:2] != (height, width):
        raise InvalidFrame(
            "size_mismatch", f"decoded shape {image.shape} is not {width}x{height}", *ids
        )


def validate_frame(
    topic: str,
    payload: bytes,
    user_properties: Sequence[tuple[str, str]],
    *,
    topics: Topics,
    max_payload_bytes: int,
    max_pixels: int,
) -> ValidFrame:
    """Check a message of ``{prefix}/{device_id}/frames`` and return the frame with its key.

    Checks, in order: the topic; the metadata (present, known schema, valid fields); the
    metadata's device_id equals the topic's; the payload size; its sha256; a JPEG whose
    header size equals the metadata's, within ``max_pixels``, complete, and that decodes.

    Raises:
        InvalidFrame: with ``reason`` one of ``bad_topic``, ``missing_metadata``,
            ``schema_version``, ``bad_metadata``, ``device_mismatch``, ``too_large``,
            ``sha256_mismatch``, ``not_jpeg``, ``size_mismatch``, ``too_many_pixels``,
            ``truncated_jpeg``, ``undecodable``.
    """
    try:
        device_id, kind = topics.parse(topic)
    except InvalidIdError as err:
        raise InvalidFrame("bad_topic", str(err)[:300]) from err
    if kind != FRAMES:
        raise InvalidFrame("bad_topic", f"{kind} is not a frames topic", device_id)
    meta = _metadata(user_properties, device_id)
    ids = (device_id, meta.frame_id)
    if meta.device_id != device_id:
        raise InvalidFrame("device_mismatch", f"metadata device_id is {meta.device_id!r}", *ids)
    if len(payload) > max_payload_bytes:
        raise InvalidFrame("too_large", f"{len(payload)} bytes > {max_payload_bytes}", *ids)
    try:
        meta.check_payload(payload)
    except MessageError as err:
        raise InvalidFrame("sha256_mismatch", str(err), *ids) from err
    _check_image(payload, meta, max_pixels)
    return ValidFrame(meta, payload, frame_key(meta.device_id, meta.frame_id, meta.captured_at))


def default_client_id(role: str) -> str:
    """``framecap-{role}-{hostname}``: stable across restarts, so the persistent session (and
    the frames the broker holds for it) is found again. Set ``mqtt.client_id`` (or
    ``--client-id``) per replica when several run on one host."""
    return f"framecap-{role}-{socket.gethostname()}"[:64]


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


class _Stopping(Exception):
    """The service was asked to stop while a frame was still being stored."""


class IngestService:
    """Stores MQTT frames in S3 and acknowledges them; see the module docstring.

    Args:
        config: broker, bucket, share group and the payload limits.
        store: the object store (tests pass a fake); opened from ``config.s3`` at
            :meth:`start` when None.
        client_id: MQTT client_id; default ``config.mqtt.client_id``, else
            :func:`default_client_id`.

    Attributes:
        counters: (property) a snapshot: ``received``, ``stored``, ``duplicates``,
            ``conflicts``, ``invalid``, ``invalid.{reason}``, ``s3_errors``, ``acks_published``.
    """

    def __init__(
        self,
        config: IngestConfig,
        *,
        store: ObjectStore | None = None,
        client_id: str | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        self.client_id = client_id or config.mqtt.client_id or default_client_id("ingest")
        self._store = store
        self._client: MqttClient | None = None
        self._queue: queue.Queue[_Inbound | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._generation = 0
        self._s3_down_since: float | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, start the worker thread and connect; returns at once.

        Raises:
            StorageError: the store cannot be opened (bad endpoint or credentials format).
        """
        if self._store is None:
            self._store = open_store(self.config.s3)
        client = MqttClient(self.config.mqtt, self.client_id, manual_ack=True, clean_start=False)
        client.on_connected(self._on_connected)
        client.subscribe(self.topics.shared(self.config.share_group, "frames"), self._on_message, 1)
        self._client = client
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ingest-worker", daemon=True)
        self._thread.start()
        client.start()
        logger.info(
            "ingest %s: started (bucket %s, share group %s)",
            self.client_id,
            self.config.s3.bucket,
            self.config.share_group,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker thread (a frame mid-retry stays unacked: the broker redelivers it)
        and disconnect. Waits at most ``timeout`` seconds for the thread."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.stop()
        logger.info("ingest %s: stopped; %s", self.client_id, self.counters)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected to the broker (within ``timeout`` seconds)."""
        return self._client is not None and self._client.wait_connected(timeout)

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (see the class docstring)."""
        with self._lock:
            return dict(self._counts)

    @property
    def backlog(self) -> int:
        """Frames received and not yet handled."""
        return self._queue.qsize()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- MQTT network thread: enqueue only -------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        with self._lock:
            self._generation += 1

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        props = getattr(message.properties, "UserProperty", None) or []
        with self._lock:
            generation = self._generation
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

    # -- worker thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            try:
                self.handle(item)
            except _Stopping:
                break
            except Exception:  # noqa: BLE001 - one bad frame must never stop the service
                logger.exception("ingest: unexpected error on a message from %s", item.topic)

    def handle(self, item: _Inbound) -> None:
        """Validate, store, ack and acknowledge one received frame.

        Raises:
            _Stopping: :meth:`stop` was called while S3 was down (the frame stays unacked).
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
            self._refuse(item, bad)
            return
        result = self._store_frame(frame)
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
            _Stopping: :meth:`stop` was called before S3 answered.
        """
        meta = frame.metadata
        store = self._store
        assert store is not None, "start() opens the store"
        for delay in retry_delays():
            try:
                created = store.put_if_absent(
                    frame.key,
                    frame.payload,
                    metadata=meta.to_s3_metadata(),
                    content_type=JPEG_CONTENT_TYPE,
                )
                existing = None if created else self._head(frame.key)
            except StorageError as err:
                self._s3_failed(frame, err)
                if self._stop.wait(delay):
                    raise _Stopping from err
                continue
            self._s3_ok()
            if created:
                logger.info(
                    "ingest: stored frame %s of device %s as %s",
                    meta.frame_id,
                    meta.device_id,
                    frame.key,
                )
                return "stored"
            return self._compare_existing(frame, existing)
        raise AssertionError("retry_delays() never ends")  # pragma: no cover

    def _head(self, key: str) -> dict[str, str]:
        """Metadata of an object a put found; raises StorageError (retried) if it vanished."""
        assert self._store is not None
        try:
            return self._store.head_metadata(key)
        except ObjectNotFoundError as err:
            raise StorageError(
                "head_object", self._store.bucket, key, "gone after a refused put"
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

    def _s3_failed(self, frame: ValidFrame, err: Exception) -> None:
        self._count("s3_errors")
        metrics.INGEST_S3_ERRORS.inc()
        if self._s3_down_since is None:
            self._s3_down_since = time.monotonic()
            logger.error(
                "ingest: S3 unavailable storing frame %s of device %s (%s): %s; "
                "holding frames unacked and retrying",
                frame.metadata.frame_id,
                frame.metadata.device_id,
                frame.key,
                err,
            )
        else:
            logger.debug("ingest: S3 still unavailable: %s", err)

    def _s3_ok(self) -> None:
        if self._s3_down_since is not None:
            logger.warning(
                "ingest: S3 is back after %.1f s", time.monotonic() - self._s3_down_since
            )
            self._s3_down_since = None


# -- command line ------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``framecap ingest`` and ``framecap worker``."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--validate-config", action="store_true", help="check the config and exit")
    parser.add_argument("--mqtt-host", help="override mqtt.host")
    parser.add_argument("--mqtt-port", type=int, help="override mqtt.port")
    parser.add_argument("--mqtt-username", help="override mqtt.username")
    parser.add_argument("--client-id", help="override mqtt.client_id")
    parser.add_argument("--topic-prefix", help="override mqtt.topic_prefix")
    parser.add_argument("--s3-endpoint", help="override s3.endpoint_url")
    parser.add_argument("--bucket", help="override s3.bucket")
    parser.add_argument("--share-group", help="override share_group")
    parser.add_argument("--metrics-port", type=int, help="override metrics_port")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def common_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Dotted config keys from the options of :func:`add_common_arguments`."""
    return {
        "mqtt.host": args.mqtt_host,
        "mqtt.port": args.mqtt_port,
        "mqtt.username": args.mqtt_username,
        "mqtt.client_id": args.client_id,
        "mqtt.topic_prefix": args.topic_prefix,
        "s3.endpoint_url": args.s3_endpoint,
        "s3.bucket": args.bucket,
        "share_group": args.share_group,
        "metrics_port": args.metrics_port,
    }


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class Service(Protocol):
    """Anything with start() and stop(): IngestService, CaptionWorker."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signal(service: Service, name: str) -> int:
    """Run ``service`` (has start/stop) until SIGINT or SIGTERM; returns the exit status."""
    import signal

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        service.start()
    except (StorageError, OSError) as err:
        print(f"framecap {name}: cannot start: {err}", file=sys.stderr)
        return 1
    done.wait()
    service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``framecap ingest``; returns 0 after SIGINT/SIGTERM, 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="framecap ingest", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = load_config(IngestConfig, args.config, common_overrides(args))
    except ConfigError as err:
        print(f"framecap ingest: invalid config:\n{err}", file=sys.stderr)
        return 2
    if args.validate_config:
        print("framecap ingest: config OK")
        return 0
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    return run_until_signal(IngestService(config), "ingest")
