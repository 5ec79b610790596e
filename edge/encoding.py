"""JPEG encoding under a payload cap (AWS IoT Core's MQTT limit is 128 KB).

Order of concessions (:func:`encode_jpeg`): scale down to ``max_width``; try qualities from
``quality`` down to ``min_quality``; then, at ``min_quality``, scale by 0.75 per step until the
JPEG fits. A frame that does not fit even at :data:`MIN_SIDE` pixels raises
:class:`EncodingError`.

:class:`JpegEncoder` does the same for a stream of frames, starting at the quality that fitted
the previous frame, so a camera whose frames are over the cap at ``quality`` (1280x720 at 85,
say) encodes each frame once, not twice (issue 9). It tries a higher quality again when a frame
comes out well under the cap, and not again for a while after such a try overshot.
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


STEP_RATIO = 1.4  # first guess of size(quality + QUALITY_STEP) / size(quality)
RETRY_HIGHER_AFTER = 100  # frames at a quality below ``quality`` before trying one step up anyway


class JpegEncoder:
    """Encodes a stream of frames under the cap, predicting each frame's quality from the
    previous frame (:func:`encode_jpeg`'s rules for each frame; not thread-safe).

    The next frame starts at the quality that fitted this one, or one step higher when this
    frame's size times the learnt size ratio of one quality step fits the cap (the ratio is
    learnt from frames encoded at two qualities), or when it has been lower for
    :data:`RETRY_HIGHER_AFTER` frames.

    Args:
        config: ``max_bytes``, ``quality``, ``min_quality``, ``max_width``; defaults if None.

    Attributes:
        encodes: JPEG encodings done so far (one per frame while the prediction holds).
    """

    def __init__(self, config: EncodingConfig | None = None) -> None:
        self.config = config or EncodingConfig()
        self._quality = self.config.quality  # where the next frame starts
        self._ratio = STEP_RATIO
        self._frames_lower = 0  # frames in a row encoded below config.quality
        self.encodes = 0

    def encode(self, image: np.ndarray) -> EncodedFrame:
        """Encode one frame under the cap (see :func:`encode_jpeg`).

        Raises:
            EncodingError: as :func:`encode_jpeg`.
        """
        config = self.config
        _check_image(image)
        if image.shape[1] > config.max_width:
            image = _resize(image, config.max_width / image.shape[1])
        ladder = [q for q in _qualities(config) if q <= self._quality]
        previous = 0  # size at the quality tried before, bytes
        for quality in ladder:
            jpeg = _imencode(image, quality)
            self.encodes += 1
            if len(jpeg) <= config.max_bytes:
                if previous and ladder[0] - quality == QUALITY_STEP:  # learn one step's ratio
                    self._ratio = 0.5 * self._ratio + 0.5 * previous / len(jpeg)
                self._predict(quality, len(jpeg))
                return EncodedFrame(jpeg, image.shape[1], image.shape[0], quality)
            previous = len(jpeg)
        self._quality = ladder[-1]  # scaled down at the lowest quality (rare)
        encoded = encode_jpeg(image, config.model_copy(update={"quality": self._quality}))
        self.encodes += 1
        return encoded

    def _predict(self, quality: int, size: int) -> None:
        """Where the next frame starts, from this frame's quality and size."""
        self._quality = quality
        if quality >= self.config.quality:
            self._frames_lower = 0
            return
        self._frames_lower += 1
        fits = size * self._ratio <= self.config.max_bytes
        if fits or self._frames_lower >= RETRY_HIGHER_AFTER:
            self._quality = min(self.config.quality, quality + QUALITY_STEP)
            self._frames_lower = 0
