"""Two ``framecap web`` replicas on one PostgreSQL index, against the real broker: both hear
and index every caption, both serve it, and an alert fires once per rule and frame."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.web.auth import add_user
from cloud.web.model import AlertRule
from cloud.web.server import WebServer
from common.config import WebConfig
from common.messages import AlertMessage, CaptionRecord
from common.topics import caption_key, frame_key

from .test_alerts import Subscriber

pytestmark = pytest.mark.integration

T0 = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def replicas(stack_ns: Any, pg_url: str, tmp_path: Path) -> Iterator[list[WebServer]]:
    servers = []
    for n in (1, 2):
        state = tmp_path / f"web{n}"
        add_user(state / "accounts.yaml", "alice", "alice-password", "admin")
        config = WebConfig(mqtt=stack_ns.mqtt_config("web", client_id=stack_ns.client_id(f"web{n}")),
                           s3=stack_ns.s3_config(role="web"), host="127.0.0.1", port=0, state_dir=state,
                           index=pg_url, widening=False, reindex_at_start=False)
        server = WebServer(config, log_level="warning")
        server.start()
        servers.append(server)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_two_replicas_share_the_index_and_send_an_alert_once(
        replicas: list[WebServer], stack_ns: Any, wait_until: Callable[..., bool]) -> None:
    cam = stack_ns.device("cam")
    t = stack_ns.topics
    replicas[0].index.save_rule(AlertRule(rule_id="trucks", name="Trucks", query="truck", cooldown_s=0,
                                          owner="alice"))
    for server in replicas:  # as a replica does every rules_refresh_s, or at once after its own API call
        server.alerts.invalidate_rules()
        assert server.feed.wait_connected(10)
    device = Subscriber(stack_ns.mqtt_config(cam))
    worker = Subscriber(stack_ns.mqtt_config("worker"))
    try:
        device.subscribe(t.alerts(cam))
        # both feeds are live once both have indexed a retained status published now
        device.publish(t.status(cam), "online", retain=True)
        assert wait_until(lambda: all(s.feed.counters.get("statuses", 0) >= 1 for s in replicas), 10), \
            [s.feed.counters for s in replicas]
        frames = [("f1", "a white truck parked on a street"), ("f2", "a dog on a beach"),
                  ("f3", "a red truck on a road")]
        for i, (frame_id, text) in enumerate(frames):
            at = T0 + timedelta(seconds=i)
            worker.publish(t.captions(cam), CaptionRecord(
                frame_id=frame_id, device_id=cam, captured_at=at, caption=text, score=-3.0, model="sat-test",
                frame_key=frame_key(cam, frame_id, at), caption_key=caption_key(cam, frame_id, at)).to_json())
        # each replica checked both truck captions against the rule: one claimed, one folded
        assert wait_until(lambda: all(s.alerts.counters.get("matched", 0) == 2 for s in replicas), 20), \
            [s.alerts.counters for s in replicas]
        assert sum(s.alerts.counters.get("folded", 0) for s in replicas) == 2
        assert device.wait(2, 10)
        with httpx.Client(auth=("alice", "alice-password"), timeout=10) as client:
            for server in replicas:  # either replica serves every caption
                found = client.get(f"{server.url}/api/v1/search", params={"q": "truck"}).json()
                assert sorted(r["frame_id"] for r in found["results"]) == ["f1", "f3"]
    finally:
        device.publish(t.status(cam), b"", retain=True)
        for c in (device, worker):
            c.close()
    alerts = sorted(AlertMessage.from_json(payload).frame_id for _, payload in device.messages)
    assert alerts == ["f1", "f3"]  # once per rule and frame, though two replicas heard each
