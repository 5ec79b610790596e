"""Live captions: one hub fans each new caption out to every server-sent-events client.

:meth:`LiveHub.publish` may be called from any thread (paho's network thread, a test): it never
blocks and never waits for a client. Each subscriber owns a bounded :class:`asyncio.Queue` on
its event loop; the hub hands it the caption with ``loop.call_soon_threadsafe``. A slow client
whose queue is full loses its oldest caption (counted in :attr:`Subscription.dropped` and
:attr:`LiveHub.dropped`), never the publisher's time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Collection
from types import TracebackType

from cloud.web.model import CaptionDoc

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256
"""Captions one client may fall behind by before its oldest are dropped."""


class _Closed:
    """Sentinel put in a queue when the hub or the subscription closes."""


_CLOSED = _Closed()


class Subscription:
    """One client's stream of captions: an async iterator of :class:`CaptionDoc`.

    Made by :meth:`LiveHub.subscribe` inside the event loop that will read it. Use as
    ``async with hub.subscribe(...) as sub: async for doc in sub: ...`` or call :meth:`close`.
    """

    def __init__(self, hub: LiveHub, loop: asyncio.AbstractEventLoop,
                 allowed: frozenset[str] | None, device: str | None, maxsize: int) -> None:
        self._hub = hub
        self._loop = loop
        self.allowed = allowed
        self.device = device
        self.queue: asyncio.Queue[CaptionDoc | _Closed] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0
        self.closed = False

    def wants(self, doc: CaptionDoc) -> bool:
        """Whether this client may and wants to see ``doc``."""
        if self.allowed is not None and doc.device_id not in self.allowed:
            return False
        return self.device is None or doc.device_id == self.device

    def _put(self, item: CaptionDoc | _Closed) -> None:
        """In the subscriber's loop: enqueue, dropping the oldest caption if full."""
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                try:
                    self.queue.get_nowait()
                except asyncio.QueueEmpty:  # pragma: no cover - raced with the reader
                    continue
                self.dropped += 1
                self._hub._count_drop()

    def _offer(self, item: CaptionDoc | _Closed) -> bool:
        """From any thread; False if the subscriber's loop is gone."""
        try:
            if _running_loop() is self._loop:
                self._put(item)
            else:
                self._loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # loop closed
            return False
        return True

    async def get(self, timeout_s: float | None = None) -> CaptionDoc | None:
        """The next caption; None after ``timeout_s`` seconds without one.

        Raises:
            StopAsyncIteration: the subscription or the hub was closed.
        """
        if self.closed and self.queue.empty():
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None
        if isinstance(item, _Closed):
            self.closed = True
            raise StopAsyncIteration
        return item

    def __aiter__(self) -> AsyncIterator[CaptionDoc]:
        return self

    async def __anext__(self) -> CaptionDoc:
        while True:
            doc = await self.get(None)
            if doc is not None:
                return doc

    def close(self) -> None:
        """Stop receiving (idempotent)."""
        self._hub._remove(self)
        if not self.closed:
            self.closed = True
            self._offer(_CLOSED)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LiveHub:
    """Fan-out of new captions to live clients. Thread-safe; see the module docstring.

    Args:
        queue_size: per-client bound (captions); the oldest is dropped when full.
    """

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.published = 0
        self.dropped = 0

    def _count_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def subscribe(self, allowed: Collection[str] | None = None,
                  device: str | None = None) -> Subscription:
        """A new client stream of the captions of ``allowed`` devices (None: all), only
        ``device`` if given. Call from inside the event loop that will read it.

        Raises:
            RuntimeError: no running event loop, or the hub is closed.
        """
        loop = asyncio.get_running_loop()
        sub = Subscription(self, loop, None if allowed is None else frozenset(allowed), device,
                           self.queue_size)
        with self._lock:
            if self._closed:
                raise RuntimeError("the live hub is closed")
            self._subs.add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def clients(self) -> int:
        """How many clients are subscribed now."""
        with self._lock:
            return len(self._subs)

    def publish(self, doc: CaptionDoc) -> int:
        """Hand ``doc`` to every client that may see it; returns to how many. Never blocks."""
        with self._lock:
            if self._closed:
                return 0
            self.published += 1
            subs = [s for s in self._subs if s.wants(doc)]
        sent = 0
        for sub in subs:
            if sub._offer(doc):
                sent += 1
            else:
                self._remove(sub)
        return sent

    def close(self) -> None:
        """End every client's stream (their iterators stop); later publishes are ignored."""
        with self._lock:
            self._closed = True
            subs = list(self._subs)
            self._subs.clear()
        for sub in subs:
            if not sub.closed:
                sub.closed = True
                sub._offer(_CLOSED)
