"""Can this OpenCV open a GStreamer pipeline? Checked once at the edge's start.

pip's ``opencv-python`` and ``opencv-python-headless`` wheels are built without GStreamer, so
``cv2.VideoCapture("nvarguscamerasrc ! ... ! appsink", cv2.CAP_GSTREAMER)`` never opens with
them: a live source is then retried forever with "cannot open gstreamer source". A Jetson's
CSI camera needs an OpenCV built with GStreamer: JetPack's (``nvidia-opencv``) or the
distribution's (``python3-opencv``), seen from a venv made with ``--system-site-packages`` and
without pip's OpenCV in it (the edge install script in ``deploy/scripts/install-edge.sh`` of the
framecap source does this).

:func:`check_source_backend` returns the message to print before exiting with status 2; run
``python -m edge.gstreamer`` to see which OpenCV is imported and whether it has GStreamer
(exit status 0: yes, 1: no, 2: no OpenCV at all).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

logger = logging.getLogger(__name__)

_GSTREAMER_LINE = re.compile(r"^[ \t]*GStreamer:[ \t]*(?P<value>[^\n]*?)[ \t]*$", re.MULTILINE)
# OpenCV 3.x: an empty GStreamer line, then "base: YES (ver 1.14.5)" below it
_GSTREAMER_BASE_LINE = re.compile(r"\A\n[ \t]*base:[ \t]*(?P<value>[^\n]*?)[ \t]*$", re.MULTILINE)

FIX = (
    "On a Jetson use JetPack's OpenCV, which has GStreamer: apt-get install python3-opencv "
    "(or nvidia-opencv), make the venv with 'python3 -m venv --system-site-packages', install "
    "framecap without its 'edge' extra and remove pip's OpenCV from the venv "
    "('pip uninstall -y opencv-python-headless opencv-python'); deploy/scripts/install-edge.sh "
    "in the framecap source does all of this. Check with 'python -m edge.gstreamer'. "
    "Without GStreamer, use a camera index ('0'), a video file or an rtsp:// URL as source."
)


def gstreamer_build_value(build_information: str) -> str | None:
    """The value of the ``GStreamer:`` line of ``cv2.getBuildInformation()`` text.

    Returns:
        e.g. ``"YES (1.20.3)"`` or ``"NO"`` (OpenCV 3.x: its ``base:`` line); None when the
        text has no such line.
    """
    match = _GSTREAMER_LINE.search(build_information)
    if match is None:
        return None
    if match.group("value"):
        return match.group("value")
    base = _GSTREAMER_BASE_LINE.search(build_information[match.end():])
    return base.group("value") if base else ""


def _build_information() -> str | None:
    """``cv2.getBuildInformation()``, or None when cv2 cannot be imported."""
    try:
        import cv2
    except ImportError as err:
        logger.debug("cv2 is not importable: %s", err)
        return None
    return str(cv2.getBuildInformation())


def opencv_has_gstreamer(build_information: str | None = None) -> bool:
    """True if OpenCV was built with its GStreamer video I/O backend.

    Args:
        build_information: text of ``cv2.getBuildInformation()``; read from the imported cv2
            when None (False if cv2 cannot be imported).
    """
    text = build_information if build_information is not None else _build_information()
    if text is None:
        return False
    value = gstreamer_build_value(text)
    return value is not None and value.upper().startswith("YES")


def is_gstreamer_pipeline(source: str) -> bool:
    """True if the edge opens ``source`` as a GStreamer pipeline (it contains ``!``).

    The same rule as ``edge.capture.classify_source`` (a camera index is digits only).
    """
    text = source.strip()
    return "!" in text and not text.isdigit()


def _opencv_description() -> str:
    """``OpenCV 4.8.0 (/usr/lib/python3/dist-packages/cv2/...)`` for messages."""
    try:
        import cv2
    except ImportError:
        return "no OpenCV"
    return f"OpenCV {getattr(cv2, '__version__', '?')} ({getattr(cv2, '__file__', '?')})"


def check_source_backend(source: str, build_information: str | None = None) -> str | None:
    """Say why ``source`` cannot be opened by this OpenCV, or None if nothing is wrong.

    Only GStreamer pipelines are checked: any OpenCV opens camera indexes, files and streams.

    Args:
        source: the edge's ``source`` setting.
        build_information: ``cv2.getBuildInformation()`` text (read from cv2 when None).

    Returns:
        None, or one message naming the OpenCV in use and the fix; the edge prints it and
        exits with status 2.
    """
    if not is_gstreamer_pipeline(source):
        return None
    if opencv_has_gstreamer(build_information):
        return None
    if build_information is None and _build_information() is None:
        what = "OpenCV (cv2) cannot be imported"
    else:
        what = f"this {_opencv_description()} was built without GStreamer (pip's OpenCV wheels never have it)"
    return f"the source is a GStreamer pipeline, but {what}, so it can never be opened. {FIX}"


def main(argv: list[str] | None = None) -> int:
    """``python -m edge.gstreamer``: print the OpenCV in use and whether it has GStreamer.

    Returns:
        0 if it has GStreamer, 1 if not, 2 if cv2 cannot be imported.
    """
    argparse.ArgumentParser(
        prog="python -m edge.gstreamer",
        description="Say which OpenCV the edge imports and whether it can open GStreamer "
        "pipelines (a Jetson CSI camera: 'nvarguscamerasrc ! ... ! appsink'). "
        "Exit status 0: yes, 1: no, 2: OpenCV cannot be imported.",
    ).parse_args(argv)
    text = _build_information()
    if text is None:
        print(f"OpenCV (cv2) cannot be imported. {FIX}", file=sys.stderr)
        return 2
    value = gstreamer_build_value(text) or "not reported"
    print(f"{_opencv_description()}: GStreamer {value}")
    if not opencv_has_gstreamer(text):
        print(f"GStreamer pipelines cannot be opened. {FIX}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
