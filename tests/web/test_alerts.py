"""Alert rules: matching (query, widening, devices, owner, score, errors), folding within the
cooldown, once per rule and frame across managers sharing an index (SQLite file, PostgreSQL),
delivery on the real broker to the device's alerts topic and to a signed local webhook, bounded
retries, and the rules file."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud.web.alerts import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AlertManager,
    RulesFileError,
    load_rules_file,
    rules_to_yaml,
    sign,
    verify_signature,
)
from cloud.web.auth import Accounts
from cloud.web.feed import CaptionFeed
from cloud.web.index import CaptionIndex, open_index
from cloud.web.metrics import WebMetrics
from cloud.web.model import AlertRule, CaptionDoc
from common.config import MqttConfig, WebConfig
from common.messages import AlertMessage, CaptionRecord
from common.topics import Topics, caption_key, frame_key

UTC = timezone.utc
T0 = datetime(2026, 2, 3, 22, 15, 0, tzinfo=UTC)
SECRET = "webhook-secret-for-tests"


def doc(device_id: str = "cam1", frame_id: str = "f1", caption: str = "a truck parked on a street", *,
        at: datetime = T0, score: float | None = -4.0, error: str | None = None) -> CaptionDoc:
    return CaptionDoc(device_id=device_id, frame_id=frame_id, captured_at=at, caption=caption, score=score,
                      model="sat-test", frame_key=frame_key(device_id, frame_id, at),
                      caption_key=caption_key(device_id, frame_id, at), error=error)


def rule(rule_id: str = "trucks", query: str = "truck", **fields: Any) -> AlertRule:
    return AlertRule(rule_id=rule_id, name=fields.pop("name", f"rule {rule_id}"), query=query, **fields)


@dataclass
class Recorder:
    """Stands in for the MQTT client: records each publish."""

    published: list[tuple[str, bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> Any:
        with self.lock:
            self.published.append((topic, payload if isinstance(payload, bytes) else payload.encode(), qos))
        return None


class Receiver:
    """A webhook receiver on 127.0.0.1 (free port) that records each POST and answers the
    given statuses in turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.got = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.got:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.got.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, n: int, timeout_s: float = 10.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.requests) >= n, timeout_s)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def sqlite_index(tmp_path: Path) -> Iterator[CaptionIndex]:
    index = open_index(tmp_path / "index.sqlite3")
    yield index
    index.close()


def manager(index: CaptionIndex, publisher: Any = None, **kwargs: Any) -> AlertManager:
    kwargs.setdefault("webhook_backoff_s", 0.01)
    kwargs.setdefault("rules_refresh_s", 0.0)
    return AlertManager(index, publisher if publisher is not None else Recorder(), Topics("fc"), **kwargs)


# -- matching --------------------------------------------------------------------------------


def test_a_matching_caption_publishes_one_alert_with_the_contract_fields(sqlite_index: CaptionIndex) -> None:
    sqlite_index.save_rule(rule("trucks", '"red truck" OR bus', name="Trucks", cooldown_s=60))
    pub = Recorder()
    alerts = manager(sqlite_index, pub, public_url="https://cams.example.org/")
    assert alerts.check(doc(caption="a dog on a beach")) == []
    d = doc(frame_id="f2", caption="a red truck next to a bus")
    events = alerts.check(d)
    assert len(events) == 1 and events[0].matched_words == ["red", "truck", "bus"]
    assert len(pub.published) == 1
    topic, payload, qos = pub.published[0]
    assert (topic, qos) == ("fc/cam1/alerts", 1)
    message = AlertMessage.from_json(payload)
    assert message.rule.id == "trucks" and message.rule.name == "Trucks"
    assert (message.device_id, message.frame_id, message.captured_at) == ("cam1", "f2", T0)
    assert message.caption == d.caption and message.matched_words == ["red", "truck", "bus"]
    assert (message.frame_key, message.caption_key) == (d.frame_key, d.caption_key)
    assert message.url == "https://cams.example.org/frames/cam1/f2"
    assert alerts.check(d) == [] and len(pub.published) == 1  # once per rule and frame


def test_devices_owner_score_errors_and_bad_queries_bound_a_rule(sqlite_index: CaptionIndex) -> None:
    accounts = Accounts.from_users({"boss": ("pw", "admin", []), "vic": ("pw", "viewer", ["cam1"])})
    sqlite_index.save_rule(rule("only-cam2", devices=("cam2",), owner="boss"))
    sqlite_index.save_rule(rule("viewer-owned", owner="vic"))
    sqlite_index.save_rule(rule("ghost-owned", owner="ghost"))
    sqlite_index.save_rule(rule("confident", min_score=-3.0, owner="boss"))
    sqlite_index.save_rule(rule("broken", query='"truck', owner="boss"))
    alerts = manager(sqlite_index, accounts=accounts)

    def fired(d: CaptionDoc) -> set[str]:
        return {e.rule.rule_id for e in alerts.check(d)}

    assert fired(doc("cam1", "a", score=-4.0)) == {"viewer-owned"}
    assert fired(doc("cam2", "b", score=-4.0)) == {"only-cam2"}  # the viewer may not see cam2
    assert fired(doc("cam1", "c", score=-2.0, at=T0 + timedelta(hours=1))) == {"viewer-owned", "confident"}
    assert fired(doc("cam1", "d", error="corrupt JPEG", at=T0 + timedelta(hours=2))) == set()


def test_query_words_outside_the_word_map_are_widened_like_a_search(sqlite_index: CaptionIndex) -> None:
    class Widener:
        def widen(self, words: list[str]) -> dict[str, list[str]]:
            return {"lorry": ["truck", "van"]} if "lorry" in words else {}

    sqlite_index.save_rule(rule("lorries", "lorry -night"))
    assert manager(sqlite_index).check(doc(caption="a truck on a road")) == []  # not widened
    events = manager(sqlite_index, widener=Widener()).check(doc(frame_id="f2", caption="a truck on a road"))
    assert [e.matched_words for e in events] == [["truck"]]
    assert manager(sqlite_index, widener=Widener()).check(doc(frame_id="f3", caption="a truck at night")) == []


def test_consecutive_matching_frames_fold_into_one_alert_until_the_cooldown_passes(sqlite_index: CaptionIndex) -> None:
    sqlite_index.save_rule(rule("trucks", cooldown_s=300))
    pub = Recorder()
    alerts = manager(sqlite_index, pub)
    for i in range(5):  # a static scene: the same caption every 10 s
        alerts.check(doc(frame_id=f"f{i}", at=T0 + timedelta(seconds=10 * i)))
    alerts.check(doc("cam2", "g0", at=T0 + timedelta(seconds=20)))  # another device: its own alert
    assert [(t, json.loads(p)["frame_id"]) for t, p, _ in pub.published] == [
        ("fc/cam1/alerts", "f0"), ("fc/cam2/alerts", "g0")]
    alerts.check(doc(frame_id="f-late", at=T0 + timedelta(seconds=301)))  # cooldown passed
    assert [json.loads(p)["frame_id"] for _, p, _ in pub.published] == ["f0", "g0", "f-late"]
    assert alerts.counters["folded"] == 4 and alerts.counters["mqtt_sent"] == 3


def _race(managers: list[AlertManager], d: CaptionDoc) -> int:
    barrier = threading.Barrier(len(managers))
    results: list[int] = []

    def run(m: AlertManager) -> None:
        barrier.wait()
        results.append(len(m.check(d)))

    threads = [threading.Thread(target=run, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sum(results)


def test_two_managers_on_one_sqlite_file_send_one_alert(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    a, b = open_index(path), open_index(path)
    try:
        a.save_rule(rule("trucks", cooldown_s=0))
        pub = Recorder()
        managers = [manager(a, pub), manager(b, pub)]
        for i in range(5):
            assert _race(managers, doc(frame_id=f"f{i}", at=T0 + timedelta(seconds=i))) == 1
        assert len(pub.published) == 5
    finally:
        a.close()
        b.close()


def test_two_managers_on_one_postgres_index_send_one_alert(pg_url: str) -> None:
    a, b = open_index(pg_url), open_index(pg_url)
    try:
        rule_id = f"trucks-{uuid.uuid4().hex[:6]}"
        a.save_rule(rule(rule_id, cooldown_s=0))
        pub = Recorder()
        managers = [manager(a, pub), manager(b, pub)]
        device = f"cam-{uuid.uuid4().hex[:6]}"
        for i in range(5):
            assert _race(managers, doc(device, f"f{i}", at=T0 + timedelta(seconds=i))) == 1
        assert len([p for p in pub.published if json.loads(p[1])["rule"]["id"] == rule_id]) == 5
    finally:
        a.delete_rule(rule_id)
        a.close()
        b.close()


# -- webhooks --------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    # RFC 4231 test case 2
    assert sign(b"what do ya want for nothing?", "Jefe") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    body = b'{"a": 1}'
    assert verify_signature(body, sign(body, "k"), "k")
    assert not verify_signature(body, sign(body, "k"), "other")
    assert not verify_signature(body + b" ", sign(body, "k"), "k")
    assert not verify_signature(body, None, "k")


def test_the_webhook_gets_the_alert_signed(sqlite_index: CaptionIndex, receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    sqlite_index.save_rule(rule("trucks", webhook_url=hook.url))
    pub, metrics = Recorder(), WebMetrics()
    alerts = manager(sqlite_index, pub, webhook_secret=SECRET, metrics=metrics)
    try:
        assert len(alerts.check(doc())) == 1
        assert hook.wait(1) and alerts.wait_webhooks(10)
    finally:
        alerts.close()
    headers, body = hook.requests[0]
    assert body == pub.published[0][1]  # the same JSON as on MQTT
    assert headers["content-type"] == "application/json"
    assert verify_signature(body, headers[SIGNATURE_HEADER.lower()], SECRET)
    assert not verify_signature(body, headers[SIGNATURE_HEADER.lower()], "another-secret")
    assert headers[TIMESTAMP_HEADER.lower()].isdigit()
    assert alerts.counters["webhook_sent"] == 1
    assert metrics.registry.get_sample_value("framecap_web_alerts_sent_total", {"channel": "webhook"}) == 1
    assert metrics.registry.get_sample_value("framecap_web_alerts_sent_total", {"channel": "mqtt"}) == 1


@pytest.mark.parametrize(("statuses", "posts", "sent"), [
    ([503, 500], 3, True),     # retried, third try answers 200
    ([429], 2, True),          # too many requests: retried
    ([503, 502, 504], 3, False),  # bounded: 3 attempts, then counted failed
    ([400], 1, False),         # permanent: not retried
    ([404], 1, False),
])
def test_webhook_retries_are_bounded_and_4xx_is_permanent(
    sqlite_index: CaptionIndex, receiver: Callable[..., Receiver], statuses: list[int], posts: int, sent: bool,
) -> None:
    hook = receiver(statuses)
    sqlite_index.save_rule(rule("trucks", webhook_url=hook.url))
    metrics = WebMetrics()
    alerts = manager(sqlite_index, webhook_secret=SECRET, metrics=metrics)
    try:
        alerts.check(doc())
        assert alerts.wait_webhooks(20)
    finally:
        alerts.close()
    assert len(hook.requests) == posts
    failed = metrics.registry.get_sample_value("framecap_web_alerts_failed_total", {"channel": "webhook"})
    assert (alerts.counters.get("webhook_sent", 0), failed) == ((1, 0) if sent else (0, 1))


def test_an_unreachable_webhook_fails_after_the_attempts_and_no_secret_means_no_call(
    sqlite_index: CaptionIndex, receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    dead_url = hook.url
    hook.close()  # nothing listens there any more
    sqlite_index.save_rule(rule("trucks", webhook_url=dead_url))
    alerts = manager(sqlite_index, webhook_secret=SECRET)
    try:
        alerts.check(doc())
        assert alerts.wait_webhooks(20)
    finally:
        alerts.close()
    assert alerts.counters["webhook_failed"] == 1 and alerts.counters["mqtt_sent"] == 1
    live = receiver()
    sqlite_index.save_rule(rule("trucks", webhook_url=live.url))
    unsigned = manager(sqlite_index, webhook_secret=None)
    unsigned.check(doc(frame_id="f2", at=T0 + timedelta(hours=1)))
    assert unsigned.wait_webhooks(5) and live.requests == []
    assert unsigned.counters["webhook_failed"] == 1
    unsigned.close()


# -- end to end on the real broker -----------------------------------------------------------


class Subscriber:
    """A paho client of one account that subscribes (waiting for the SUBACK) and records."""

    def __init__(self, config: MqttConfig) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Condition()
        self.subacked = threading.Event()
        connected = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        assert config.password is not None
        self.client.username_pw_set(config.username, config.password.get_secret_value())
        self.client.on_connect = lambda *a: connected.set()
        self.client.on_subscribe = lambda *a: self.subacked.set()
        self.client.on_message = self._on_message
        self.client.connect(config.host, config.port)
        self.client.loop_start()
        assert connected.wait(5), "no CONNACK"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))
            self.lock.notify_all()

    def subscribe(self, topic: str) -> None:
        self.subacked.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subacked.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait(self, n: int, timeout_s: float = 10.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: len(self.messages) >= n, timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_caption_from_the_worker_raises_an_alert_the_device_and_webhook_receive(
    stack_ns: Any, tmp_path: Path, sqlite_index: CaptionIndex, receiver: Callable[..., Receiver],
    wait_until: Callable[..., bool],
) -> None:
    cam, other = stack_ns.device("cam"), stack_ns.device("other")
    t = stack_ns.topics
    hook = receiver()
    sqlite_index.save_rule(rule("trucks", "truck", name="Trucks", devices=(cam, other), webhook_url=hook.url))
    config = WebConfig(mqtt=stack_ns.mqtt_config("web"), s3=stack_ns.s3_config(role="web"), state_dir=tmp_path,
                       public_url="https://cams.example.org")
    feed = CaptionFeed(config, sqlite_index, s3_probe_interval_s=0)
    alerts = AlertManager(sqlite_index, feed.client, feed.topics, webhook_secret=SECRET,
                          public_url=config.base_url, webhook_backoff_s=0.01)
    feed.add_listener(alerts.check)
    device = Subscriber(stack_ns.mqtt_config(cam))
    watcher = Subscriber(stack_ns.mqtt_config(other))  # may not read cam's alerts
    worker = Subscriber(stack_ns.mqtt_config("worker"))
    feed.start()
    try:
        device.subscribe(t.alerts(cam))
        watcher.subscribe(t.all_devices("alerts"))
        watcher.subscribe(t.alerts(other))
        assert feed.wait_connected(10)
        # the feed subscribed before it counted as connected; a retained status proves it is live
        device.publish(t.status(cam), "online", retain=True)
        assert wait_until(lambda: sqlite_index.devices([cam], today_start=T0) != [], 10)

        def caption(frame_id: str, text: str, at: datetime) -> bytes:
            return CaptionRecord(frame_id=frame_id, device_id=cam, captured_at=at, caption=text, score=-3.0,
                                 model="sat-test", frame_key=frame_key(cam, frame_id, at),
                                 caption_key=caption_key(cam, frame_id, at)).to_json()

        worker.publish(t.captions(cam), caption("f1", "a dog on a beach", T0))
        worker.publish(t.captions(cam), caption("f2", "a white truck parked on a street", T0 + timedelta(seconds=5)))
        worker.publish(t.captions(cam), caption("f3", "a white truck parked on a street", T0 + timedelta(seconds=10)))
        assert device.wait(1, 10), "no alert on the device's topic"
        assert wait_until(lambda: sqlite_index.count() == 3, 10)
        assert hook.wait(1) and alerts.wait_webhooks(10)
        assert wait_until(lambda: alerts.counters.get("folded") == 1, 5)
    finally:
        feed.stop()
        alerts.close()
        device.publish(t.status(cam), b"", retain=True)
        for c in (device, watcher, worker):
            c.close()
    assert len(device.messages) == 1  # f3 folded into f2's alert
    topic, payload = device.messages[0]
    message = AlertMessage.from_json(payload)
    assert topic == t.alerts(cam) and message.frame_id == "f2" and message.matched_words == ["truck"]
    assert message.rule.id == "trucks" and message.url == f"https://cams.example.org/frames/{cam}/f2"
    assert watcher.messages == []
    headers, body = hook.requests[0]
    assert body == payload and len(hook.requests) == 1
    assert verify_signature(body, headers[SIGNATURE_HEADER.lower()], SECRET)
    assert not verify_signature(body, headers[SIGNATURE_HEADER.lower()], "not-the-secret")


# -- rules file ------------------------------------------------------------------------------


def test_rules_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "- id: trucks-at-night\n  name: Trucks at night\n  query: truck OR lorry\n  devices: [cam1, cam2]\n"
        "  min_score: -12\n  cooldown_s: 600\n  webhook_url: https://hooks.example.org/x\n"
        "- id: dogs\n  query: dog\n")
    rules = load_rules_file(path)
    assert [r.rule_id for r in rules] == ["trucks-at-night", "dogs"]
    first = rules[0]
    assert (first.name, first.query, first.devices, first.min_score, first.cooldown_s, first.webhook_url) == (
        "Trucks at night", "truck OR lorry", ("cam1", "cam2"), -12.0, 600.0, "https://hooks.example.org/x")
    assert rules[1].name == "dogs" and rules[1].devices is None and rules[1].owner == "admin"
    path.write_text(rules_to_yaml(rules))
    again = load_rules_file(path)
    assert [(r.rule_id, r.query, r.devices, r.cooldown_s) for r in again] == [
        (r.rule_id, r.query, r.devices, r.cooldown_s) for r in rules]
    path.write_text("rules:\n  - {id: x, query: y}\n")
    assert [r.rule_id for r in load_rules_file(path)] == ["x"]


@pytest.mark.parametrize(("text", "expected"), [
    ("- {id: a, query: truck, cooldwn_s: 5}\n", "rule 1 ('a'): cooldwn_s: unknown key"),
    ("- {id: a, query: truck}\n- {id: b, query: '\"truck'}\n", "rule 2 ('b'): query = '\"truck'"),
    ("- {id: a}\n", "rule 1 ('a'): query: required key is missing"),
    ("- {id: ../a, query: x}\n", "rule 1 ('../a'): id = '../a'"),
    ("- {id: a, query: x, devices: [cam/1]}\n", "rule 1 ('a'): devices = ['cam/1']"),
    ("- {id: a, query: x, webhook_url: 'ftp://h/x'}\n", "webhook_url = 'ftp://h/x': must be an http"),
    ("- {id: a, query: x, cooldown_s: -1}\n", "cooldown_s = -1"),
    ("- {id: a, query: x}\n- {id: a, query: y}\n", "rule 2 ('a'): id 'a' is also rule 1"),
    ("- just text\n", "rule 1: expected a mapping"),
    ("id: a\n", "expected a list of rules"),
    ("- [unclosed\n", "not valid YAML"),
])
def test_bad_rules_files_name_the_rule_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesFileError) as info:
        load_rules_file(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_a_missing_rules_file_is_a_rules_file_error(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match="cannot read"):
        load_rules_file(tmp_path / "absent.yaml")
