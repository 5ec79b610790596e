"""The local stack against the real servers: it answers, keys and passwords are checked, the ACL
keeps devices apart, and ``framecap stack up|status|add-device|down`` do what they say."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from common.config import MqttConfig
from common.stack import GRPC_OFFSET, LocalStack, main, mqtt_connack, pid_alive, server_pids
from common.storage import ObjectStore, StorageError


def certifi_or_system() -> str:
    """A CA bundle that does not hold the stack's CA."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no system CA bundle")


class Client:
    """A bare paho MQTT v5 client that records messages and SUBACK reason codes."""

    def __init__(self, config: MqttConfig) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: list[list[ReasonCode]] = []
        self.connack: ReasonCode | None = None
        self._connected = threading.Event()
        self._subacked = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(config.username, config.password.get_secret_value() if config.password else None)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = self._on_subscribe
        if config.tls is not None:
            self.client.tls_set(ca_certs=str(config.tls.ca_certs))
        self.client.connect(config.host, config.port)
        self.client.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connack = reason_code
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self.subacks.append(list(reason_codes))
        self._subacked.set()

    def subscribe(self, topic: str) -> ReasonCode:
        self._subacked.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subacked.wait(5), "no SUBACK"
        return self.subacks[-1][0]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_stack_answers_and_keeps_secrets_out_of_stack_json(local_stack: LocalStack) -> None:
    assert local_stack.running()
    assert mqtt_connack(local_stack.host, local_stack.mqtt_port, "admin", local_stack.password("admin")) == 0
    store = local_stack.storage()
    store.put("probe/x", b"hello")
    assert store.get("probe/x") == b"hello"
    state = local_stack.state_file.read_text()
    info = json.loads(state)
    assert info["mosquitto"]["pid"] == local_stack.mosquitto.pid
    assert info["ports"]["s3"] == local_stack.s3_port
    for account in local_stack.accounts().values():
        assert account["password"] not in state
    for role in ("admin", "ingest", "worker", "web"):
        for secret in local_stack.s3_credentials(role):
            assert secret not in state
    assert (local_stack.accounts_file.stat().st_mode & 0o077) == 0


def test_wrong_s3_secret_is_refused(local_stack: LocalStack) -> None:
    wrong = local_stack.s3_config().model_copy(update={"secret_access_key": SecretStr("not-the-secret")})
    store = ObjectStore(wrong, max_attempts=1)
    with pytest.raises(StorageError) as info:
        store.put("probe/denied", b"x")
    assert "not-the-secret" not in str(info.value)
    assert info.value.bucket == local_stack.bucket and info.value.key == "probe/denied"
    assert not local_stack.storage().exists("probe/denied")


def test_anonymous_and_wrong_password_mqtt_are_refused(local_stack: LocalStack) -> None:
    host, port = local_stack.host, local_stack.mqtt_port
    assert mqtt_connack(host, port, None, None) != 0
    assert mqtt_connack(host, port, "admin", "wrong") != 0
    assert mqtt_connack(host, port, "nobody", "x") != 0


def test_device_cannot_publish_as_another_device(stack_ns, wait_until) -> None:  # noqa: ANN001
    a, b = stack_ns.device("cam-a"), stack_ns.device("cam-b")
    t = stack_ns.topics
    ingest = Client(stack_ns.mqtt_config("ingest"))
    dev_a = Client(stack_ns.mqtt_config(a))
    try:
        assert ingest.subscribe(f"$share/{stack_ns.prefix}/{t.all_devices('frames')}").value == 1
        assert ingest.subscribe(t.all_devices("status")).value == 1
        # Forged first, genuine last: one client's QoS 1 messages arrive in order (MQTT 4.6).
        dev_a.publish(t.frames(b), b"forged frame")
        dev_a.publish(t.status(b), b"offline")
        dev_a.publish(t.acks(a), b"self-ack")
        dev_a.publish(t.frames(a), b"genuine frame")
        # mosquitto routes one client's PUBLISHes in the order they come and queues them to a
        # subscriber in that order: once the genuine frame is here, a forged one would be too.
        assert wait_until(lambda: ingest.payloads(t.frames(a)) == [b"genuine frame"], 5)
        assert ingest.payloads(t.frames(b)) == []
        assert ingest.payloads(t.status(b)) == []
    finally:
        ingest.close()
        dev_a.close()


def test_device_cannot_read_another_devices_captions(stack_ns, wait_until) -> None:  # noqa: ANN001
    a, b = stack_ns.device("cam-a"), stack_ns.device("cam-b")
    t = stack_ns.topics
    worker = Client(stack_ns.mqtt_config("worker"))
    dev_b = Client(stack_ns.mqtt_config(b))
    try:
        # Dynamic security checks a SUBSCRIBE when it is made (and each delivery again).
        assert dev_b.subscribe(t.captions(a)).is_failure
        assert dev_b.subscribe(t.all_devices("captions")).is_failure
        assert dev_b.subscribe(t.captions(b)).value == 1
        worker.publish(t.captions(a), b"caption of a")
        worker.publish(t.captions(b), b"caption of b")
        # The worker's messages are queued to dev_b in the order it sent them: once the caption
        # of b is here, the caption of a would be too.
        assert wait_until(lambda: b"caption of b" in dev_b.payloads(t.captions(b)), 5)
        assert dev_b.payloads(t.captions(a)) == []
    finally:
        worker.close()
        dev_b.close()


def test_service_accounts_only_write_their_own_kind(stack_ns, wait_until) -> None:  # noqa: ANN001
    dev = stack_ns.device("cam")
    t = stack_ns.topics
    admin = Client(stack_ns.mqtt_config("admin"))
    worker = Client(stack_ns.mqtt_config("worker"))
    ingest = Client(stack_ns.mqtt_config("ingest"))
    try:
        admin.subscribe(f"{stack_ns.prefix}/#")
        worker.publish(t.frames(dev), b"worker frame")
        ingest.publish(t.captions(dev), b"ingest caption")
        ingest.publish(t.acks(dev), b"ack")
        worker.publish(t.captions(dev), b"caption")
        # Each account's refused message went out before its allowed one, and one client's
        # messages reach a subscriber in the order it sent them.
        assert wait_until(lambda: {b"ack", b"caption"} <= {p for _, p in admin.messages}, 5)
        assert sorted(p for _, p in admin.messages) == [b"ack", b"caption"]
    finally:
        for c in (admin, worker, ingest):
            c.close()


def test_web_account_reads_captions_and_status_and_writes_only_alerts(stack_ns, wait_until) -> None:  # noqa: ANN001
    dev = stack_ns.device("cam")
    t = stack_ns.topics
    admin = Client(stack_ns.mqtt_config("admin"))
    web = Client(stack_ns.mqtt_config("web"))
    worker = Client(stack_ns.mqtt_config("worker"))
    ingest = Client(stack_ns.mqtt_config("ingest"))
    device = Client(stack_ns.mqtt_config(dev))
    try:
        admin.subscribe(f"{stack_ns.prefix}/#")
        for kind in ("captions", "status"):
            assert web.subscribe(t.all_devices(kind)).value == 1
        for kind in ("acks", "frames"):  # refused when subscribed (and at each delivery)
            assert web.subscribe(t.all_devices(kind)).is_failure
        # What the web account may not publish: dropped by the broker.
        web.publish(t.frames(dev), b"web frame")
        web.publish(t.captions(dev), b"web caption")
        web.publish(t.acks(dev), b"web ack")
        web.publish(t.status(dev), b"offline")
        # What the others send: the web account hears captions and status, not acks nor frames.
        ingest.publish(t.acks(dev), b"ack")
        device.publish(t.frames(dev), b"frame")
        device.publish(t.status(dev), b"online")
        worker.publish(t.captions(dev), b"caption")
        web.publish(t.alerts(dev), b"alert")  # the one thing it may publish
        # One client's messages reach a subscriber in the order it sent them: the web account's
        # refused messages went out before its alert, the device's frame before its status.
        assert wait_until(lambda: admin.payloads(t.alerts(dev)) == [b"alert"], 5)
        assert wait_until(lambda: web.payloads(t.captions(dev)) == [b"caption"], 5)
        assert wait_until(lambda: web.payloads(t.status(dev)) == [b"online"], 5)
        assert wait_until(lambda: all(admin.payloads(topic) for topic in (t.captions(dev), t.frames(dev),
                                                                          t.status(dev), t.acks(dev))), 5)
        assert web.payloads(t.acks(dev)) == [] and web.payloads(t.frames(dev)) == []
        assert admin.payloads(t.captions(dev)) == [b"caption"]
        assert admin.payloads(t.frames(dev)) == [b"frame"]
        assert admin.payloads(t.status(dev)) == [b"online"]
        assert admin.payloads(t.acks(dev)) == [b"ack"]
    finally:
        for c in (admin, web, worker, ingest, device):
            c.close()


def test_a_device_reads_only_its_own_alerts(stack_ns, wait_until) -> None:  # noqa: ANN001
    a, b = stack_ns.device("cam-a"), stack_ns.device("cam-b")
    t = stack_ns.topics
    web = Client(stack_ns.mqtt_config("web"))
    dev_b = Client(stack_ns.mqtt_config(b))
    try:
        assert dev_b.subscribe(t.alerts(a)).is_failure
        assert dev_b.subscribe(t.all_devices("alerts")).is_failure
        assert dev_b.subscribe(t.alerts(b)).value == 1
        # A device may read, not write, alerts. Its PUBACK comes after mosquitto routed (or
        # refused) the message, and the web's alerts go out after that PUBACK; the web's two
        # alerts reach dev_b in the order sent: once "alert of b" is here, anything else would be.
        dev_b.publish(t.alerts(b), b"forged by the device")
        web.publish(t.alerts(a), b"alert of a")
        web.publish(t.alerts(b), b"alert of b")
        assert wait_until(lambda: b"alert of b" in dev_b.payloads(t.alerts(b)), 5)
        assert dev_b.payloads(t.alerts(a)) == []
        # Two matching subscriptions may deliver it twice; the forged one never.
        assert set(dev_b.payloads(t.alerts(b))) == {b"alert of b"}
    finally:
        web.close()
        dev_b.close()


def test_stack_env_prints_the_web_account(local_stack: LocalStack, capsys) -> None:  # noqa: ANN001
    assert main(["env", "--user", "web", "--state-dir", str(local_stack.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "export FRAMECAP_MQTT_USERNAME=web\n" in out
    assert f"export FRAMECAP_MQTT_PASSWORD={local_stack.password('web')}\n" in out
    web_key, web_secret = local_stack.s3_credentials("web")
    assert f"export FRAMECAP_S3_ACCESS_KEY_ID={web_key}\n" in out
    assert f"export FRAMECAP_S3_SECRET_ACCESS_KEY={web_secret}\n" in out
    assert local_stack.s3_credentials("admin")[1] not in out  # never the admin identity
    assert mqtt_connack(local_stack.host, local_stack.mqtt_port, "web", local_stack.password("web")) == 0


def test_tls_listener_is_verified_with_the_generated_ca(stack_ns, wait_until) -> None:  # noqa: ANN001
    dev = stack_ns.device("cam")
    config = stack_ns.mqtt_config(dev, tls=True)
    assert config.port == stack_ns.stack.mqtt_tls_port and config.tls.ca_certs == stack_ns.stack.ca_file
    ingest = Client(stack_ns.mqtt_config("ingest"))
    device = Client(config)  # TLS, hostname 127.0.0.1 checked against the certificate's SAN
    try:
        assert device.connack is not None and not device.connack.is_failure
        ingest.subscribe(stack_ns.topics.frames(dev))
        device.publish(stack_ns.topics.frames(dev), b"over tls")
        assert wait_until(lambda: ingest.payloads(stack_ns.topics.frames(dev)) == [b"over tls"], 5)
    finally:
        device.close()
        ingest.close()
    with pytest.raises(ssl.SSLError):  # the system CAs do not know our CA
        mqtt_connack(stack_ns.stack.host, stack_ns.stack.mqtt_tls_port, dev, "x", ca_certs=certifi_or_system())
    assert mqtt_connack(stack_ns.stack.host, stack_ns.stack.mqtt_tls_port, dev, "wrong",
                        ca_certs=stack_ns.stack.ca_file) != 0


def test_add_device_cli_stores_password_and_reloads_broker(local_stack: LocalStack, capsys) -> None:  # noqa: ANN001
    name = f"cli-{uuid.uuid4().hex[:6]}"
    assert main(["add-device", name, "--state-dir", str(local_stack.state_dir)]) == 0
    out = capsys.readouterr().out
    password = local_stack.password(name)
    assert password not in out and str(local_stack.accounts_file) in out
    assert mqtt_connack(local_stack.host, local_stack.mqtt_port, name, password) == 0
    assert main(["add-device", "../evil", "--state-dir", str(local_stack.state_dir)]) == 1


def test_status_cli_reports_running_without_secrets(local_stack: LocalStack, capsys) -> None:  # noqa: ANN001
    assert main(["status", "--json", "--state-dir", str(local_stack.state_dir)]) == 0
    out = capsys.readouterr().out
    status = json.loads(out)
    assert status["mosquitto"]["running"] and status["seaweedfs"]["running"]
    assert status["seaweedfs"]["endpoint_url"] == local_stack.s3_endpoint
    assert local_stack.password("admin") not in out


def test_mosquitto_restart_keeps_persistent_sessions(stack_ns, wait_until) -> None:  # noqa: ANN001
    """SIGTERM saves the queue: a persistent subscriber gets what was published while the
    broker restarted (the stack's persistence config, which the fault tests rely on)."""
    dev = stack_ns.device("cam")
    topic = stack_ns.topics.frames(dev)
    config = stack_ns.mqtt_config("ingest")
    client_id = stack_ns.client_id("ingest")

    def subscriber() -> mqtt.Client:
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(config.username, config.password.get_secret_value())
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        client.on_message = lambda c, u, m: got.append(bytes(m.payload))
        client.connect(config.host, config.port, clean_start=False, properties=props)
        return client

    got: list[bytes] = []
    subacked = threading.Event()
    sub = subscriber()
    sub.on_subscribe = lambda *args: subacked.set()
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    assert subacked.wait(10), "no SUBACK"  # the subscription is in the session before it goes
    sub.disconnect()
    sub.loop_stop()
    pub = Client(stack_ns.mqtt_config(dev))
    for i in range(20):
        pub.publish(topic, b"%d" % i)
    pub.close()
    stack_ns.stack.restart_mosquitto()
    sub = subscriber()
    sub.loop_start()
    try:
        assert wait_until(lambda: len(got) >= 20, 10), f"got {len(got)} of 20 after restart"
        assert got == [b"%d" % i for i in range(20)]
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_seaweedfs_kill_and_restart_keeps_objects(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.storage()
    store.put("frames/x/2026/01/01/a.jpg", b"kept bytes", metadata={"k": "v"})
    stack_ns.stack.restart_seaweedfs(kill=True)
    assert store.get("frames/x/2026/01/01/a.jpg") == b"kept bytes"
    assert store.head_metadata("frames/x/2026/01/01/a.jpg") == {"k": "v"}


@pytest.mark.slow
def test_cli_up_status_down_with_tls(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    state = tmp_path / "st"
    assert main(["up", "--state-dir", str(state), "--tls", "--device", "cam1", "--timeout", "60"]) == 0
    stack = LocalStack.load(state)
    try:
        out = capsys.readouterr().out
        assert f"mqtt://127.0.0.1:{stack.mqtt_port}" in out and stack.s3_endpoint in out
        for account in stack.accounts().values():
            assert account["password"] not in out
        assert main(["up", "--state-dir", str(state)]) == 0  # already running: says so
        assert "already running" in capsys.readouterr().out
        assert mqtt_connack(stack.host, stack.mqtt_tls_port, "cam1", stack.password("cam1"),
                            ca_certs=stack.ca_file) == 0
        assert main(["status", "--state-dir", str(state)]) == 0
    finally:
        assert main(["down", "--state-dir", str(state), "--timeout", "2"]) == 0
    pids = (stack.mosquitto.pid, stack.seaweedfs.pid)
    assert not any(pid_alive(p) for p in pids)
    assert main(["status", "--state-dir", str(state)]) == 3
    for port in (stack.s3_port, stack._port("filer")):
        assert glob.glob(f"/tmp/seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock") == []


def _kill9(pid: int | None) -> None:
    """SIGKILL a server of a stack that the test started (from its stack.json), and wait until it
    is gone (it may stay a zombie of this process: pid_alive says False for that)."""
    assert pid is not None and pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive 10 s after SIGKILL"
        time.sleep(0.02)


@pytest.mark.slow
def test_stack_up_heals_what_was_killed_and_status_names_it(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """kill -9 of either server (issue 8 item 6): status says which is dead, ``up`` restarts only
    that one, on its ports and data (objects kept), and never starts a second server."""
    state = tmp_path / "st"
    assert main(["up", "--state-dir", str(state), "--device", "cam1", "--timeout", "60"]) == 0
    first = LocalStack.load(state)
    try:
        first.storage().put("frames/cam1/kept.jpg", b"kept")
        capsys.readouterr()
        # 1. mosquitto killed: status names it, up restarts it and leaves SeaweedFS alone.
        _kill9(first.mosquitto.pid)
        assert main(["status", "--state-dir", str(state)]) == 3
        out = capsys.readouterr().out
        assert re.search(r"^mosquitto\s+dead\b", out, re.M) and re.search(r"^seaweedfs\s+running\b", out, re.M)
        assert "'framecap stack up' restarts" in out
        status = json.loads(_cli_json(state, capsys))
        assert status["mosquitto"]["state"] == "dead" and status["seaweedfs"]["state"] == "running"
        assert main(["up", "--state-dir", str(state)]) == 0
        out = capsys.readouterr().out
        assert "healed: restarted mosquitto" in out and "seaweedfs" not in out.split("\n")[0]
        healed = LocalStack.load(state)
        assert healed.seaweedfs.pid == first.seaweedfs.pid and pid_alive(first.seaweedfs.pid)
        assert healed.mosquitto.pid != first.mosquitto.pid and healed.running()
        assert healed.mqtt_port == first.mqtt_port and healed.s3_port == first.s3_port
        assert mqtt_connack(healed.host, healed.mqtt_port, "cam1", healed.password("cam1")) == 0
        assert server_pids("mosquitto", healed.mosquitto.needle) == [healed.mosquitto.pid]
        # 2. SeaweedFS killed: up restarts it on the same ports and data; mosquitto keeps its pid.
        _kill9(healed.seaweedfs.pid)
        assert json.loads(_cli_json(state, capsys))["seaweedfs"]["state"] == "dead"
        assert main(["up", "--state-dir", str(state), "--timeout", "60"]) == 0
        assert "healed: restarted seaweedfs" in capsys.readouterr().out
        again = LocalStack.load(state)
        assert again.mosquitto.pid == healed.mosquitto.pid and again.running()
        assert again.s3_port == first.s3_port
        assert again.storage().get("frames/cam1/kept.jpg") == b"kept"
        assert server_pids("weed", again.seaweedfs.needle) == [again.seaweedfs.pid]
        # 3. stack.json holds a stale pid while the broker runs under another: up adopts the
        # running one instead of starting a second broker on the same data.
        data = json.loads(again.state_file.read_text())
        real = data["mosquitto"]["pid"]
        data["mosquitto"]["pid"] = 999_999_999
        again.state_file.write_text(json.dumps(data))
        assert main(["up", "--state-dir", str(state)]) == 0
        assert "already running" in capsys.readouterr().out
        assert server_pids("mosquitto", again.mosquitto.needle) == [real]
        assert LocalStack.load(state).mosquitto.pid == real
        data["mosquitto"]["pid"] = 999_999_999  # down, too, stops the broker on our files
        again.state_file.write_text(json.dumps(data))
        LocalStack.load(state).down(timeout_s=5)
        assert server_pids("mosquitto", again.mosquitto.needle) == []
        assert server_pids("weed", again.seaweedfs.needle) == []
        assert main(["up", "--state-dir", str(state), "--timeout", "60"]) == 0
        again = LocalStack.load(state)
        real = again.mosquitto.pid
        # 4. both killed: up starts both again, with the same ports and data.
        _kill9(real)
        _kill9(again.seaweedfs.pid)
        assert main(["status", "--state-dir", str(state)]) == 3
        assert "mosquitto and seaweedfs" in capsys.readouterr().out
        assert main(["up", "--state-dir", str(state), "--timeout", "60"]) == 0
        last = LocalStack.load(state)
        assert last.running() and last.storage().get("frames/cam1/kept.jpg") == b"kept"
        # The ports of the run that was killed, not of the first run: after a clean ``down`` a
        # port is reused only when free (a port in TIME_WAIT or taken meanwhile is replaced).
        assert last.mqtt_port == again.mqtt_port and last.s3_port == again.s3_port
    finally:
        assert main(["down", "--state-dir", str(state), "--timeout", "2"]) == 0
    assert json.loads(_cli_json(state, capsys))["mosquitto"]["state"] == "stopped"


def _cli_json(state: Path, capsys) -> str:  # noqa: ANN001
    capsys.readouterr()
    main(["status", "--json", "--state-dir", str(state)])
    return str(capsys.readouterr().out)
