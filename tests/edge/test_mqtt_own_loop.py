"""MqttClient with ``start(network_thread=False)``: the caller's thread runs the network loop
(the edge's publisher, issue 9), against a real mosquitto that is killed and restarted."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from edge_helpers import Broker

from common.config import MqttConfig
from common.mqtt import MqttClient

pytestmark = pytest.mark.integration


class _Loop:
    """Runs ``client.run_network(timeout_s)`` on a thread and counts the passes."""

    def __init__(self, client: MqttClient, timeout_s: float) -> None:
        self.client = client
        self.passes = 0
        self.threads: set[str] = set()  # where the hooks ran
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="own-loop", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.run_network(self.timeout_s)
            self.passes += 1

    def start(self) -> _Loop:
        self.client.start(network_thread=False)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.client.wakeup()
        self.thread.join(5)
        self.client.stop()

    timeout_s = 30.0


def _wait(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_the_callers_thread_runs_the_loop_reads_ahead_wakes_up_and_reconnects(
        edge_broker: Broker, caplog) -> None:
    caplog.set_level(logging.WARNING)
    config = MqttConfig(port=edge_broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                        keepalive_s=5)
    client = MqttClient(config, "own-loop-test")
    loop = _Loop(client, timeout_s=30.0)  # only data, wakeup() or a reconnect end a pass early
    connects: list[bool] = []
    got: list[bytes] = []
    client.on_connected(lambda present: (connects.append(present),
                                         loop.threads.add(threading.current_thread().name)))
    props: dict[bytes, list[tuple[str, str]]] = {}  # payload -> user properties received
    client.subscribe("own/#", lambda m: (got.append(bytes(m.payload)),
                                         props.setdefault(bytes(m.payload), getattr(
                                             m.properties, "UserProperty", [])),
                                         loop.threads.add(threading.current_thread().name)))
    loop.start()
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        assert _wait(lambda: client.is_connected and connects == [False], 10)
        # every hook ran on the caller's thread: no paho thread
        assert not [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]
        # a burst: many packets arrive in one socket read; each is handed on, in order
        sender.connect("127.0.0.1", edge_broker.port)
        sender.loop_start()
        assert _wait(lambda: sender.is_connected(), 5)
        # subscribed once a probe gets through (no fixed delay for the SUBACK)
        assert _wait(lambda: (sender.publish("own/probe", b"probe", qos=1), b"probe" in got)[1], 10)
        n = 300
        infos = [sender.publish(f"own/{i}", str(i).encode(), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(5)
        burst = [str(i).encode() for i in range(n)]
        assert _wait(lambda: [m for m in got if m in burst] == burst, 10), len(got)
        assert loop.threads == {"own-loop"}
        # wakeup() ends a 30 s wait at once
        before = loop.passes
        client.wakeup()
        assert _wait(lambda: loop.passes > before, 2)
        # a publish from the loop's own thread goes out at once; its PUBACK comes back
        accepted: list[int] = []
        client.on_published(accepted.append)
        pairs = [("frame_id", "cam-1-1"), ("seq", "1"), ("note", "é✓"), ("seq", "2")]
        info = client.publish("own/self", b"me", qos=1, user_properties=pairs)
        client.wakeup()
        assert _wait(lambda: info.mid in accepted and b"me" in got, 5)
        assert props[b"me"] == pairs  # user properties packed by UserProperties, in order
        # the broker dies and comes back: the loop reconnects (backoff 0.1..0.5 s) and the
        # connect hook runs again, with the subscription renewed
        edge_broker.kill()
        assert _wait(lambda: not client.is_connected, 10)
        edge_broker.start()
        assert _wait(lambda: len(connects) == 2 and client.is_connected, 15), connects
        sender.reconnect()
        assert _wait(lambda: sender.is_connected(), 5)
        assert _wait(lambda: (sender.publish("own/after", b"after", qos=1), b"after" in got)[1], 10)
    finally:
        sender.loop_stop()
        loop.stop()
    assert not client.is_connected
    assert "error in" not in caplog.text  # no hook raised


def test_unsubscribe_waits_for_the_unsuback_and_is_not_renewed(edge_broker: Broker) -> None:
    """``MqttClient.unsubscribe`` (``ShareGroupClient.leave`` of the ingest and the worker): the
    UNSUBACK comes back, no message on the filter arrives after it, and a reconnect does not
    subscribe again."""
    config = MqttConfig(port=edge_broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
    client = MqttClient(config, "unsub-test")
    got: list[bytes] = []
    connects: list[bool] = []
    client.on_connected(connects.append)
    client.subscribe("unsub/#", lambda m: got.append(bytes(m.payload)))
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.start()
    try:
        assert client.wait_connected(10)
        sender.connect("127.0.0.1", edge_broker.port)
        sender.loop_start()
        assert _wait(lambda: (sender.publish("unsub/probe", b"before", qos=1), b"before" in got)[1], 10)
        assert client.unsubscribe("unsub/#", timeout_s=5)  # the broker's UNSUBACK came
        sender.publish("unsub/x", b"after", qos=1).wait_for_publish(5)
        # a marker on another filter, subscribed after: once it arrives, "after" would have too
        client.subscribe("marker/#", lambda m: got.append(bytes(m.payload)))
        assert _wait(lambda: (sender.publish("marker/1", b"marker", qos=1), b"marker" in got)[1], 10)
        assert b"after" not in got
        # not renewed after a reconnect
        edge_broker.kill()
        assert _wait(lambda: not client.is_connected, 10)
        edge_broker.start()
        assert _wait(lambda: len(connects) == 2 and client.is_connected, 15), connects
        sender.reconnect()
        got.clear()
        assert _wait(lambda: (sender.publish("marker/2", b"marker2", qos=1), b"marker2" in got)[1], 10)
        sender.publish("unsub/y", b"after-reconnect", qos=1).wait_for_publish(5)
        assert _wait(lambda: (sender.publish("marker/3", b"marker3", qos=1), b"marker3" in got)[1], 10)
        assert b"after-reconnect" not in got
        assert client.unsubscribe("unsub/never-subscribed", timeout_s=5)  # UNSUBACK 17 is an answer too
    finally:
        sender.loop_stop()
        client.stop()
    assert not client.unsubscribe("unsub/#", timeout_s=0.5)  # not connected: False at once
