"""Publishes spooled frames over MQTT and handles what comes back (acks, captions).

:class:`FramePublisher` owns one :class:`common.mqtt.MqttClient` (client_id from the device_id,
``clean_start=False``, last will ``offline`` retained on the status topic) and one thread,
which is also the client's network loop (``start(network_thread=False)``): it reads frames
from the spool, publishes them, reads what the broker sends, removes acked frames and writes
captions, so the capture loop never waits on the network. The capture thread only wakes it
(:meth:`FramePublisher.notify`). One thread instead of a worker beside paho's network thread
(issue 9): a frame's publish, its PUBACK, its ack and the ack's PUBACK no longer cost a
hand-off between two threads each; the paho hooks only note what came, and the thread
handles it after each network pass.

Delivery (at least once; the ingest's idempotent S3 key makes it exactly once in S3):

- each spooled frame is published at QoS 1 to ``{prefix}/{device_id}/frames``, the raw JPEG as
  payload and :meth:`FrameMetadata.to_user_properties` beside it (MQTT v5 user properties);
- at most ``max_in_flight`` frames are published and not yet acked at any time, oldest first;
- a frame leaves the spool only when a :class:`FrameAck` for it arrives on the acks topic
  (stored, or ``rejected``: refused for good by the ingest, logged as a WARNING and counted);
- frames not acked are resent after every reconnect (the broker may have lost what it had
  PUBACKed, e.g. killed with SIGKILL) and ``resend_after_s`` after their last send; frames
  found in the spool at start (a restart) are sent first;
- after a reconnect, frames are resent sooner: a frame sent then and not acked within
  ``reconnect_grace_s`` is sent again, then after twice that, and so on up to
  ``resend_after_s``, until the first ack of a frame sent after the reconnect comes. A
  restarted broker may PUBACK frames before the ingest has subscribed again (mosquitto does
  not restore shared subscriptions) and drop them; they must not wait a whole resend period;
- a frame the broker PUBACKed whose ack has not come ``overtaken_grace_s`` after a frame sent
  later was acked is sent again: it was most likely lost with an ingest replica that died
  (its clean session goes with it) or sent while no ingest was subscribed. A resend is
  harmless: the ingest stores a frame once and acks it again;
- a publish the broker refuses (MQTT v5 PUBACK reason code >= 0x80, e.g. 135 "not authorized"
  when the ACL denies this user the frames topic) was not delivered: the frame stays in the
  spool, is counted (:attr:`PublisherStats.refused`) and is sent again ``resend_after_s`` after
  the refused send (the operator may fix the ACL meanwhile); never in a tight loop.

Captions are written before they are acknowledged: the client uses manual acks, and a caption's
PUBACK goes to the broker only once its line is in ``captions_jsonl`` (flushed and fsynced) and
``on_caption``/printing are done. A kill in between means the broker delivers it again
(persistent session) and the edge, which dedupes by frame_id only what it has written, writes
it then. A failed write is retried every few seconds without acknowledging.

Each line of ``captions_jsonl`` is the :class:`CaptionRecord` with ``received_at`` (UTC, when
the caption's PUBLISH reached this process) beside its fields; :func:`parse_caption_line` reads
one back. Capture -> caption latencies (``received_at - captured_at``) are kept for the run's
p50/p95 (:meth:`FramePublisher.caption_latency_ms`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from common.config import MqttConfig
from common.messages import STATUS_OFFLINE, STATUS_ONLINE, CaptionRecord, FrameAck, MessageError
from common.mqtt import MqttClient, Will
from common.topics import Topics
from edge.spool import FrameSpool

logger = logging.getLogger(__name__)

POLL_S = 0.2  # the publisher thread's longest network wait, seconds
STOP_STATUS_WAIT_S = 2.0  # at stop, wait this long for the broker to accept ``offline``, seconds
RESEND_CHECK_S = 0.05  # look for overdue frames at most this often (not at every event), seconds
RECONNECT_GRACE_S = 2.0  # after a reconnect, the first resend of a frame not acked, seconds
OVERTAKEN_GRACE_S = 2.0  # resend a frame this long after a later frame was acked, seconds
CAPTION_RETRY_MIN_S = 1.0  # first retry of a caption whose JSONL append failed, seconds
CAPTION_RETRY_MAX_S = 30.0  # longest wait between such retries, seconds
RECENT_CAPTIONS = 10_000  # frame_ids remembered to drop a caption delivered twice
LATENCY_SAMPLES = 100_000  # capture -> caption latencies kept for the run's percentiles
RECEIVED_AT = "received_at"  # the key a captions JSONL line adds to the CaptionRecord
_QUEUED = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # paho keeps QoS 1 messages on NO_CONN


@dataclass
class PublisherStats:
    """Counters of a :class:`FramePublisher` (all since start)."""

    published: int = 0  # frames published for the first time by this process
    resent: int = 0  # further publishes of frames not yet acked
    acked: int = 0  # frames acked by the ingest and removed from the spool
    rejected: int = 0  # frames the ingest refused for good (bad JPEG, ...), removed from the spool
    acks_unknown: int = 0  # acks for frames not in the spool (duplicates, dropped frames)
    acks_malformed: int = 0  # ack payloads that did not decode, or were for another device
    captions_received: int = 0
    captions_repeated: int = 0  # a caption for a frame already captioned (at-least-once MQTT)
    captions_malformed: int = 0
    publish_errors: int = 0  # publishes paho refused (retried later)
    refused: int = 0  # frame publishes the broker refused (PUBACK failure: not delivered; retried)
    caption_write_errors: int = 0  # failed appends to captions_jsonl (retried, not acked meanwhile)


@dataclass
class _InFlight:
    mid: int
    sent_at: float  # time.monotonic() of the last publish
    attempts: int
    wait_s: float  # resend if no ack this long after sent_at, seconds
    order: int = 0  # publish order of the last send (larger: sent later)
    fast: int = 0  # sends since the last reconnect while it lasted (wait_s doubles each)
    puback: bool = False  # the broker has accepted the last publish
    refused: bool = False  # the broker refused the last publish (resent after resend_after_s)
    overtaken_at: float | None = None  # when a frame sent after this one was acked


def format_caption(record: CaptionRecord) -> str:
    """The one caption line of every framecap command: ``frame_id<TAB>caption<TAB>score``
    (the frame_id starts with the capture time in UTC; ``(no caption: ERROR)`` and ``-`` for
    an error record); see :func:`common.cli.format_caption_line`."""
    from common.cli import format_caption_line

    return format_caption_line(record.frame_id, record.caption, record.score, record.error)


def caption_line(record: CaptionRecord, received_at: datetime) -> str:
    """One ``captions_jsonl`` line (no newline): the record's JSON with ``received_at`` (UTC,
    ISO 8601 with ``Z``, as the record's own datetimes) added."""
    data = json.loads(record.model_dump_json())
    data[RECEIVED_AT] = _iso_utc(received_at)
    return json.dumps(data, separators=(",", ":"))


def parse_caption_line(line: str | bytes) -> tuple[CaptionRecord, datetime | None]:
    """A ``captions_jsonl`` line back as ``(record, received_at)``; ``received_at`` is None in
    lines written before it was recorded.

    Raises:
        MessageError: not JSON, not a caption record, or a bad ``received_at``.
    """
    try:
        data = json.loads(line)
    except ValueError as err:
        raise MessageError(f"caption line is not JSON: {str(err)[:200]}") from err
    if not isinstance(data, dict):
        raise MessageError("caption line is not a JSON object")
    raw = data.pop(RECEIVED_AT, None)
    received_at = None
    if raw is not None:
        try:
            received_at = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
        except ValueError as err:
            raise MessageError(f"bad received_at {str(raw)[:40]!r}") from err
        if received_at.tzinfo is None:
            raise MessageError(f"received_at {str(raw)[:40]!r} has no time zone")
    return CaptionRecord.from_json(json.dumps(data)), received_at


def _iso_utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[rank]


class FramePublisher:
    """Sends a :class:`FrameSpool`'s frames to the broker and removes them when acked.

    Args:
        device_id: this device (topics, client_id, log lines).
        mqtt_config: broker connection; ``client_id`` defaults to ``framecap-edge-{device_id}``.
        spool: where the frames wait; the publisher removes acked frames from it.
        resend_after_s: resend a frame not acked within this many seconds.
        max_in_flight: most frames published and not yet acked.
        reconnect_grace_s: after a reconnect, resend a frame not acked within this many
            seconds (doubling per resend, up to ``resend_after_s``) until acks flow again.
        overtaken_grace_s: resend a frame the broker accepted this many seconds after a frame
            sent later was acked.
        captions_jsonl: append each caption received to this file (one JSON object a line).
        captions_jsonl_max_bytes: rotate ``captions_jsonl`` to ``.1`` past this size (0: never).
        on_caption: called with each decoded :class:`CaptionRecord` (on the publisher thread).
        print_captions: print ``HH:MM:SS frame_id caption`` to stdout for each caption.
        track_captions: remember which frames acked by this process still lack their caption
            (:meth:`captions_pending`), so a batch run can wait for them; off for endless runs.
    """

    def __init__(
        self,
        device_id: str,
        mqtt_config: MqttConfig,
        spool: FrameSpool,
        *,
        resend_after_s: float = 30.0,
        max_in_flight: int = 50,
        reconnect_grace_s: float = RECONNECT_GRACE_S,
        overtaken_grace_s: float = OVERTAKEN_GRACE_S,
        captions_jsonl: Path | None = None,
        captions_jsonl_max_bytes: int = 0,
        on_caption: Callable[[CaptionRecord], None] | None = None,
        print_captions: bool = True,
        track_captions: bool = False,
    ) -> None:
        self.device_id = device_id
        self.track_captions = track_captions
        self._awaiting_caption: set[str] = set()  # acked here, caption not yet received
        self._caption_before_ack: set[str] = set()  # caption came while the frame was spooled
        self._recent_captions: OrderedDict[str, None] = OrderedDict()  # frame_ids, newest last
        self.spool = spool
        self.topics = Topics(mqtt_config.topic_prefix)
        self.resend_after_s = resend_after_s
        self.max_in_flight = max_in_flight
        self.reconnect_grace_s = min(reconnect_grace_s, resend_after_s)
        self.overtaken_grace_s = overtaken_grace_s
        self._order = 0  # publishes so far (the order of the last one)
        self._reconnected_at_order: int | None = None  # from a reconnect to the first ack after
        self.captions_jsonl = captions_jsonl
        self.captions_jsonl_max_bytes = captions_jsonl_max_bytes
        self.on_caption = on_caption
        self.print_captions = print_captions
        self.stats = PublisherStats()
        self._frames_topic = self.topics.frames(device_id)
        self._status_topic = self.topics.status(device_id)
        # what the paho hooks saw, handled by the publisher thread after each network pass
        self._events: deque[tuple[str, Any]] = deque()
        self._wake_pending = False  # notify() has woken the thread; cleared before the spool is read
        self._in_flight: dict[str, _InFlight] = {}
        self._mids: dict[int, str] = {}
        self.last_refusal: str | None = None  # the broker's reason for the last refused publish
        # captions received but not yet written: frame_id -> (record, received_at, [(mid, qos)])
        self._unwritten: OrderedDict[
            str, tuple[CaptionRecord, datetime, list[tuple[int, int]]]] = OrderedDict()
        self._latencies_ms: list[float] = []  # capture -> caption, ms (at most LATENCY_SAMPLES)
        self._caption_retry_at = 0.0
        self._caption_retry_s = CAPTION_RETRY_MIN_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = MqttClient(
            mqtt_config,
            mqtt_config.client_id or f"framecap-edge-{device_id}",
            will=Will(self._status_topic, STATUS_OFFLINE.encode(), qos=1, retain=True),
            manual_ack=True,  # a caption is acked once written (see the module doc)
            clean_start=False,
        )
        events = self._events
        self.client.on_connected(self._on_connected)
        self.client.on_disconnected(lambda: events.append(("disconnected", None)))
        self.client.on_published(lambda mid: events.append(("puback", mid)))
        self.client.on_publish_refused(lambda mid, reason: events.append(("refused", (mid, reason))))
        self.client.subscribe(self.topics.acks(device_id),
                              lambda m: events.append(("ack", (m.payload, m.mid, m.qos))))
        self.client.subscribe(self.topics.captions(device_id),
                              lambda m: events.append(
                                  ("caption", (m.payload, m.mid, m.qos, datetime.now(timezone.utc)))))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and start the publisher thread; returns at once."""
        self.client.start(network_thread=False)  # the publisher thread runs the network loop
        self._thread = threading.Thread(target=self._run, name=f"publisher-{self.device_id}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Tell the publisher thread a frame was spooled (any thread; never blocks).

        Costs nothing while a wake-up is pending, or while a publish awaits its PUBACK (the
        PUBACK, a fraction of a millisecond away, wakes the thread, which then publishes what
        was spooled meanwhile; without one the thread still looks every ``POLL_S``): at a high
        frame rate most frames then cost the capture thread no system call."""
        if not self._wake_pending and not self._mids:
            self._wake_pending = True
            self.client.wakeup()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the publisher thread (which publishes ``offline``, retained, first) and
        disconnect cleanly."""
        self._stop.set()
        self.client.wakeup()
        if self._thread is not None:
            self._thread.join(timeout_s + STOP_STATUS_WAIT_S)
        if self._unwritten:
            logger.warning("%s: %d captions could not be written to %s; not acknowledged, so the "
                           "broker delivers them again on the next start", self.device_id,
                           len(self._unwritten), self.captions_jsonl)
        self.client.stop()
        logger.info("%s: publisher stopped (%d frames left in the spool)", self.device_id, len(self.spool))

    def captions_pending(self) -> int:
        """Frames acked by this process whose caption has not arrived (``track_captions``)."""
        return len(self._awaiting_caption)

    @property
    def in_flight(self) -> int:
        """Frames published and not yet acked (approximate outside the publisher thread)."""
        return len(self._in_flight)

    # -- paho hooks (on the publisher thread, inside a network pass) ----------------------
    def _on_connected(self, session_present: bool) -> None:
        self.client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        self._events.append(("connected", session_present))

    # -- publisher thread ----------------------------------------------------------------
    def _run(self) -> None:
        checked = 0.0  # when overdue frames were last looked for
        while not self._stop.is_set():
            try:
                self.client.run_network(POLL_S)
                self._wake_pending = False  # before the spool is read: a later put wakes us again
                self._handle_events()
                now = time.monotonic()
                if self._unwritten and now >= self._caption_retry_at:
                    self._retry_captions()
                if self.client.is_connected:
                    if now - checked >= RESEND_CHECK_S:  # O(in flight): not at every event
                        checked = now
                        self._resend_overdue()
                    self._fill_window()
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad step
                logger.exception("%s: publisher step failed; continuing", self.device_id)
                time.sleep(POLL_S)
        self._say_offline()

    def _say_offline(self) -> None:
        """At stop, on the publisher thread: publish ``offline`` (retained) and run the network
        until the broker accepts it or :data:`STOP_STATUS_WAIT_S` passes."""
        if not self.client.is_connected:
            return
        try:
            info = self.client.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
        except (RuntimeError, ValueError) as err:
            logger.warning("%s: could not publish status offline: %s", self.device_id, err)
            return
        deadline = time.monotonic() + STOP_STATUS_WAIT_S
        while not info.is_published() and self.client.is_connected and time.monotonic() < deadline:
            self.client.run_network(min(0.05, max(0.0, deadline - time.monotonic())))
        if not info.is_published():
            logger.warning("%s: status offline not confirmed by the broker within %g s",
                           self.device_id, STOP_STATUS_WAIT_S)

    def _handle_events(self) -> None:
        """Handle what the paho hooks noted during the last network pass, oldest first."""
        events = self._events
        while events:
            kind, value = events.popleft()
            self._dispatch(kind, value)

    def _dispatch(self, kind: str, value: Any) -> None:
        if kind == "ack":
            self._handle_ack(*value)
        elif kind == "caption":
            self._handle_caption(*value)
        elif kind == "puback":
            frame_id = self._mids.pop(value, None)
            if frame_id is not None and frame_id in self._in_flight:
                self._in_flight[frame_id].puback = True
                logger.debug("%s: frame %s: broker has it (mid %d)", self.device_id, frame_id, value)
        elif kind == "refused":
            self._handle_refused(*value)
        elif kind == "connected":
            self._resend_after_reconnect()
        elif kind == "disconnected":
            logger.info("%s: offline; %d frames in flight will be resent", self.device_id, len(self._in_flight))

    def _handle_refused(self, mid: int, reason: str) -> None:
        """The broker refused publish ``mid``: not delivered; the frame stays spooled and in
        flight (so the window does not send it at once) until its resend time."""
        self.last_refusal = reason
        frame_id = self._mids.pop(mid, None)
        if frame_id is None or frame_id not in self._in_flight:
            return  # the status message, or a frame acked or forgotten meanwhile
        self.stats.refused += 1
        item = self._in_flight[frame_id]
        item.refused, item.puback = True, False
        logger.info("%s: frame %s: the broker refused it (%s); it stays in the spool and is sent "
                    "again in %g s", self.device_id, frame_id, reason, self.resend_after_s)

    def _resend_after_reconnect(self) -> None:
        """Resend frames the broker had PUBACKed (it may have lost them); paho resends those
        not yet answered; refused frames keep their resend time. Until a frame sent from now
        on is acked, frames are resent after ``reconnect_grace_s`` (doubling)."""
        self._reconnected_at_order = self._order
        for frame_id, item in list(self._in_flight.items()):
            if item.puback:
                self._publish(frame_id, reason="reconnect")
            elif not item.refused:  # paho sends it again: counts as a send after the reconnect
                self._order += 1
                item.sent_at, item.order, item.overtaken_at = time.monotonic(), self._order, None
                item.fast, item.wait_s = 1, self.reconnect_grace_s

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for frame_id, item in list(self._in_flight.items()):
            if frame_id not in self.spool:
                self._forget(frame_id)  # dropped from a full spool, or quarantined
            elif now - item.sent_at >= item.wait_s:
                self._publish(frame_id, reason=f"no ack in {item.wait_s:g} s"
                              + (" after a reconnect" if item.fast else ""))
            elif item.overtaken_at is not None and now - item.overtaken_at >= self.overtaken_grace_s:
                self._publish(frame_id, reason=f"no ack {self.overtaken_grace_s:g} s after a "
                                               "frame sent later was acked")

    def _fill_window(self) -> None:
        free = self.max_in_flight - len(self._in_flight)
        if free <= 0:
            return
        for entry in self.spool.head(self.max_in_flight + len(self._in_flight)):
            if entry.frame_id in self._in_flight:
                continue
            if not self._publish(entry.frame_id) or not self.client.is_connected:
                return
            free -= 1
            if free <= 0:
                return

    def _publish(self, frame_id: str, reason: str | None = None) -> bool:
        """Publish one spooled frame; False if it could not be queued."""
        item = self.spool.read(frame_id)
        if item is None:
            self._forget(frame_id)
            return True
        metadata, jpeg = item
        try:
            info = self.client.publish(
                self._frames_topic, jpeg, qos=1, user_properties=metadata.to_user_properties()
            )
        except (ValueError, RuntimeError) as err:
            info = None
            logger.error("%s: frame %s: publish refused: %s", self.device_id, frame_id, err)
        if info is None or info.rc not in _QUEUED:
            self.stats.publish_errors += 1
            if info is not None:
                logger.warning("%s: frame %s: publish failed (%s); will retry",
                               self.device_id, frame_id, mqtt.error_string(info.rc))
            return False
        old = self._in_flight.get(frame_id)
        if old is not None:
            self._mids.pop(old.mid, None)
        attempts = old.attempts + 1 if old else 1
        self._order += 1
        fast = 0
        wait_s = self.resend_after_s
        if self._reconnected_at_order is not None:  # since a reconnect, no ack yet: resend soon
            fast = (old.fast if old else 0) + 1
            wait_s = min(self.resend_after_s, self.reconnect_grace_s * 2 ** (fast - 1))
        self._in_flight[frame_id] = _InFlight(info.mid, time.monotonic(), attempts, wait_s,
                                              order=self._order, fast=fast)
        self._mids[info.mid] = frame_id
        if old is None and reason is None:
            self.stats.published += 1
            logger.debug("%s: frame %s published (seq %d, %d bytes)",
                        self.device_id, frame_id, metadata.seq, len(jpeg))
        else:
            self.stats.resent += 1
            logger.info("%s: frame %s resent (attempt %d: %s)", self.device_id, frame_id, attempts,
                        reason or "restart")
        return True

    def _forget(self, frame_id: str) -> None:
        item = self._in_flight.pop(frame_id, None)
        if item is not None:
            self._mids.pop(item.mid, None)

    # -- acks and captions ---------------------------------------------------------------
    def _ack(self, mid: int | None, qos: int) -> None:
        """Send the PUBACK of a received message (manual acks; nothing for QoS 0 or tests)."""
        if mid is not None and qos > 0:
            self.client.ack(mid, qos)

    def _handle_ack(self, payload: bytes, mid: int | None = None, qos: int = 0) -> None:
        try:
            self._process_ack(payload)
        finally:
            self._ack(mid, qos)  # a frame whose ack is lost is simply resent and acked again

    def _process_ack(self, payload: bytes) -> None:
        try:
            ack = FrameAck.from_json(payload)
        except MessageError as err:
            self.stats.acks_malformed += 1
            logger.warning("%s: malformed ack ignored: %s", self.device_id, err)
            return
        if ack.device_id != self.device_id:
            self.stats.acks_malformed += 1
            logger.warning("%s: frame %s: ack for another device %r ignored",
                           self.device_id, ack.frame_id, ack.device_id)
            return
        if ack.rejected is not None:
            self._forget(ack.frame_id)
            if self.spool.remove(ack.frame_id):
                self.stats.rejected += 1
                logger.warning("%s: frame %s rejected by the ingest (%s): removed from the spool, "
                               "not sent again", self.device_id, ack.frame_id, ack.rejected)
            else:
                self.stats.acks_unknown += 1
            return
        self._acked_in_order(ack.frame_id)
        self._forget(ack.frame_id)
        if self.spool.remove(ack.frame_id):
            self.stats.acked += 1
            if self.track_captions:
                if ack.frame_id in self._caption_before_ack:
                    self._caption_before_ack.discard(ack.frame_id)
                else:
                    self._awaiting_caption.add(ack.frame_id)
            logger.debug("%s: frame %s acked, stored as %s", self.device_id, ack.frame_id, ack.key)
        else:
            self.stats.acks_unknown += 1
            logger.info("%s: frame %s: ack for a frame not in the spool (duplicate or dropped)",
                        self.device_id, ack.frame_id)

    def _acked_in_order(self, frame_id: str) -> None:
        """An ack for ``frame_id`` came: frames sent before it, accepted by the broker and
        still not acked, are overtaken (resent ``overtaken_grace_s`` from now if still not
        acked); an ack of a frame sent after the last reconnect ends the fast resends."""
        acked = self._in_flight.get(frame_id)
        if acked is None:
            return
        if self._reconnected_at_order is not None and acked.order > self._reconnected_at_order:
            self._reconnected_at_order = None
        now = time.monotonic()
        for other_id, item in self._in_flight.items():
            if (other_id != frame_id and item.order < acked.order and item.puback
                    and item.overtaken_at is None):
                item.overtaken_at = now

    def _handle_caption(self, payload: bytes, mid: int | None = None, qos: int = 0,
                        received_at: datetime | None = None) -> None:
        """Write (JSONL, print, hook) a received caption, then acknowledge it to the broker.

        ``received_at``: when its PUBLISH arrived (UTC); now when None."""
        received_at = received_at or datetime.now(timezone.utc)
        try:
            record = CaptionRecord.from_json(payload)
        except MessageError as err:
            self.stats.captions_malformed += 1
            logger.warning("%s: malformed caption ignored: %s", self.device_id, err)
            self._ack(mid, qos)
            return
        if record.frame_id in self._recent_captions:
            self.stats.captions_repeated += 1
            logger.info("%s: frame %s: caption received again (a republish); ignored",
                        self.device_id, record.frame_id)
            self._ack(mid, qos)
            return
        pending = self._unwritten.get(record.frame_id)
        if pending is not None:  # delivered again while its write is being retried
            if mid is not None:
                pending[2].append((mid, qos))
            return
        if self._unwritten:  # writes are failing: queue behind the others, keep the order
            self._unwritten[record.frame_id] = (record, received_at,
                                                [] if mid is None else [(mid, qos)])
            return
        self._caption_retry_s = CAPTION_RETRY_MIN_S
        if not self._write_caption(record, received_at):
            self._unwritten[record.frame_id] = (record, received_at,
                                                [] if mid is None else [(mid, qos)])
            self._caption_retry_at = time.monotonic() + self._caption_retry_s
            return
        self._ack(mid, qos)

    def _retry_captions(self) -> None:
        """Write the captions whose append failed, oldest first; ack each once written."""
        while self._unwritten:
            frame_id, (record, received_at, mids) = next(iter(self._unwritten.items()))
            if not self._write_caption(record, received_at, retry=True):
                self._caption_retry_s = min(2 * self._caption_retry_s, CAPTION_RETRY_MAX_S)
                self._caption_retry_at = time.monotonic() + self._caption_retry_s
                return
            del self._unwritten[frame_id]
            for mid, qos in mids:
                self._ack(mid, qos)
        logger.info("%s: captions are written to %s again", self.device_id, self.captions_jsonl)

    def _write_caption(self, record: CaptionRecord, received_at: datetime,
                       retry: bool = False) -> bool:
        """Append to the JSONL, then count, print and hand on the caption; False (nothing else
        done) if the append failed."""
        if self.captions_jsonl is not None and not self._append_jsonl(record, received_at, retry):
            return False
        if record.captured_at is not None and len(self._latencies_ms) < LATENCY_SAMPLES:
            self._latencies_ms.append((received_at - record.captured_at).total_seconds() * 1000)
        self._recent_captions[record.frame_id] = None
        if len(self._recent_captions) > RECENT_CAPTIONS:
            self._recent_captions.popitem(last=False)
        self.stats.captions_received += 1
        if self.track_captions:
            if record.frame_id in self._awaiting_caption:
                self._awaiting_caption.discard(record.frame_id)
            elif record.frame_id in self.spool:  # listed and captioned before its ack came
                self._caption_before_ack.add(record.frame_id)
        logger.debug("%s: frame %s captioned: %r", self.device_id, record.frame_id, record.caption)
        if self.print_captions:
            print(format_caption(record), flush=True)
        if self.on_caption is not None:
            try:
                self.on_caption(record)
            except Exception:  # noqa: BLE001 - a user hook must not stop the publisher
                logger.exception("%s: frame %s: on_caption hook failed", self.device_id, record.frame_id)
        return True

    def _append_jsonl(self, record: CaptionRecord, received_at: datetime, retry: bool = False) -> bool:
        """Append one line, flushed and fsynced; False (logged, a partial line cut off) if not."""
        assert self.captions_jsonl is not None
        try:
            append_line(self.captions_jsonl, caption_line(record, received_at), self.captions_jsonl_max_bytes)
        except OSError as err:
            self.stats.caption_write_errors += 1
            log = logger.debug if retry else logger.error
            log("%s: frame %s: cannot append caption to %s: %s; not acknowledged, retried in "
                "%.0f s", self.device_id, record.frame_id, self.captions_jsonl, err,
                self._caption_retry_s)
            return False
        return True

    def caption_latency_ms(self) -> tuple[float | None, float | None]:
        """p50 and p95 of capture -> caption (``received_at - captured_at``), milliseconds, over
        the captions written by this process (None before the first)."""
        values = list(self._latencies_ms)
        return percentile(values, 0.5), percentile(values, 0.95)

    def stats_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for JSON)."""
        return asdict(self.stats)


def append_line(path: Path, line: str, max_bytes: int = 0) -> None:
    """Append ``line`` and a newline to ``path``, flushed and fsynced (survives a kill and a
    power cut). A failed write is cut back to the old length, so no partial line remains.

    With ``max_bytes`` > 0 the file is bounded: when the line would take it past
    ``max_bytes``, the file is first renamed to ``PATH.1`` (replacing the previous one) and a
    new file started, so the two use at most ``2 * max_bytes`` and no line is split.

    Raises:
        OSError: the file cannot be opened, written, rotated or synced.
    """
    data = memoryview((line + "\n").encode("utf-8"))
    if max_bytes > 0:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > max_bytes:
            os.replace(path, f"{path}.1")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
