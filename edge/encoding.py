"""JPEG encoding under a payload cap (AWS IoT Core's MQTT limit is 128 KB).

Order of concessions (:func:`encode_jpeg`): scale down to ``max_width``; try qualities from
``quality`` down to ``min_quality``; then, at ``min_quality``, scale by 0.75 per step until the
JPEG fits. A frame that does not fit even at :data:`MIN_SIDE` pixels raises
:class:`EncodingError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from common.config import EncodingConfig

logger = logging.getLogger(__name__)

QUALITY_STEP = 10  # JPEG quality points per try
SCALE_STEP = 0.75  # linear scale per step once quality is at its floor
MIN_SIDE = 16  # pixels; smaller frames are useless for captioning


class EncodingError(ValueError):
    """A frame that cannot be encoded as a JPEG under the payload cap."""


@dataclass(frozen=True)
class EncodedFrame:
    """A JPEG and what it took.

    Attributes:
        jpeg: the JPEG bytes, ``len(jpeg) <= max_bytes``.
        width: width of the encoded image, pixels.
        height: height of the encoded image, pixels.
        quality: the JPEG quality used (0..100).
    """

    jpeg: bytes
    width: int
    height: int
    quality: int


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise EncodingError("expected a uint8 numpy array")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise EncodingError(f"expected a (H, W, 3) BGR or (H, W) grey frame, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise EncodingError(f"empty frame of shape {image.shape}")


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _imencode(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise EncodingError(f"OpenCV could not encode a {image.shape} frame as JPEG")
    return buf.tobytes()


def _qualities(config: EncodingConfig) -> list[int]:
    high, low = config.quality, min(config.min_quality, config.quality)
    steps = list(range(high, low, -QUALITY_STEP))
    return [*steps, low]


def encode_jpeg(image: np.ndarray, config: EncodingConfig | None = None) -> EncodedFrame:
    """Encode a frame as a JPEG of at most ``config.max_bytes`` bytes.

    Args:
        image: BGR (H, W, 3) or grey (H, W) uint8 pixels.
        config: ``max_bytes``, ``quality``, ``min_quality``, ``max_width``; defaults if None.

    Returns:
        The JPEG with its width and height in pixels and the quality used.

    Raises:
        EncodingError: a frame that is not a uint8 image, or that does not fit under the cap
            even at ``min_quality`` and :data:`MIN_SIDE` pixels.
    """
    config = config or EncodingConfig()
    _check_image(image)
    if image.shape[1] > config.max_width:
        image = _resize(image, config.max_width / image.shape[1])
    jpeg = b""
    quality = config.quality
    for quality in _qualities(config):
        jpeg = _imencode(image, quality)
        if len(jpeg) <= config.max_bytes:
            return EncodedFrame(jpeg, image.shape[1], image.shape[0], quality)
    while min(image.shape[:2]) * SCALE_STEP >= MIN_SIDE:
        image = _resize(image, SCALE_STEP)
        jpeg = _imencode(image, quality)
        if len(jpeg) <= config.max_bytes:
            logger.debug("frame scaled to %dx%d to fit %d bytes", image.shape[1], image.shape[0],
                         config.max_bytes)
            return EncodedFrame(jpeg, image.shape[1], image.shape[0], quality)
    raise EncodingError(
        f"frame does not fit in {config.max_bytes} bytes even at quality {quality} and "
        f"{image.shape[1]}x{image.shape[0]} pixels (smallest try: {len(jpeg)} bytes)"
    )
