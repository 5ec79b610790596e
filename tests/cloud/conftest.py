"""Fixtures of the cloud tests: the real local stack, device clients, captioners."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from cloud_fakes import FakeCaptioner

from common.mqtt import MqttClient

DEVICES = ("cam1", "dev9")


@pytest.fixture(scope="session")
def cloud_stack(local_stack):
    """The session's LocalStack (tests/conftest.py) with the device accounts these tests use;
    tests share its default bucket and keep apart by topic prefix and unique frame ids."""
    for device in DEVICES:
        local_stack.add_device(device)
    return local_stack


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never hear each other."""
    return "t" + uuid.uuid4().hex[:10]


class Device:
    """An MQTT client logged in as one device; records what arrives on its subscriptions."""

    def __init__(self, stack, device_id: str, prefix: str) -> None:
        config = stack.mqtt_config(device_id, topic_prefix=prefix)
        self.client = MqttClient(config, f"{device_id}-{uuid.uuid4().hex[:6]}", clean_start=True)
        self.received: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        self.client.start()
        assert self.client.wait_connected(10), "device could not connect"

    def listen(self, topic: str) -> None:
        def handler(message) -> None:  # type: ignore[no-untyped-def]
            with self._lock:
                self.received.setdefault(message.topic, []).append(bytes(message.payload))

        self.client.subscribe(topic, handler, 1)

    def messages(self, topic: str) -> list[bytes]:
        with self._lock:
            return list(self.received.get(topic, []))


@pytest.fixture
def device(cloud_stack, prefix: str) -> Iterator[Callable[[str], Device]]:
    """``device(device_id)`` -> a connected :class:`Device` under this test's prefix."""
    made: list[Device] = []

    def make(device_id: str) -> Device:
        made.append(Device(cloud_stack, device_id, prefix))
        return made[-1]

    yield make
    for d in made:
        d.client.stop()


def make_captioner():
    """The real Captioner with a tiny random decoder (batched beam search, real encoder); the
    fake captioner when the captioning package (torch) is not importable."""
    try:
        from cloud.captioning.inference import Captioner
        from cloud.captioning.testing import tiny_checkpoint
    except ImportError:
        return FakeCaptioner()
    return Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", max_caption_length=8)


@pytest.fixture(scope="session")
def captioner():
    return make_captioner()
