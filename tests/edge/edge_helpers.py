"""Helpers of the edge tests: small synthetic videos and a private mosquitto broker.

A module of its own (not conftest.py) so that test files can import it by a unique name."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
VTEST = REPO.parent / "shared" / "videos" / "vtest.avi"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Write BGR frames (H, W, 3) uint8 as an MJPG .avi; returns ``path``."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "cv2.VideoWriter could not open an MJPG .avi"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def moving_frames(n: int, w: int = 160, h: int = 120) -> list[np.ndarray]:
    """``n`` frames of a white square moving across a noisy background (every frame differs)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        x = (i * 7) % (w - 30)
        img[40:70, x : x + 30] = 255
        out.append(img)
    return out


def static_frames(n: int, w: int = 160, h: int = 120, change_every: int = 10) -> list[np.ndarray]:
    """``n`` frames of a scene that changes only every ``change_every`` frames (mostly static)."""
    out = []
    for i in range(n):
        level = 40 + 60 * ((i // change_every) % 3)
        img = np.full((h, w, 3), level, dtype=np.uint8)
        cv2.putText(img, "static", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        out.append(img)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto process on 127.0.0.1 (anonymous, persistence off) that can be restarted."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "user root\nmax_queued_messages 10000\nlog_dest stderr\nlog_type error\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    raise RuntimeError(f"mosquitto exited: {err!r}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def kill(self) -> None:
        """SIGKILL: the broker loses every message and session it held (persistence off)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
