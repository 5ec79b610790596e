"""Which frames the edge sends: a fixed interval, then a scene-change filter.

A frame is a *candidate* when at least ``interval_s`` of source time has passed since the last
candidate (video time for files, wall time for live sources). With ``scene_change`` on, a
candidate is still skipped when it looks like the last frame *sent*: the mean absolute
difference of two small grey thumbnails (values in 0..1) is below ``scene_threshold``. A static
scene still sends one frame at least every ``max_static_s``, so the cloud knows it is alive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from common.config import SamplingConfig

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = (64, 48)  # (width, height) in pixels; fixed so a resolution change compares


@dataclass(frozen=True)
class SampleDecision:
    """What :meth:`FrameSampler.offer` decided.

    Attributes:
        send: True if the frame should be sent.
        reason: ``first``, ``interval`` (sent: scene change off), ``changed``, ``max_static``
            (sent), or ``too_soon``, ``static`` (skipped).
        difference: mean absolute difference (0..1) vs the last sent frame, when computed.
    """

    send: bool
    reason: str
    difference: float | None = None


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A small grey copy of a frame for comparison.

    Args:
        image: BGR (H, W, 3) or grey (H, W), uint8.

    Returns:
        float32 array of shape (48, 64) with values in 0..1.

    Raises:
        ValueError: if ``image`` is not a non-empty 2-D or 3-channel 3-D array.
    """
    if image.ndim == 3 and image.shape[2] == 3:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 2:
        grey = image
    else:
        raise ValueError(f"expected a (H, W, 3) or (H, W) frame, got shape {image.shape}")
    if grey.size == 0:
        raise ValueError("empty frame")
    small = cv2.resize(grey, THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def scene_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference (0..1) of two thumbnails of the same shape."""
    return float(np.mean(np.abs(a - b)))


class FrameSampler:
    """Decides, frame by frame, which frames to send (not thread-safe: one capture loop).

    Args:
        config: ``interval_s``, ``scene_change``, ``scene_threshold``, ``max_static_s``.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._last_candidate_s: float | None = None
        self._last_sent_s: float | None = None
        self._last_sent_thumb: np.ndarray | None = None
        self.offered = 0
        self.sent = 0
        self.skipped_static = 0

    def offer(self, image: np.ndarray, timestamp_s: float) -> SampleDecision:
        """Decide whether to send the frame ``image`` taken at ``timestamp_s`` (seconds)."""
        self.offered += 1
        if self._last_candidate_s is not None and timestamp_s < self._last_candidate_s:
            logger.info("sampler: source time went back (%.3f s < %.3f s); restarting the interval",
                        timestamp_s, self._last_candidate_s)
            self._last_candidate_s = self._last_sent_s = None
        if self._last_candidate_s is not None and (
            timestamp_s - self._last_candidate_s < self.config.interval_s - 1e-9
        ):
            return SampleDecision(False, "too_soon")
        self._last_candidate_s = timestamp_s
        if not self.config.scene_change:
            return self._sent(timestamp_s, None, "first" if self.sent == 0 else "interval", None)
        thumb = thumbnail(image)
        if self._last_sent_thumb is None or self._last_sent_s is None:
            return self._sent(timestamp_s, thumb, "first", None)
        diff = scene_difference(thumb, self._last_sent_thumb)
        if diff >= self.config.scene_threshold:
            return self._sent(timestamp_s, thumb, "changed", diff)
        if timestamp_s - self._last_sent_s >= self.config.max_static_s - 1e-9:
            return self._sent(timestamp_s, thumb, "max_static", diff)
        self.skipped_static += 1
        return SampleDecision(False, "static", diff)

    def _sent(
        self, timestamp_s: float, thumb: np.ndarray | None, reason: str, diff: float | None
    ) -> SampleDecision:
        self.sent += 1
        self._last_sent_s = timestamp_s
        if thumb is not None:
            self._last_sent_thumb = thumb
        return SampleDecision(True, reason, diff)
