"""Fakes and frame builders for the cloud unit tests (no network)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from common.messages import FrameMetadata
from common.storage import (
    BucketNotFoundError,
    ListedObject,
    ObjectNotFoundError,
    StorageError,
    StoredObject,
)

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k" / "images"
CAPTURED_AT = datetime(2026, 1, 31, 12, 0, 0, tzinfo=timezone.utc)


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A real JPEG of random noise, width x height pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def metadata_for(
    payload: bytes,
    device_id: str = "cam1",
    frame_id: str = "f000001",
    width: int = 64,
    height: int = 48,
) -> FrameMetadata:
    """FrameMetadata that matches ``payload`` (sha256) with the given size."""
    return FrameMetadata(
        device_id=device_id,
        frame_id=frame_id,
        captured_at=CAPTURED_AT,
        seq=1,
        width=width,
        height=height,
        sha256=hashlib.sha256(payload).hexdigest(),
    )


class FakeStore:
    """An in-memory ObjectStore; ``fail_next`` calls raise StorageError (an outage), or
    ``fail_with`` when set (e.g. a permanent error); ``bucket_exists=False`` makes every call
    raise BucketNotFoundError until :meth:`ensure_bucket`."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str], str]] = {}
        self.bucket = "fake"
        self.fail_next = 0
        self.fail_with: StorageError | None = None
        self.bucket_exists = True
        self.buckets_created = 0
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _maybe_fail(self, op: str, key: str) -> None:
        with self._lock:
            self.calls.append((op, key))
            if not self.bucket_exists:
                raise BucketNotFoundError(op, "fake", key, "NoSuchBucket", code="NoSuchBucket",
                                          permanent=True)
            if self.fail_next > 0:
                self.fail_next -= 1
                raise self.fail_with or StorageError(op, "fake", key, "fake outage")

    def ensure_bucket(self) -> bool:
        with self._lock:
            self.calls.append(("ensure_bucket", ""))
            created, self.bucket_exists = not self.bucket_exists, True
            self.buckets_created += created
            return created

    def put_if_absent(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> bool:
        self._maybe_fail("put", key)
        with self._lock:
            if key in self.objects:
                return False
            self.objects[key] = (bytes(body), dict(metadata or {}), content_type)
            return True

    def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        self._maybe_fail("put", key)
        with self._lock:
            self.objects[key] = (bytes(body), dict(metadata or {}), content_type)

    def delete(self, key: str) -> None:
        self._maybe_fail("delete", key)
        with self._lock:
            self.objects.pop(key, None)

    def _find(self, op: str, key: str) -> tuple[bytes, dict[str, str], str]:
        self._maybe_fail(op, key)
        obj = self.objects.get(key)
        if obj is None:
            raise ObjectNotFoundError(op, self.bucket, key, "NoSuchKey")
        return obj

    def head_metadata(self, key: str) -> dict[str, str]:
        return dict(self._find("head", key)[1])

    def get_object(self, key: str) -> StoredObject:
        body, metadata, content_type = self._find("get", key)
        return StoredObject(body, dict(metadata), content_type, None)

    def exists(self, key: str) -> bool:
        try:
            self._find("exists", key)
        except ObjectNotFoundError:
            return False
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        self._maybe_fail("list", prefix)
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def list_pages(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> Iterator[list[ListedObject]]:
        """As ObjectStore.list_pages; every object was stored at CAPTURED_AT."""
        self._maybe_fail("list", prefix)
        with self._lock:
            keys = sorted(k for k in self.objects
                          if k.startswith(prefix) and (start_after is None or k > start_after))
            sizes = [len(self.objects[k][0]) for k in keys]
        for i in range(0, max(len(keys), 1), page_size):
            yield [ListedObject(k, CAPTURED_AT, n)
                   for k, n in zip(keys[i:i + page_size], sizes[i:i + page_size], strict=True)]

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> Iterator[str]:
        self._maybe_fail("list", prefix)
        with self._lock:
            rests = [k[len(prefix):] for k in self.objects if k.startswith(prefix)]
        return iter(sorted({prefix + r.split(delimiter, 1)[0] + delimiter
                            for r in rests if delimiter in r}))


@dataclass
class _Info:
    rc: int = 0
    mid: int = 1


@dataclass
class FakeMqtt:
    """Records what the services ack and publish, in order."""

    events: list[tuple] = field(default_factory=list)
    is_connected: bool = False  # it sends no PUBACKs: the worker must not wait for them

    def ack(self, mid: int, qos: int) -> None:
        self.events.append(("ack", mid, qos))

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, **_: object) -> _Info:
        self.events.append(("publish", topic, payload, qos))
        return _Info()

    def published(self, suffix: str = "") -> list[tuple]:
        return [e for e in self.events if e[0] == "publish" and e[1].endswith(suffix)]

    def acks(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "ack"]


class FakeCaptioner:
    """Captions by mean colour; ``fail_on_red`` raises for images whose red mean > 200."""

    name = "fake-captioner"

    def __init__(self, fail_on_red: bool = False) -> None:
        self.batches: list[int] = []
        self.fail_on_red = fail_on_red

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        self.batches.append(len(images))
        out = []
        for image in images:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            if self.fail_on_red and image[..., 0].mean() > 200:
                raise RuntimeError("model cannot stand red")
            out.append((f"a picture {image.shape[1]} wide", -1.5))
        return out
