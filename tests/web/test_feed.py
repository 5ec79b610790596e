"""The feed against the real local stack: MQTT captions and status into the index (and to the
live hub), bad payloads skipped and counted, ``reindex`` from S3, and what ``feed_status`` says
when the broker or S3 cannot be reached."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from pydantic import SecretStr

from cloud.web.feed import CaptionFeed, default_client_id, reindex
from cloud.web.index import CaptionIndex, open_index
from cloud.web.live import LiveHub
from cloud.web.metrics import WebMetrics
from cloud.web.model import CaptionDoc
from common.config import MqttConfig, S3Config, WebConfig
from common.messages import CaptionRecord
from common.topics import caption_key, frame_key

UTC = timezone.utc
T0 = datetime(2026, 2, 3, 22, 15, 0, tzinfo=UTC)


def record(device_id: str, frame_id: str, caption: str = "a truck parked on a street", *,
           at: datetime = T0, score: float | None = -4.5, error: str | None = None) -> CaptionRecord:
    """A caption record as the worker writes it."""
    return CaptionRecord(
        frame_id=frame_id, device_id=device_id, captured_at=at, caption="" if error else caption,
        score=None if error else score, model="sat-test", frame_key=frame_key(device_id, frame_id, at),
        caption_key=caption_key(device_id, frame_id, at), error=error,
    )


class Publisher:
    """A bare paho MQTT v5 client of one account that publishes and waits for the PUBACK."""

    def __init__(self, config: MqttConfig) -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        assert config.password is not None
        self.client.username_pw_set(config.username, config.password.get_secret_value())
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(config.host, config.port)
        self.client.loop_start()
        assert connected.wait(5), "no CONNACK"

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[CaptionIndex]:
    index = open_index(tmp_path / "index.sqlite3")
    yield index
    index.close()


def web_config(stack_ns: Any, tmp_path: Path, **fields: Any) -> WebConfig:
    return WebConfig(mqtt=stack_ns.mqtt_config("web"), s3=stack_ns.s3_config(role="web"), state_dir=tmp_path,
                     **fields)


@pytest.fixture
def running_feed(stack_ns: Any, tmp_path: Path, caption_index: CaptionIndex,
                 wait_until: Callable[..., bool]) -> Iterator[tuple[CaptionFeed, LiveHub, WebMetrics]]:
    """A started feed (account ``web``) on the test's prefix, publishing to a live hub, over
    each index backend (``caption_index``: SQLite and PostgreSQL)."""
    hub, metrics = LiveHub(), WebMetrics()
    feed = CaptionFeed(web_config(stack_ns, tmp_path), caption_index, on_new=[hub.publish], metrics=metrics,
                       s3_probe_interval_s=0)
    feed.start()
    try:
        assert feed.wait_connected(10), feed.feed_status()
        yield feed, hub, metrics
    finally:
        feed.stop()


def subscribed(feed: CaptionFeed, stack_ns: Any, index: CaptionIndex, wait_until: Callable[..., bool],
               device: str) -> None:
    """Wait until the feed's subscriptions are live: a retained status of ``device`` shows in
    the index (a retained message is delivered on SUBSCRIBE whatever the timing)."""
    dev = Publisher(stack_ns.mqtt_config(device))
    try:
        dev.publish(stack_ns.topics.status(device), "online", retain=True)
    finally:
        dev.close()
    assert wait_until(lambda: any(d.device_id == device and d.status == "online"
                                  for d in index.devices(None, today_start=T0)), 10)


def test_client_id_is_per_process() -> None:
    a, b = default_client_id("host"), default_client_id("host")
    assert a.startswith("framecap-web-host-") and b.startswith("framecap-web-host-") and a != b


def test_a_worker_caption_is_indexed_and_reaches_a_live_client(
    running_feed: tuple[CaptionFeed, LiveHub, WebMetrics], stack_ns: Any, caption_index: CaptionIndex,
    wait_until: Callable[..., bool],
) -> None:
    feed, hub, metrics = running_feed
    cam = stack_ns.device("cam")
    subscribed(feed, stack_ns, caption_index, wait_until, cam)
    worker = Publisher(stack_ns.mqtt_config("worker"))
    sent = record(cam, "f0001", "a red truck parked on a street")

    async def receive() -> CaptionDoc | None:
        sub = hub.subscribe(None)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, worker.publish, stack_ns.topics.captions(cam), sent.to_json())
        return await sub.get(timeout_s=10)

    try:
        live = asyncio.run(receive())
    finally:
        worker.close()
    assert live == CaptionDoc.from_record(sent)
    assert wait_until(lambda: caption_index.count() == 1, 10)
    assert caption_index.get(cam, "f0001") == CaptionDoc.from_record(sent)
    assert feed.counters["new"] == 1 and hub.published == 1
    assert metrics.registry.get_sample_value("framecap_web_captions_indexed_total") == 1
    status = feed.feed_status()
    assert status["mqtt_connected"] and status["behind"] is None and status["last_caption_at"]


def test_bad_and_foreign_captions_are_skipped_and_counted_and_duplicates_told_once(
    running_feed: tuple[CaptionFeed, LiveHub, WebMetrics], stack_ns: Any, caption_index: CaptionIndex,
    wait_until: Callable[..., bool], caplog: pytest.LogCaptureFixture,
) -> None:
    feed, hub, metrics = running_feed
    cam, other = stack_ns.device("cam"), stack_ns.device("other")
    subscribed(feed, stack_ns, caption_index, wait_until, cam)
    worker = Publisher(stack_ns.mqtt_config("worker"))
    t = stack_ns.topics
    try:
        worker.publish(t.captions(cam), b"{not json")
        worker.publish(t.captions(cam), json.dumps({"schema_version": 9}).encode())
        worker.publish(t.captions(cam), record(other, "f-foreign").to_json())  # other's caption on cam's topic
        good = record(cam, "f-good")
        worker.publish(t.captions(cam), good.to_json())
        worker.publish(t.captions(cam), good.to_json())  # redelivered: indexed again, told once
        worker.publish(t.captions(cam), record(cam, "f-last", at=T0 + timedelta(seconds=1)).to_json())
        # one publisher's QoS 1 messages arrive in order: once f-last is in, the rest was seen
        assert wait_until(lambda: caption_index.get(cam, "f-last") is not None, 10)
    finally:
        worker.close()
    assert wait_until(lambda: feed.counters.get("new") == 2, 5)
    assert caption_index.count() == 2
    assert caption_index.get(other, "f-foreign") is None and caption_index.get(cam, "f-foreign") is None
    counters = feed.counters
    assert counters["invalid"] == 2 and counters["mismatched"] == 1, counters
    assert hub.published == 2
    assert metrics.registry.get_sample_value("framecap_web_invalid_captions_total", {"source": "mqtt"}) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "cloud.web.feed"]
    assert any(cam in w and "not JSON" in w for w in warnings), warnings
    assert any("schema version" in w for w in warnings), warnings
    assert any(other in w and "f-foreign" in w for w in warnings), warnings


def test_retained_status_shows_in_devices(
    running_feed: tuple[CaptionFeed, LiveHub, WebMetrics], stack_ns: Any, caption_index: CaptionIndex,
    wait_until: Callable[..., bool],
) -> None:
    feed, _, _ = running_feed
    cam = stack_ns.device("cam")
    dev = Publisher(stack_ns.mqtt_config(cam))
    try:
        dev.publish(stack_ns.topics.status(cam), "offline", retain=True)
        assert wait_until(lambda: [(d.device_id, d.status) for d in caption_index.devices(None, today_start=T0)]
                          == [(cam, "offline")], 10)
        dev.publish(stack_ns.topics.status(cam), "online", retain=True)
        assert wait_until(lambda: caption_index.devices([cam], today_start=T0)[0].status == "online", 10)
        dev.publish(stack_ns.topics.status(cam), "rebooting", retain=True)  # not a status: skipped
        dev.publish(stack_ns.topics.status(cam), "offline", retain=True)
        assert wait_until(lambda: caption_index.devices([cam], today_start=T0)[0].status == "offline", 10)
    finally:
        dev.publish(stack_ns.topics.status(cam), b"", retain=True)  # clear the retained message
        dev.close()
    assert feed.counters["invalid"] == 1


def test_a_new_feed_hears_retained_status_of_devices_seen_before(
    stack_ns: Any, tmp_path: Path, sqlite_index: CaptionIndex, wait_until: Callable[..., bool],
) -> None:
    cam = stack_ns.device("cam")
    dev = Publisher(stack_ns.mqtt_config(cam))
    dev.publish(stack_ns.topics.status(cam), "online", retain=True)
    feed = CaptionFeed(web_config(stack_ns, tmp_path), sqlite_index, s3_probe_interval_s=0)
    feed.start()
    try:
        assert wait_until(lambda: [d.status for d in sqlite_index.devices([cam], today_start=T0)] == ["online"], 10)
    finally:
        feed.stop()
        dev.publish(stack_ns.topics.status(cam), b"", retain=True)
        dev.close()


def test_reindex_indexes_the_good_objects_and_counts_the_bad(
    stack_ns: Any, caption_index: CaptionIndex, caplog: pytest.LogCaptureFixture,
) -> None:
    store = stack_ns.storage()
    n = 23
    sent = [record("cam1" if i % 2 else "cam2", f"f{i:04d}", at=T0 + timedelta(seconds=i)) for i in range(n)]
    for r in sent:
        store.put(r.caption_key, r.to_json(), content_type="application/json")
    corrupt = caption_key("cam1", "broken", T0)
    store.put(corrupt, b'{"schema_version": 1, "frame_id": "broken", "capt', content_type="application/json")
    store.put("captions/cam1/README.txt", b"not a caption record")  # not .json: not listed
    metrics = WebMetrics()
    result = reindex(store, caption_index, progress=False, batch_size=5, workers=3, metrics=metrics)
    assert (result.listed, result.indexed, result.new, result.skipped, result.failed) == (n + 1, n, n, 1, 0)
    assert caption_index.count() == n
    for r in sent:
        assert caption_index.get(r.device_id, r.frame_id) == CaptionDoc.from_record(r)
    assert any(corrupt in m and "not JSON" in m for m in caplog.messages)
    assert metrics.registry.get_sample_value("framecap_web_invalid_captions_total", {"source": "s3"}) == 1
    again = reindex(store, caption_index, progress=False)  # idempotent: replaced, none new
    assert (again.indexed, again.new, again.skipped) == (n, 0, 1) and caption_index.count() == n


def test_reindex_skips_a_record_stored_under_another_devices_key(stack_ns: Any, sqlite_index: CaptionIndex) -> None:
    store = stack_ns.storage()
    r = record("cam1", "f1")
    store.put(caption_key("cam2", "f1", T0), r.to_json())
    result = reindex(store, sqlite_index, progress=False)
    assert (result.indexed, result.skipped) == (0, 1) and sqlite_index.count() == 0


def test_feed_reindex_through_the_feed_reports_progress(
    stack_ns: Any, tmp_path: Path, sqlite_index: CaptionIndex, wait_until: Callable[..., bool],
) -> None:
    store = stack_ns.storage()
    for i in range(4):
        r = record("cam1", f"g{i}", at=T0 + timedelta(minutes=i))
        store.put(r.caption_key, r.to_json())
    feed = CaptionFeed(web_config(stack_ns, tmp_path), sqlite_index, s3_probe_interval_s=0)
    feed.reindex_in_background().join(30)
    state = feed.feed_status()
    assert state["reindex"]["running"] is False and state["reindex"]["indexed"] == 4
    assert state["s3_ok"] is True and sqlite_index.count() == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_feed_status_says_what_is_unreachable(tmp_path: Path, sqlite_index: CaptionIndex) -> None:
    mqtt_port, s3_port = _free_port(), _free_port()
    config = WebConfig(
        mqtt=MqttConfig(host="127.0.0.1", port=mqtt_port, username="web", password=SecretStr("x")),
        s3=S3Config(endpoint_url=f"http://127.0.0.1:{s3_port}", bucket="nowhere",
                    access_key_id=SecretStr("k"), secret_access_key=SecretStr("s-secret")),
        state_dir=tmp_path,
    )
    feed = CaptionFeed(config, sqlite_index, s3_probe_interval_s=0)
    feed.start()
    try:
        assert feed.probe_s3() is False
        status = feed.feed_status()
    finally:
        feed.stop()
    assert status["mqtt_connected"] is False and status["s3_ok"] is False
    behind = status["behind"]
    assert f"MQTT broker 127.0.0.1:{mqtt_port} unreachable since " in behind
    assert f"S3 http://127.0.0.1:{s3_port} bucket nowhere unreachable since " in behind
    assert behind.endswith("; showing what is indexed") and " UTC" in behind
    assert "s-secret" not in json.dumps(status)


def test_feed_status_when_all_is_well(stack_ns: Any, tmp_path: Path, sqlite_index: CaptionIndex,
                                      wait_until: Callable[..., bool]) -> None:
    feed = CaptionFeed(web_config(stack_ns, tmp_path), sqlite_index, s3_probe_interval_s=0.2)
    feed.start()
    try:
        assert wait_until(lambda: feed.feed_status()["mqtt_connected"] and feed.feed_status()["s3_ok"], 10)
        assert feed.feed_status()["behind"] is None
    finally:
        feed.stop()
