"""Checks of frames: what the ingest refuses, and what the worker can caption.

:func:`validate_frame` (the ingest, ../shared/DESIGN.md) checks the topic, the metadata (MQTT v5
user properties), the payload's size and sha256, and the JPEG itself (header size, pixel limit,
end-of-image marker, and a decode at 1/8 scale in grey: libjpeg reads every entropy-coded
segment, at a quarter of a full decode's cost; the worker decodes fully anyway and gives an
image it cannot read an error record);
:func:`jpeg_dimensions` reads a JPEG's size from its start-of-frame segment (ITU-T T.81).
A refusal is an :class:`InvalidFrame` whose ``reason`` labels a counter. The worker reads a
stored frame with :func:`decode_image` and :func:`captured_at_from`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import cv2
import numpy as np

from common.messages import SCHEMA_VERSION, USER_PROPERTY_PREFIX, FrameMetadata, MessageError
from common.topics import FRAMES, FrameKey, InvalidIdError, Topics, frame_key, validate_id

logger = logging.getLogger(__name__)

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
    try:  # 1/8 scale in grey: every segment parsed, ~4x cheaper than a full decode
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    except cv2.error as err:
        raise InvalidFrame("undecodable", f"OpenCV: {err}"[:300], *ids) from err
    if image is None:
        raise InvalidFrame("undecodable", "OpenCV cannot decode the JPEG", *ids)
    expected = (-(-height // 8), -(-width // 8))  # libjpeg rounds a scaled size up
    if image.shape[:2] != expected:
        raise InvalidFrame(
            "size_mismatch",
            f"decoded shape {image.shape[:2]} at 1/8 scale is not that of {width}x{height}", *ids
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


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes (JPEG, PNG, ... as OpenCV reads them) into RGB uint8 (H, W, 3).

    Raises:
        ValueError: the bytes are not an image OpenCV can decode, or have too many pixels.
    """
    try:
        width, height = jpeg_dimensions(data)
    except ValueError:
        pass  # not a JPEG with a readable header: OpenCV decides (its own pixel limit applies)
    else:
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height}, more than {max_pixels} pixels")
    if not data:
        raise ValueError("the object is empty")
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ValueError(f"OpenCV cannot decode it: {err}") from err
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] == 0 or bgr.shape[1] == 0:
        raise ValueError("not an image OpenCV can decode")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise ValueError(f"image is {bgr.shape[1]}x{bgr.shape[0]}, more than {max_pixels} pixels")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def captured_at_from(metadata: dict[str, str], frame: FrameKey) -> datetime | None:
    """``captured_at`` from S3 object metadata if present, valid and about this frame."""
    if not metadata:
        return None
    try:
        meta = FrameMetadata.from_s3_metadata(metadata)
    except MessageError as err:
        logger.warning(
            "worker: frame %s of device %s: ignoring its metadata: %s",
            frame.frame_id,
            frame.device_id,
            err,
        )
        return None
    if (meta.device_id, meta.frame_id) != (frame.device_id, frame.frame_id):
        logger.warning(
            "worker: frame %s of device %s: metadata names frame %s of device %s; ignoring it",
            frame.frame_id,
            frame.device_id,
            meta.frame_id,
            meta.device_id,
        )
        return None
    return meta.captured_at
