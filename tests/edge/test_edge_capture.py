"""FrameSource: files, missing files, early ends, live reopen with backoff."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.capture import FrameSource, SourceError, SourceKind, classify_source


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("0", SourceKind.CAMERA),
        ("rtsp://user:pw@cam.local/stream", SourceKind.STREAM),
        ("https://example.org/live.m3u8", SourceKind.STREAM),
        ("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink", SourceKind.GSTREAMER),
        ("videos/street.mp4", SourceKind.FILE),
    ],
)
def test_classify_source(source: str, kind: SourceKind) -> None:
    assert classify_source(source) is kind


def test_file_frames_have_video_time(clip10: Path) -> None:
    src = FrameSource(str(clip10))
    frames = list(src.frames())
    assert len(frames) == 10
    assert frames[0].image.shape == (120, 160, 3) and frames[0].image.dtype == np.uint8
    assert [f.index for f in frames] == list(range(10))
    assert [round(f.timestamp_s, 3) for f in frames] == [round(i * 0.1, 3) for i in range(10)]
    assert all(f.captured_at.tzinfo is not None for f in frames)
    assert not src.ended_early and src.expected_frames == 10


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        list(FrameSource(str(tmp_path / "nope.avi")).frames())


class FakeCapture:
    """A capture that opens or not, returns ``n`` frames, and reports ``count`` frames."""

    def __init__(self, opened: bool, n: int = 0, count: float = 0.0) -> None:
        self.opened, self.left, self.count, self.released = opened, n, count, False

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.zeros((4, 4, 3), np.uint8)

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_COUNT: self.count, cv2.CAP_PROP_FPS: 10.0}.get(prop, 0.0)

    def release(self) -> None:
        self.released = True


def test_file_that_ends_early_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "short.avi"
    path.write_bytes(b"x")
    src = FrameSource(str(path), opener=lambda s, k: FakeCapture(True, n=3, count=10))
    frames = list(src.frames())
    assert len(frames) == 3 and src.ended_early
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.1, 0.2])


def test_live_source_reopens_with_exponential_backoff() -> None:
    # open fails 4 times, then 2 frames and the stream dies, then fails again, forever
    script = [FakeCapture(False) for _ in range(4)] + [FakeCapture(True, n=2)]
    script += [FakeCapture(False) for _ in range(3)]
    opened: list[FakeCapture] = []
    delays: list[float] = []
    stop = threading.Event()

    def opener(source: str, kind: SourceKind) -> FakeCapture:
        assert kind is SourceKind.STREAM
        cap = script[len(opened)] if len(opened) < len(script) else FakeCapture(False)
        opened.append(cap)
        return cap

    def wait(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 8:
            stop.set()

    src = FrameSource("rtsp://cam/stream", reopen_min_s=1, reopen_max_s=5, stop_event=stop,
                      opener=opener, wait=wait)
    frames = list(src.frames())
    assert len(frames) == 2
    # 1, 2, 4, 5 (capped); frames reset the delay: 1 after the stream dies; then 2, 4, 5
    assert delays == [1, 2, 4, 5, 1, 2, 4, 5]
    assert all(c.released for c in opened)
    assert src.reopens == 8


def test_stop_ends_a_live_source_during_backoff() -> None:
    stop = threading.Event()
    src = FrameSource("0", reopen_min_s=0.01, reopen_max_s=0.02, stop_event=stop,
                      opener=lambda s, k: FakeCapture(False))
    t = threading.Timer(0.1, src.stop)
    t.start()
    assert list(src.frames()) == []
    t.join()


def test_playback_speed_paces_a_file_and_zero_does_not(clip10: Path) -> None:
    """10 frames at 10 fps are 0.9 s of video: 0.3 s at speed 3, no wait at speed 0."""
    import time

    t0 = time.monotonic()
    assert len(list(FrameSource(str(clip10), playback_speed=3.0).frames())) == 10
    paced = time.monotonic() - t0
    t0 = time.monotonic()
    assert len(list(FrameSource(str(clip10)).frames())) == 10
    fast = time.monotonic() - t0
    assert 0.28 <= paced < 2.0 and fast < paced
    with pytest.raises(ValueError):
        FrameSource(str(clip10), playback_speed=-1)


def test_a_paced_file_stops_at_once_when_asked(clip10: Path) -> None:
    import time

    stop = threading.Event()
    src = FrameSource(str(clip10), playback_speed=0.1, stop_event=stop)  # 1 frame per second
    frames = src.frames()
    next(frames)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert list(frames) == []
    assert time.monotonic() - t0 < 0.9
