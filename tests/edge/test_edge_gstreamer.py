"""edge.gstreamer: a GStreamer source with an OpenCV built without GStreamer is refused at start
with the fix (issue 8 item 12), read from real ``cv2.getBuildInformation()`` texts."""

from __future__ import annotations

import cv2
import pytest

from edge import gstreamer
from edge.capture import SourceKind, classify_source
from edge.gstreamer import check_source_backend, is_gstreamer_pipeline, opencv_has_gstreamer

CSI = ("nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv "
       "! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true")

# excerpts of cv2.getBuildInformation() as the builds print them
PIP_WHEEL = """
  Video I/O:
    DC1394:                      NO
    FFMPEG:                      YES
      avcodec:                   YES (59.37.100)
    GStreamer:                   NO
    v4l/v4l2:                    YES (linux/videodev2.h)
"""
JETPACK_6 = """
  Video I/O:
    FFMPEG:                      YES
    GStreamer:                   YES (1.20.3)
    v4l/v4l2:                    YES (linux/videodev2.h)
"""
OPENCV_3 = """
  Video I/O:
    GStreamer:""" + " " * 19 + """
      base:                      YES (ver 1.14.5)
      video:                     YES (ver 1.14.5)
    v4l/v4l2:                    NO
"""
OPENCV_3_WITHOUT = """
  Video I/O:
    GStreamer:                   NO
    v4l/v4l2:                    NO
"""


@pytest.mark.parametrize(("text", "has"), [(PIP_WHEEL, False), (JETPACK_6, True), (OPENCV_3, True),
                                           (OPENCV_3_WITHOUT, False), ("no video section", False)])
def test_build_information_is_read(text: str, has: bool) -> None:
    assert opencv_has_gstreamer(text) is has


@pytest.mark.parametrize("source", [CSI, "videotestsrc ! appsink", "0", "12", "rtsp://cam/stream",
                                    "clips/a.mp4", "file!name.mp4", " 0 "])
def test_pipeline_rule_is_the_capture_rule(source: str) -> None:
    assert is_gstreamer_pipeline(source) is (classify_source(source) is SourceKind.GSTREAMER)


def test_a_pipeline_with_pip_opencv_gets_the_fix() -> None:
    message = check_source_backend(CSI, PIP_WHEEL)
    assert message is not None
    for words in ("GStreamer pipeline", "built without GStreamer", "--system-site-packages",
                  "python3-opencv", "pip uninstall -y opencv-python-headless", "python -m edge.gstreamer"):
        assert words in message, words
    assert cv2.__version__ in message  # names the OpenCV that was imported
    assert "../" not in message


def test_a_pipeline_with_gstreamer_or_another_source_passes() -> None:
    assert check_source_backend(CSI, JETPACK_6) is None
    for source in ("0", "rtsp://cam/stream", "clip.mp4"):
        assert check_source_backend(source, PIP_WHEEL) is None


def test_the_imported_opencv_is_judged_by_its_own_build_information() -> None:
    has = "YES" in (gstreamer.gstreamer_build_value(cv2.getBuildInformation()) or "")
    assert opencv_has_gstreamer() is has
    assert (check_source_backend(CSI) is None) is has


def test_no_cv2_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gstreamer, "_build_information", lambda: None)
    assert opencv_has_gstreamer() is False
    message = check_source_backend(CSI)
    assert message is not None and "cannot be imported" in message
    assert check_source_backend("0") is None


@pytest.mark.parametrize(("text", "status"), [(JETPACK_6, 0), (PIP_WHEEL, 1), (None, 2)])
def test_main_exit_status(text: str | None, status: int, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gstreamer, "_build_information", lambda: text)
    assert gstreamer.main([]) == status
    out, err = capsys.readouterr()
    if status == 0:
        assert "GStreamer YES (1.20.3)" in out and not err
    else:
        assert "--system-site-packages" in err
