"""FrameSampler: fixed interval in source time, scene change against the last frame sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edge_helpers import moving_frames, static_frames, write_clip

from common.config import SamplingConfig
from edge.capture import FrameSource
from edge.sampling import FrameSampler, scene_difference, thumbnail


def _sent_times(sampler: FrameSampler, frames: list[np.ndarray], fps: float) -> list[float]:
    return [i / fps for i, f in enumerate(frames) if sampler.offer(f, i / fps).send]


def test_interval_only_sends_one_frame_per_interval() -> None:
    frames = moving_frames(30)
    sampler = FrameSampler(SamplingConfig(interval_s=0.5, scene_change=False))
    assert _sent_times(sampler, frames, fps=10) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_interval_restarts_when_source_time_goes_back() -> None:
    sampler = FrameSampler(SamplingConfig(interval_s=1.0, scene_change=False))
    img = np.zeros((8, 8, 3), np.uint8)
    assert sampler.offer(img, 100.0).send
    assert not sampler.offer(img, 100.5).send
    assert sampler.offer(img, 3.0).send  # clock jump back (or a new file): send at once


def test_scene_change_skips_a_static_scene_but_sends_every_max_static() -> None:
    img = np.full((60, 80, 3), 90, np.uint8)
    sampler = FrameSampler(SamplingConfig(interval_s=1.0, scene_threshold=0.02, max_static_s=5.0))
    sent = [t for t in range(12) if sampler.offer(img, float(t)).send]
    assert sent == [0, 5, 10]
    other = np.full((60, 80, 3), 200, np.uint8)
    decision = sampler.offer(other, 12.0)
    assert decision.send and decision.reason == "changed"
    assert decision.difference is not None and decision.difference > 0.3


def test_thumbnail_difference_is_in_unit_range() -> None:
    black = thumbnail(np.zeros((576, 768, 3), np.uint8))
    white = thumbnail(np.full((100, 50, 3), 255, np.uint8))  # another size compares too
    assert black.shape == white.shape == (48, 64)
    assert scene_difference(black, white) == 1.0
    assert scene_difference(black, black) == 0.0


def test_mostly_static_clip_sends_fewer_frames_than_interval(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "static.avi", static_frames(40, change_every=10), fps=10)
    counts = {}
    for name, scene in (("interval", False), ("scene", True)):
        sampler = FrameSampler(SamplingConfig(interval_s=0.2, scene_change=scene, scene_threshold=0.05))
        counts[name] = sum(
            sampler.offer(f.image, f.timestamp_s).send for f in FrameSource(str(clip)).frames()
        )
    assert counts["interval"] == 20
    assert counts["scene"] == 4  # the first frame and one per scene change
