"""Fixtures of the edge tests: small synthetic videos and a private mosquitto broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_helpers import MOSQUITTO, Broker, moving_frames, write_clip


@pytest.fixture
def clip10(tmp_path: Path) -> Path:
    """A 10-frame, 10 fps, 160x120 moving clip."""
    return write_clip(tmp_path / "clip10.avi", moving_frames(10))


@pytest.fixture
def edge_broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto for one test (about 0.1 s to start)."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()
