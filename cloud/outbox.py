"""The caption worker's outbox: no caption is lost between S3 and MQTT.

Before writing a caption record the worker puts a marker ``outbox/{client_id}/{caption_key}``
and deletes it only when the broker has acknowledged (PUBACK) the caption's publish, or when
another replica wrote the record first. A marker left by a worker killed in between, or kept
because the broker refused the publish (MQTT v5 PUBACK failure, e.g. "not authorized": the
caption was not delivered), is found by a later listing and its record published again: at
once for the worker's own markers after a restart, after one more listing otherwise.
"""

from __future__ import annotations

import logging
import queue
import threading

from common.storage import ObjectStore, StorageError

logger = logging.getLogger(__name__)

OUTBOX_PREFIX = "outbox/"  # outbox/{client_id}/{caption_key}: written, publish not acknowledged


def caption_key_of(marker: str) -> str:
    """The ``captions/...`` key a marker stands for, or ``""`` if it names none."""
    caption_key = marker.split("/", 2)[2] if marker.count("/") >= 2 else ""
    return caption_key if caption_key.startswith("captions/") else ""


class CaptionOutbox:
    """The outbox markers of one worker: which publishes wait for their PUBACK, which markers
    can go, and which markers found in a listing are due for a republish. Thread-safe.

    Args:
        client_id: the worker's MQTT client_id; its markers are ``outbox/{client_id}/...``
            (a ``/`` in it made ``_``).
    """

    def __init__(self, client_id: str) -> None:
        self.mine = f"{OUTBOX_PREFIX}{client_id.replace('/', '_')}/"
        self._by_mid: dict[int, str] = {}  # publish mid -> its outbox marker key
        self._early_pubacks: set[int] = set()  # PUBACKs that came before the mid was recorded
        self._early_refusals: set[int] = set()  # refusals that came before the mid was recorded
        self._lock = threading.Lock()  # never held while calling paho (its own locks)
        self._done: queue.Queue[str] = queue.Queue()  # markers whose publish was acked
        self._seen: set[str] | None = None  # markers of the previous listing

    def marker(self, caption_key: str) -> str:
        """This worker's marker for ``caption_key``."""
        return self.mine + caption_key

    def published(self, mid: int, marker: str) -> None:
        """A caption was published with ``mid``; its marker goes when the PUBACK comes (which
        may have come already, before publish() returned)."""
        with self._lock:
            if mid in self._early_refusals:  # refused already: the marker stays
                self._early_refusals.discard(mid)
                return
            if mid in self._early_pubacks:
                self._early_pubacks.discard(mid)
                acked = True
            else:
                self._by_mid[mid] = marker
                acked = False
        if acked:
            self._done.put(marker)

    def acknowledged(self, mid: int) -> None:
        """MQTT network thread: the broker acknowledged publish ``mid``."""
        with self._lock:
            marker = self._by_mid.pop(mid, None)
            if marker is None:
                self._early_pubacks.add(mid)
        if marker is not None:
            self._done.put(marker)

    def refused(self, mid: int) -> str | None:
        """MQTT network thread: the broker refused publish ``mid`` (not delivered). Its marker
        stays, so a later listing publishes the record again. Returns the marker if known."""
        with self._lock:
            marker = self._by_mid.pop(mid, None)
            if marker is None:
                self._early_refusals.add(mid)
        return marker

    def done(self, marker: str) -> None:
        """``marker`` can go (nothing to wait for)."""
        self._done.put(marker)

    def waiting(self) -> bool:
        """True while a publish waits for its PUBACK."""
        with self._lock:
            return bool(self._by_mid)

    def clear(self, store: ObjectStore) -> None:
        """Delete the markers that can go (a failure only means a repeated caption later)."""
        while True:
            try:
                marker = self._done.get_nowait()
            except queue.Empty:
                return
            try:
                store.delete(marker)
            except StorageError as err:
                logger.warning("worker: outbox marker %s not deleted: %s", marker, err)

    def due(self, markers: set[str]) -> list[str]:
        """Of the markers a listing found, those to republish now: not waiting for a PUBACK
        here, and either this worker's own on the first listing or seen by the previous one."""
        with self._lock:
            waiting = set(self._by_mid.values())
        first = self._seen is None
        seen = self._seen or set()
        self._seen = set()
        due = []
        for marker in sorted(markers - waiting):
            if marker in seen or (first and marker.startswith(self.mine)):
                due.append(marker)
            else:
                self._seen.add(marker)
        return due
