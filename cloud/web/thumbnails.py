"""Thumbnails of frames: OpenCV resize to about 320 px wide, kept in a small LRU cache."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import cv2
import numpy as np

logger = logging.getLogger(__name__)

THUMBNAIL_WIDTH = 320
"""Width of a thumbnail in pixels (height keeps the aspect ratio)."""
THUMBNAIL_QUALITY = 80
"""JPEG quality of thumbnails (0..100)."""


class ThumbnailError(ValueError):
    """The frame's bytes are not an image OpenCV can decode."""


def make_thumbnail(jpeg: bytes, width: int = THUMBNAIL_WIDTH, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A JPEG of at most ``width`` pixels wide (``cv2.INTER_AREA``; a smaller frame keeps its
    size), aspect ratio kept.

    Raises:
        ThumbnailError: ``jpeg`` cannot be decoded or the result cannot be encoded.
    """
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)  # (H, W, 3) BGR
    if image is None or image.size == 0:
        raise ThumbnailError(f"the frame ({len(jpeg)} bytes) is not a decodable image")
    h, w = image.shape[:2]
    if w > width:
        height = max(1, round(h * width / w))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)  # (height, width, 3)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ThumbnailError("the thumbnail could not be encoded as JPEG")
    return buf.tobytes()


class ThumbnailCache:
    """Least-recently-used cache of thumbnails by frame key, bounded in bytes. Thread-safe."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        """The cached thumbnail of ``key`` (now the most recent), or None."""
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> None:
        """Cache ``data`` under ``key``, evicting the least recently used past the bound."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
