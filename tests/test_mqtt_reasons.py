"""What the broker answers, said in words (issue 8, items 1 and 2).

- A broker that cannot be reached (closed port, unresolvable name, wrong password) is logged
  with host:port and the cause, once at WARNING/ERROR and then rate-limited.
- A QoS 1 publish that mosquitto refuses (MQTT v5 PUBACK 135 "not authorized", the ACL) is not
  reported as delivered: logged at ERROR once per topic with a hint, counted, and for the edge
  the frame stays in its spool and the summary counts it.
- SUBACK failures are logged with their filter.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from common.config import EdgeConfig, MqttConfig
from common.mqtt import (
    PUBACK_REASONS,
    SUBACK_REASONS,
    MqttClient,
    describe_socket_error,
    reason_sentence,
)
from edge.daemon import EdgeDaemon, EdgeSummary
from edge.spool import FrameSpool

MQTT_LOGGER = "common.mqtt"


def _free_port() -> int:
    """A TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _records(caplog: pytest.LogCaptureFixture, level: int, *needles: str) -> list[logging.LogRecord]:
    """Records of common.mqtt at ``level`` or above whose message holds every needle."""
    return [r for r in caplog.records
            if r.name == MQTT_LOGGER and r.levelno >= level
            and all(n in r.getMessage() for n in needles)]


def _fast(config: MqttConfig) -> MqttConfig:
    return config.model_copy(update={"reconnect_min_s": 0.05, "reconnect_max_s": 0.1})


# -- reason codes in words -------------------------------------------------------------------
def test_every_puback_and_suback_failure_code_has_a_sentence() -> None:
    for code in (128, 131, 135, 144, 145, 151, 153):
        assert code in PUBACK_REASONS
        text = reason_sentence("PUBACK", ReasonCode(PacketTypes.PUBACK, identifier=code))
        assert text.endswith(f"(code {code})") and len(text) > 25
    for code in (128, 131, 135, 143, 145, 151, 158, 161, 162):
        assert code in SUBACK_REASONS
        assert reason_sentence("SUBACK", code).endswith(f"(code {code})")
    assert "not authorized" in reason_sentence("PUBACK", 135)
    assert "bad user name or password" in reason_sentence("CONNACK", 134)
    assert "wildcard" in reason_sentence("SUBACK", 162)


def test_socket_errors_in_words() -> None:
    assert "connection refused" in describe_socket_error(ConnectionRefusedError(111, "Connection refused"))
    assert "not resolved" in describe_socket_error(socket.gaierror(-2, "Name or service not known"))
    assert "timed out" in describe_socket_error(TimeoutError("timed out"))


def test_a_refused_subscription_is_logged_with_its_filter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=MQTT_LOGGER)
    client = MqttClient(MqttConfig(host="127.0.0.1", port=1, username=None, password=None), "t-sub")
    refused = [ReasonCode(PacketTypes.SUBACK, identifier=143)]
    client._sub_filters[7] = "fc/+/frames"  # as _subscribe records it
    client._on_subscribe(client._client, None, 7, refused, None)
    [line] = _records(caplog, logging.ERROR, "fc/+/frames", "topic filter invalid", "(code 143)")
    # a SUBACK that beats subscribe() to recording its mid is logged when the mid is recorded
    client._on_subscribe(client._client, None, 9, [ReasonCode(PacketTypes.SUBACK, identifier=158)], None)
    assert client._early_subacks == {9: [ReasonCode(PacketTypes.SUBACK, identifier=158)]}
    client._log_suback("$share/g/x", client._early_subacks.pop(9))
    assert _records(caplog, logging.ERROR, "$share/g/x", "shared subscriptions not supported")


# -- a broker that cannot be reached ---------------------------------------------------------
def test_a_closed_port_is_named_with_the_socket_error_once_then_rate_limited(
    caplog: pytest.LogCaptureFixture, wait_until: Callable[..., bool]
) -> None:
    caplog.set_level(logging.DEBUG, logger=MQTT_LOGGER)
    port = _free_port()
    client = MqttClient(_fast(MqttConfig(host="127.0.0.1", port=port, username=None, password=None)),
                        "t-closed", clean_start=True)
    client.start()
    try:
        assert wait_until(lambda: client.connect_failures >= 4, 15)
    finally:
        client.stop()
    where = f"127.0.0.1:{port}"
    loud = _records(caplog, logging.WARNING, where)
    assert len(loud) == 1, [r.getMessage() for r in loud]  # later attempts: DEBUG only
    assert "connection refused" in loud[0].getMessage() and loud[0].levelno == logging.WARNING
    assert len(_records(caplog, logging.DEBUG, where, "connection refused")) >= 4
    assert client.last_connect_error is not None and "refused" in client.last_connect_error


def test_an_unresolvable_host_is_named(
    caplog: pytest.LogCaptureFixture, wait_until: Callable[..., bool]
) -> None:
    caplog.set_level(logging.INFO, logger=MQTT_LOGGER)
    client = MqttClient(_fast(MqttConfig(host="nonexistent.invalid", port=1883, username=None,
                                         password=None)), "t-dns", clean_start=True)
    client.start()
    try:
        assert wait_until(lambda: _records(caplog, logging.WARNING, "nonexistent.invalid:1883",
                                           "host name not resolved"), 30)
    finally:
        client.stop()


def test_a_wrong_password_is_named_once(
    stack_ns: Any, caplog: pytest.LogCaptureFixture, wait_until: Callable[..., bool]
) -> None:
    caplog.set_level(logging.DEBUG, logger=MQTT_LOGGER)
    config = _fast(stack_ns.mqtt_config("admin")).model_copy(update={"password": SecretStr("wrong")})
    client = MqttClient(config, stack_ns.client_id("badpw"), clean_start=True)
    client.start()
    try:
        assert wait_until(lambda: client.connect_failures >= 3, 15)
    finally:
        client.stop()
    [line] = _records(caplog, logging.ERROR, f"{config.host}:{config.port}", "refused the connection")
    assert "user name or password" in line.getMessage() or "not authorized" in line.getMessage()
    assert not client.is_connected


# -- a publish the broker refuses ------------------------------------------------------------
def test_a_refused_publish_is_not_reported_delivered_and_is_logged_once_per_topic(
    stack_ns: Any, caplog: pytest.LogCaptureFixture, wait_until: Callable[..., bool]
) -> None:
    caplog.set_level(logging.DEBUG, logger=MQTT_LOGGER)
    me, other = stack_ns.device("me"), stack_ns.device("other")
    client = MqttClient(stack_ns.mqtt_config(me), stack_ns.client_id("pub"), clean_start=True)
    accepted: list[int] = []
    refused: list[tuple[int, str]] = []
    client.on_published(accepted.append)
    client.on_publish_refused(lambda mid, reason: refused.append((mid, reason)))
    client.start()
    try:
        assert client.wait_connected(10)
        foreign = stack_ns.topics.frames(other)
        mids = [client.publish(foreign, b"x", qos=1).mid for _ in range(3)]
        own = client.publish(stack_ns.topics.status(me), b"online", qos=1).mid
        assert wait_until(lambda: len(refused) == 3 and own in accepted, 10)
    finally:
        client.stop()
    assert sorted(m for m, _ in refused) == sorted(mids) and not set(mids) & set(accepted)
    assert all("not authorized" in reason and "(code 135)" in reason for _, reason in refused)
    assert client.publishes_refused == 3 and client.refused_topics() == {foreign: 3}
    [line] = _records(caplog, logging.ERROR, foreign)
    text = line.getMessage()
    assert "not authorized" in text and "device_id" in text and "topic_prefix" in text
    assert len(_records(caplog, logging.DEBUG, foreign, "refused again")) == 2


def _clip(path: Path, n: int = 3) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    rng = np.random.default_rng(1)
    for _ in range(n):
        writer.write(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def test_an_edge_whose_user_is_not_its_device_keeps_refused_frames_and_counts_them(
    stack_ns: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    wait_until: Callable[..., bool],
) -> None:
    """Device ``me`` runs as device_id ``other``: every frame publish is refused (ACL)."""
    caplog.set_level(logging.DEBUG)
    me, other = stack_ns.device("me"), stack_ns.device("other")
    config = EdgeConfig.model_validate({
        "device_id": other,
        "source": str(_clip(tmp_path / "clip.avi")),
        "drain_timeout_s": 120,
        "mqtt": stack_ns.mqtt_config(me),
        "sampling": {"interval_s": 0.05, "scene_change": False},
        "spool": {"directory": str(tmp_path / "spool"), "resend_after_s": 0.5},
    })
    daemon = EdgeDaemon(config, print_captions=False)
    result: list[EdgeSummary] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        # 3 frames, each refused at least twice: retried on the resend schedule
        assert wait_until(lambda: daemon.summary().publishes_refused >= 6, 20)
    finally:
        daemon.request_stop()
        runner.join(20)
    summary = result[0]
    frames_topic = stack_ns.topics.frames(other)
    [line] = _records(caplog, logging.ERROR, frames_topic)
    assert "not authorized" in line.getMessage() and "device_id" in line.getMessage()
    assert summary.publishes_refused >= 6 and summary.frames_acked == 0
    assert summary.frames_pending == 3 and not summary.drained
    assert len(FrameSpool(tmp_path / "spool", other)) == 3
    assert not any("broker has it" in r.getMessage() for r in caplog.records)
    # resent on the schedule (0.5 s), not in a tight loop: about 2 sends a second per frame
    assert summary.publishes_refused <= 3 * (2 * summary.elapsed_s + 3)


# -- latency: no Nagle delay (issue 9) ----------------------------------------------------------
def test_set_tcp_nodelay_sets_it_on_tcp_and_leaves_other_sockets() -> None:
    from common.mqtt import set_tcp_nodelay

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert set_tcp_nodelay(tcp)
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert not set_tcp_nodelay(unix)
    assert not set_tcp_nodelay(object())


@pytest.mark.parametrize("tls", [False, True])
def test_every_connection_to_the_broker_has_tcp_nodelay(stack_ns: Any, tls: bool) -> None:
    """paho opens the socket; the wrapper turns Nagle off on it (plain and TLS), so a PUBACK or
    a small caption is not held back for the peer's delayed ACK."""
    client = MqttClient(stack_ns.mqtt_config("admin", tls=tls), stack_ns.client_id("nodelay"),
                        clean_start=True)
    client.start()
    try:
        assert client.wait_connected(10)
        sock = client._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.stop()
