"""Publishes spooled frames over MQTT and handles what comes back (acks, captions).

:class:`FramePublisher` owns one :class:`common.mqtt.MqttClient` (client_id from the device_id,
``clean_start=False``, last will ``offline`` retained on the status topic) and one worker
thread. Paho's network thread only puts events on a queue; the worker thread reads frames from
the spool, publishes them, removes acked frames and writes captions, so neither the capture
loop nor paho's loop ever waits on the disk or the network of the other.

Delivery (at least once; the ingest's idempotent S3 key makes it exactly once in S3):

- each spooled frame is published at QoS 1 to ``{prefix}/{device_id}/frames``, the raw JPEG as
  payload and :meth:`FrameMetadata.to_user_properties` beside it (MQTT v5 user properties);
- at most ``max_in_flight`` frames are published and not yet acked at any time, oldest first;
- a frame leaves the spool only when a :class:`FrameAck` for it arrives on the acks topic;
- frames not acked are resent after every reconnect (the broker may have lost what it had
  PUBACKed, e.g. killed with SIGKILL) and ``resend_after_s`` after their last send; frames
  found in the spool at start (a restart) are sent first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from common.config import MqttConfig
from common.messages import STATUS_OFFLINE, STATUS_ONLINE, CaptionRecord, FrameAck, MessageError
from common.mqtt import MqttClient, Will
from common.topics import Topics
from edge.spool import FrameSpool

logger = logging.getLogger(__name__)

POLL_S = 0.2  # worker thread wake-up period, seconds
RECENT_CAPTIONS = 10_000  # frame_ids remembered to drop a caption delivered twice
_QUEUED = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # paho keeps QoS 1 messages on NO_CONN


@dataclass
class PublisherStats:
    """Counters of a :class:`FramePublisher` (all since start)."""

    published: int = 0  # frames published for the first time by this process
    resent: int = 0  # further publishes of frames not yet acked
    acked: int = 0  # frames acked by the ingest and removed from the spool
    acks_unknown: int = 0  # acks for frames not in the spool (duplicates, dropped frames)
    acks_malformed: int = 0  # ack payloads that did not decode, or were for another device
    captions_received: int = 0
    captions_repeated: int = 0  # a caption for a frame already captioned (at-least-once MQTT)
    captions_malformed: int = 0
    publish_errors: int = 0  # publishes paho refused (retried later)


@dataclass
class _InFlight:
    mid: int
    sent_at: float  # time.monotonic() of the last publish
    attempts: int
    puback: bool = False  # the broker has acknowledged the last publish


def format_caption(record: CaptionRecord) -> str:
    """``HH:MM:SS frame_id caption`` (capture time in UTC; the error if there is no caption)."""
    when = record.captured_at.strftime("%H:%M:%S") if record.captured_at else "--:--:--"
    text = record.caption if record.caption else f"[no caption: {record.error or 'unknown'}]"
    return f"{when} {record.frame_id} {text}"


class FramePublisher:
    """Sends a :class:`FrameSpool`'s frames to the broker and removes them when acked.

    Args:
        device_id: this device (topics, client_id, log lines).
        mqtt_config: broker connection; ``client_id`` defaults to ``framecap-edge-{device_id}``.
        spool: where the frames wait; the publisher removes acked frames from it.
        resend_after_s: resend a frame not acked within this many seconds.
        max_in_flight: most frames published and not yet acked.
        captions_jsonl: append each caption received to this file (one JSON object a line).
        on_caption: called with each decoded :class:`CaptionRecord` (on the worker thread).
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
        captions_jsonl: Path | None = None,
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
        self.captions_jsonl = captions_jsonl
        self.on_caption = on_caption
        self.print_captions = print_captions
        self.stats = PublisherStats()
        self._frames_topic = self.topics.frames(device_id)
        self._status_topic = self.topics.status(device_id)
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._in_flight: dict[str, _InFlight] = {}
        self._mids: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = MqttClient(
            mqtt_config,
            mqtt_config.client_id or f"framecap-edge-{device_id}",
            will=Will(self._status_topic, STATUS_OFFLINE.encode(), qos=1, retain=True),
            clean_start=False,
        )
        self.client.on_connected(self._on_connected)
        self.client.on_disconnected(lambda: self._events.put(("disconnected", None)))
        self.client.on_published(lambda mid: self._events.put(("puback", mid)))
        self.client.subscribe(self.topics.acks(device_id), lambda m: self._events.put(("ack", m.payload)))
        self.client.subscribe(
            self.topics.captions(device_id), lambda m: self._events.put(("caption", m.payload))
        )

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and start the worker thread; returns at once."""
        self._thread = threading.Thread(target=self._run, name=f"publisher-{self.device_id}", daemon=True)
        self._thread.start()
        self.client.start()

    def notify(self) -> None:
        """Tell the worker a frame was spooled (never blocks)."""
        self._events.put(("wake", None))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker, publish ``offline`` (retained) and disconnect cleanly."""
        self._stop.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.client.is_connected:
            try:
                info = self.client.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
                info.wait_for_publish(timeout=min(2.0, timeout_s))
            except (RuntimeError, ValueError) as err:
                logger.warning("%s: could not publish status offline: %s", self.device_id, err)
        self.client.stop()
        logger.info("%s: publisher stopped (%d frames left in the spool)", self.device_id, len(self.spool))

    def captions_pending(self) -> int:
        """Frames acked by this process whose caption has not arrived (``track_captions``)."""
        return len(self._awaiting_caption)

    @property
    def in_flight(self) -> int:
        """Frames published and not yet acked (approximate outside the worker thread)."""
        return len(self._in_flight)

    # -- paho thread ---------------------------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        self.client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        self._events.put(("connected", session_present))

    # -- worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._handle_events()
                if self.client.is_connected:
                    self._resend_overdue()
                    self._fill_window()
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad step
                logger.exception("%s: publisher step failed; continuing", self.device_id)
                time.sleep(POLL_S)

    def _handle_events(self) -> None:
        try:
            kind, value = self._events.get(timeout=POLL_S)
        except queue.Empty:
            return
        while True:
            self._dispatch(kind, value)
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, kind: str, value: Any) -> None:
        if kind == "ack":
            self._handle_ack(value)
        elif kind == "caption":
            self._handle_caption(value)
        elif kind == "puback":
            frame_id = self._mids.pop(value, None)
            if frame_id is not None and frame_id in self._in_flight:
                self._in_flight[frame_id].puback = True
                logger.debug("%s: frame %s: broker has it (mid %d)", self.device_id, frame_id, value)
        elif kind == "connected":
            self._resend_after_reconnect()
        elif kind == "disconnected":
            logger.info("%s: offline; %d frames in flight will be resent", self.device_id, len(self._in_flight))

    def _resend_after_reconnect(self) -> None:
        """Resend frames the broker had PUBACKed (it may have lost them); paho resends the rest."""
        for frame_id, item in list(self._in_flight.items()):
            if item.puback:
                self._publish(frame_id, reason="reconnect")
            else:
                item.sent_at = time.monotonic()

    def _resend_overdue(self) -> None:
        now = time.monotonic()
        for frame_id, item in list(self._in_flight.items()):
            if frame_id not in self.spool:
                self._forget(frame_id)  # dropped from a full spool, or quarantined
            elif now - item.sent_at >= self.resend_after_s:
                self._publish(frame_id, reason=f"no ack in {self.resend_after_s:g} s")

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
        self._in_flight[frame_id] = _InFlight(info.mid, time.monotonic(), attempts)
        self._mids[info.mid] = frame_id
        if old is None and reason is None:
            self.stats.published += 1
            logger.info("%s: frame %s published (seq %d, %d bytes)",
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
    def _handle_ack(self, payload: bytes) -> None:
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
        self._forget(ack.frame_id)
        if self.spool.remove(ack.frame_id):
            self.stats.acked += 1
            if self.track_captions:
                if ack.frame_id in self._caption_before_ack:
                    self._caption_before_ack.discard(ack.frame_id)
                else:
                    self._awaiting_caption.add(ack.frame_id)
            logger.info("%s: frame %s acked, stored as %s", self.device_id, ack.frame_id, ack.key)
        else:
            self.stats.acks_unknown += 1
            logger.info("%s: frame %s: ack for a frame not in the spool (duplicate or dropped)",
                        self.device_id, ack.frame_id)

    def _handle_caption(self, payload: bytes) -> None:
        try:
            record = CaptionRecord.from_json(payload)
        except MessageError as err:
            self.stats.captions_malformed += 1
            logger.warning("%s: malformed caption ignored: %s", self.device_id, err)
            return
        if record.frame_id in self._recent_captions:
            self.stats.captions_repeated += 1
            logger.info("%s: frame %s: caption received again (a republish); ignored",
                        self.device_id, record.frame_id)
            return
        self._recent_captions[record.frame_id] = None
        if len(self._recent_captions) > RECENT_CAPTIONS:
            self._recent_captions.popitem(last=False)
        self.stats.captions_received += 1
        if self.track_captions:
            if record.frame_id in self._awaiting_caption:
                self._awaiting_caption.discard(record.frame_id)
            elif record.frame_id in self.spool:  # listed and captioned before its ack came
                self._caption_before_ack.add(record.frame_id)
        logger.info("%s: frame %s captioned: %r", self.device_id, record.frame_id, record.caption)
        if self.print_captions:
            print(format_caption(record), flush=True)
        if self.captions_jsonl is not None:
            self._append_jsonl(record)
        if self.on_caption is not None:
            try:
                self.on_caption(record)
            except Exception:  # noqa: BLE001 - a user hook must not stop the publisher
                logger.exception("%s: frame %s: on_caption hook failed", self.device_id, record.frame_id)

    def _append_jsonl(self, record: CaptionRecord) -> None:
        assert self.captions_jsonl is not None
        try:
            with open(self.captions_jsonl, "a", encoding="utf-8") as f:
                f.write(record.model_dump_json() + "\n")
        except OSError as err:
            logger.error("%s: frame %s: cannot append caption to %s: %s",
                         self.device_id, record.frame_id, self.captions_jsonl, err)

    def stats_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for JSON)."""
        return asdict(self.stats)
