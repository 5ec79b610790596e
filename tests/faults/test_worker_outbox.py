"""The worker's outbox (cloud/worker.py): a caption record written to S3 whose publish was
never acknowledged (the worker died in between) is published by the restarted worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fault_harness import FakeCaptioner

from cloud.worker import OUTBOX_PREFIX, CaptionWorker
from common.config import WorkerConfig


@dataclass
class _Info:
    mid: int
    rc: int = 0


@dataclass
class SilentBroker:
    """An MQTT client stand-in that takes publishes and never acknowledges them (a worker
    that dies before the PUBACK), recording what was published."""

    published: list[tuple[str, bytes]] = field(default_factory=list)
    is_connected: bool = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, **_: Any) -> _Info:
        self.published.append((topic, payload))
        return _Info(mid=len(self.published))


def _worker(stack_ns: Any, client: SilentBroker) -> CaptionWorker:
    config = WorkerConfig(mqtt=stack_ns.mqtt_config("worker"), s3=stack_ns.s3_config(role="worker"))
    worker = CaptionWorker(config, FakeCaptioner(), store=stack_ns.storage(),
                           client_id="worker-outbox-test")
    worker._client = client  # type: ignore[assignment]
    return worker


def test_unacknowledged_caption_is_republished_after_a_restart(stack_ns: Any) -> None:
    import cv2

    store = stack_ns.storage()
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 120, np.uint8))
    assert ok
    key = "frames/cam1/2026/01/31/f-outbox.jpg"
    store.put(key, jpeg.tobytes())
    first = SilentBroker()
    _worker(stack_ns, first).process_batch([key])
    assert len(first.published) == 1  # published, never acknowledged: the worker "dies"
    marker = OUTBOX_PREFIX + "worker-outbox-test/captions/cam1/2026/01/31/f-outbox.json"
    assert store.exists(marker)

    second = SilentBroker()
    restarted = _worker(stack_ns, second)
    restarted.scan()  # the first listing after a restart: its own markers go out at once
    assert second.published == first.published
    assert restarted.counters.get("republished") == 1
    assert restarted.scan() == 0  # nothing captioned again
    restarted._on_published(1)  # the PUBACK comes: the marker goes
    restarted._clear_outbox()
    assert not store.exists(marker)
