"""Frames from a camera, a video file, an RTSP/HTTP stream or a GStreamer pipeline.

:class:`FrameSource` wraps ``cv2.VideoCapture`` and yields :class:`CapturedFrame` objects.
What the source string means (:func:`classify_source`):

- ``"0"``, ``"1"``, ...: a camera index (V4L2 on Linux).
- ``rtsp://``, ``rtsps://``, ``http://``, ``https://``, ``udp://``, ``tcp://``: a network stream,
  opened with the FFmpeg backend.
- anything containing ``!``: a GStreamer pipeline, opened with ``cv2.CAP_GSTREAMER`` (OpenCV
  must be built with GStreamer, as the Jetson's L4T OpenCV is). A Jetson CSI camera::

      nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1
        ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR
        ! appsink drop=true max-buffers=1

- anything else: a video file path.

Cameras, streams and pipelines are *live*: a source that fails to open or stops returning
frames is reopened with exponential backoff (``reopen_min_s`` doubling up to ``reopen_max_s``)
until :meth:`FrameSource.stop` is called. A file is not live: a missing file raises
:class:`SourceError`, and its end is the end of the iteration (logged as early if fewer frames
came than the container announced).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

logger = logging.getLogger(__name__)

STREAM_TIMEOUT_MS = 10_000  # open and read timeout of network streams, milliseconds
PACE_SLACK_S = 1.0  # a paced file reader this far behind its clock restarts the clock, seconds
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class SourceError(RuntimeError):
    """A source that cannot be used at all (e.g. a video file that does not exist)."""


class SourceKind(enum.Enum):
    """How a source string is opened."""

    CAMERA = "camera"
    STREAM = "stream"
    GSTREAMER = "gstreamer"
    FILE = "file"

    @property
    def is_live(self) -> bool:
        """Live sources are reopened when lost and timed by the wall clock."""
        return self is not SourceKind.FILE


def classify_source(source: str) -> SourceKind:
    """Say whether ``source`` is a camera index, a stream URL, a GStreamer pipeline or a file."""
    text = source.strip()
    if text.isdigit():
        return SourceKind.CAMERA
    if "!" in text:
        return SourceKind.GSTREAMER
    if text.lower().startswith(STREAM_SCHEMES):
        return SourceKind.STREAM
    return SourceKind.FILE


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` that :class:`FrameSource` uses (fakes in tests)."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def get(self, prop: int) -> float: ...

    def release(self) -> None: ...


def open_capture(source: str, kind: SourceKind) -> Capture:
    """Open ``source`` with the OpenCV backend that suits ``kind``; may return a closed capture."""
    if kind is SourceKind.CAMERA:
        return cv2.VideoCapture(int(source.strip()))
    if kind is SourceKind.GSTREAMER:
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    if kind is SourceKind.STREAM:
        # bound a dead camera's open and read (OpenCV >= 4.5.2), so a stall becomes a reopen
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(source)


@dataclass(frozen=True)
class CapturedFrame:
    """One frame as read from the source.

    Attributes:
        image: BGR pixels, shape (height, width, 3), dtype uint8.
        index: 0-based count of frames read from this source (a file: position in the file).
        timestamp_s: source time in seconds: video time for a file (``CAP_PROP_POS_MSEC``,
            else index / fps), wall time (``time.time()``) for a live source.
        captured_at: UTC wall clock when the frame was read.
    """

    image: np.ndarray
    index: int
    timestamp_s: float
    captured_at: datetime


class FrameSource:
    """Iterate over the frames of one source, reopening a live source when it is lost.

    Args:
        source: camera index, file path, stream URL or GStreamer pipeline (see module doc).
        reopen_min_s: first delay before reopening a lost live source, seconds.
        reopen_max_s: longest delay between reopen attempts, seconds.
        stop_event: set it (or call :meth:`stop`) to end the iteration and any backoff wait.
        opener: makes a capture from (source, kind); ``cv2.VideoCapture`` by default.
        wait: sleeps the backoff delay in seconds; ``stop_event.wait`` by default (tests fake it).
        label: name used in log lines (usually the device_id).
        playback_speed: pace a video file at this multiple of its frame rate (1.0: real time,
            so a file behaves like a camera for demos and fault tests); 0: as fast as it decodes.
            A reader that falls more than :data:`PACE_SLACK_S` behind (a pause) restarts the
            clock instead of bursting to catch up. Live sources are never paced.

    Raises:
        SourceError: from :meth:`frames` if a file source does not exist or cannot be opened.
    """

    def __init__(
        self,
        source: str,
        *,
        reopen_min_s: float = 1.0,
        reopen_max_s: float = 30.0,
        stop_event: threading.Event | None = None,
        opener: Callable[[str, SourceKind], Capture] = open_capture,
        wait: Callable[[float], object] | None = None,
        label: str = "edge",
        playback_speed: float = 0.0,
    ) -> None:
        if reopen_min_s <= 0 or reopen_max_s < reopen_min_s:
            raise ValueError("need 0 < reopen_min_s <= reopen_max_s")
        if playback_speed < 0:
            raise ValueError("need playback_speed >= 0")
        self.playback_speed = playback_speed
        self.source = source
        self.kind = classify_source(source)
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self._stop = stop_event or threading.Event()
        self._opener = opener
        self._wait = wait or self._stop.wait
        self.label = label
        self.frames_read = 0
        self.reopens = 0
        self.expected_frames: int | None = None
        self.ended_early = False

    @property
    def is_live(self) -> bool:
        return self.kind.is_live

    def stop(self) -> None:
        """End the iteration at the next frame or backoff wait; thread-safe."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def describe(self) -> str:
        """The source for log lines (a URL's user:password is hidden)."""
        if self.kind is SourceKind.STREAM and "@" in self.source:
            scheme, _, rest = self.source.partition("://")
            return f"{scheme}://***@{rest.rpartition('@')[2]}"
        return self.source

    def frames(self) -> Iterator[CapturedFrame]:
        """Yield frames until the file ends or :meth:`stop` is called.

        Raises:
            SourceError: a file source that does not exist or that OpenCV cannot open.
        """
        if self.is_live:
            yield from self._live_frames()
        else:
            yield from self._file_frames()

    # -- files ---------------------------------------------------------------------------
    def _file_frames(self) -> Iterator[CapturedFrame]:
        path = Path(self.source)
        if not path.is_file():
            raise SourceError(f"{self.label}: video file {self.source!r} does not exist")
        cap = self._opener(self.source, self.kind)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.label}: OpenCV cannot open video file {self.source!r}")
        fps = _positive(cap.get(cv2.CAP_PROP_FPS))
        count = _positive(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.expected_frames = int(count) if count else None
        logger.info(
            "%s: opened video file %s (%s frames at %s fps)",
            self.label, self.source, self.expected_frames or "?", fps or "?",
        )
        index = 0
        clock: tuple[float, float] | None = None  # (wall time, video time) the pace counts from
        try:
            while not self.stopped:
                ok, image = cap.read()
                if not ok or image is None:
                    break
                ts = _video_time_s(cap, index, fps)
                if self.playback_speed > 0:
                    clock = self._pace(clock, ts)
                    if self.stopped:
                        break
                self.frames_read += 1
                yield CapturedFrame(image, index, ts, datetime.now(timezone.utc))
                index += 1
        finally:
            cap.release()
        self._report_file_end(index)

    def _pace(self, clock: tuple[float, float] | None, ts: float) -> tuple[float, float]:
        """Sleep until video time ``ts`` is due at :attr:`playback_speed`; returns the clock."""
        now = time.monotonic()
        if clock is None:
            return now, ts
        due = clock[0] + (ts - clock[1]) / self.playback_speed
        if now - due > PACE_SLACK_S:  # paused (a full spool) or too slow: count from here
            return now, ts
        if due > now:
            self._stop.wait(due - now)
        return clock

    def _report_file_end(self, read: int) -> None:
        if self.stopped:
            logger.info("%s: stopped reading %s after %d frames", self.label, self.source, read)
        elif self.expected_frames and read < self.expected_frames:
            self.ended_early = True
            logger.warning(
                "%s: video file %s ended early: %d of %d frames read (truncated or corrupt?)",
                self.label, self.source, read, self.expected_frames,
            )
        else:
            logger.info("%s: video file %s ended after %d frames", self.label, self.source, read)

    # -- live sources --------------------------------------------------------------------
    def _live_frames(self) -> Iterator[CapturedFrame]:
        delay = self.reopen_min_s
        index = 0
        while not self.stopped:
            cap = self._opener(self.source, self.kind)
            if not cap.isOpened():
                cap.release()
                logger.warning(
                    "%s: cannot open %s source %s; retrying in %.1f s",
                    self.label, self.kind.value, self.describe(), delay,
                )
                delay = self._backoff(delay)
                continue
            logger.info("%s: opened %s source %s", self.label, self.kind.value, self.describe())
            try:
                while not self.stopped:
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    delay = self.reopen_min_s  # a frame came: the next loss starts afresh
                    self.frames_read += 1
                    yield CapturedFrame(image, index, time.time(), datetime.now(timezone.utc))
                    index += 1
            finally:
                cap.release()
            if self.stopped:
                break
            logger.warning(
                "%s: %s source %s stopped returning frames; reopening in %.1f s",
                self.label, self.kind.value, self.describe(), delay,
            )
            delay = self._backoff(delay)
        logger.info("%s: stopped reading %s after %d frames", self.label, self.describe(), index)

    def _backoff(self, delay: float) -> float:
        """Wait ``delay`` seconds (or until stopped); return the next, doubled, delay."""
        self._wait(delay)
        self.reopens += 1
        return min(delay * 2, self.reopen_max_s)


def _positive(value: float) -> float | None:
    return value if value and value > 0 and value == value else None


def _video_time_s(cap: Capture, index: int, fps: float | None) -> float:
    """Video time of the frame just read, seconds: ``CAP_PROP_POS_MSEC``, else index / fps."""
    pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
    if pos_ms and pos_ms > 0:
        return float(pos_ms) / 1000.0
    if index == 0:
        return 0.0
    return index / fps if fps else float(index)
