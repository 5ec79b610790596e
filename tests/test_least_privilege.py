"""Least privilege in the local stack (issue 8 items 4 and 7): one S3 identity per role, devices
none; MQTT subscriptions checked when they are made, so no device joins a service's share group.

Each service's S3 identity may do what its code does and nothing else (``S3_GRANTS``): the
ingest writes ``frames/``, the worker reads ``frames/`` and writes ``captions/`` and ``outbox/``,
web only reads, devices get no S3 keys at all. Checked against the real SeaweedFS.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from common.stack import S3_GRANTS, main
from common.storage import StorageError

pytestmark = pytest.mark.integration

FRAME = "frames/cam/2026/01/01/f1.jpg"
CAPTION = "captions/cam/2026/01/01/f1.json"
MARKER = "outbox/w1/captions/cam/2026/01/01/f1.json"


def _denied(call, *args, **kwargs) -> bool:
    """True if S3 refuses the call (AccessDenied / 403)."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except StorageError as err:
        assert "403" in str(err) or "AccessDenied" in str(err) or "denied" in str(err).lower(), err
        return True
    return False


@pytest.fixture
def seeded(stack_ns):
    admin = stack_ns.storage()
    for key in (FRAME, CAPTION, MARKER):
        admin.put(key, b"seed " + key.encode())
    return admin


def test_a_device_env_holds_no_s3_keys(stack_ns, capsys) -> None:
    dev = stack_ns.device("cam")
    stack = stack_ns.stack
    env = stack.env(dev)
    assert not [k for k in env if k.startswith("FRAMECAP_S3_")]
    assert env["FRAMECAP_MQTT_USERNAME"] == dev
    assert main(["env", "--user", dev, "--state-dir", str(stack.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "FRAMECAP_S3" not in out
    for role in ("admin", "ingest", "worker", "web"):
        key_id, secret = stack.s3_credentials(role)
        assert key_id not in out and secret not in out
    # each service's env carries its own identity, never the admin's
    admin_key = stack.s3_credentials("admin")[0]
    for role in ("ingest", "worker", "web"):
        env = stack.env(role)
        assert env["FRAMECAP_S3_ACCESS_KEY_ID"] == stack.s3_credentials(role)[0] != admin_key


def test_ingest_writes_frames_only(stack_ns, seeded) -> None:
    ingest = stack_ns.stack.storage(stack_ns.bucket, role="ingest", max_attempts=1)
    assert ingest.put_if_absent("frames/cam/2026/01/01/f2.jpg", b"new") is True
    assert ingest.put_if_absent(FRAME, b"other") is False  # 412, then it reads what is there
    assert ingest.head_metadata(FRAME) == {}
    assert seeded.get(FRAME) == b"seed " + FRAME.encode()
    assert _denied(ingest.put, CAPTION, b"forged caption")
    assert _denied(ingest.put, MARKER, b"forged marker")
    assert _denied(ingest.put, "captions/frames/x.json", b"a '*' grant would match this")
    assert _denied(ingest.delete, CAPTION)
    assert _denied(ingest.delete, MARKER)
    assert _denied(ingest.get, CAPTION)
    assert _denied(ingest.list_keys, "frames/")
    assert _denied(ingest.ensure_bucket)  # only admin checks or creates buckets
    assert seeded.get(CAPTION) == b"seed " + CAPTION.encode()


def test_worker_cannot_write_frames(stack_ns, seeded) -> None:
    worker = stack_ns.stack.storage(stack_ns.bucket, role="worker", max_attempts=1)
    assert _denied(worker.put, FRAME, b"overwritten")
    assert _denied(worker.put_if_absent, "frames/cam/2026/01/01/new.jpg", b"forged")
    assert _denied(worker.delete, FRAME)
    assert seeded.get(FRAME) == b"seed " + FRAME.encode()
    assert not seeded.exists("frames/cam/2026/01/01/new.jpg")
    # what it does: read frames, list, write captions and outbox markers, delete markers
    assert worker.get(FRAME) == b"seed " + FRAME.encode()
    assert list(worker.list_keys("frames/")) == [FRAME]
    assert list(worker.list_keys("captions/")) == [CAPTION]
    assert list(worker.list_keys("outbox/")) == [MARKER]
    worker.put("captions/cam/2026/01/01/f2.json", b"{}")
    worker.put("outbox/w1/captions/cam/2026/01/01/f2.json", b"")
    worker.delete(MARKER)
    assert not seeded.exists(MARKER)
    assert worker.get("captions/cam/2026/01/01/f2.json") == b"{}"


def test_web_cannot_write_at_all(stack_ns, seeded) -> None:
    web = stack_ns.stack.storage(stack_ns.bucket, role="web", max_attempts=1)
    for key in (FRAME, CAPTION, MARKER, "frames/cam/x.jpg", "captions/cam/x.json"):
        assert _denied(web.put, key, b"forged")
    for key in (FRAME, CAPTION, MARKER):
        assert _denied(web.delete, key)
        assert seeded.get(key) == b"seed " + key.encode()
    assert web.get(FRAME) == b"seed " + FRAME.encode()
    assert web.get(CAPTION) == b"seed " + CAPTION.encode()
    assert list(web.list_keys("captions/")) == [CAPTION]
    assert _denied(web.list_keys, "outbox/")


def test_grants_are_named_per_bucket_so_other_buckets_are_out_of_reach(stack_ns, seeded) -> None:
    """The ingest's identity granted in one test bucket cannot write another bucket the stack
    never granted; a worker cannot create buckets."""
    stack = stack_ns.stack
    other = f"{stack_ns.bucket}-x"
    stack.storage(other).ensure_bucket()  # admin
    ingest_cfg = stack.s3_config(stack_ns.bucket, role="ingest")
    from common.storage import ObjectStore

    foreign = ObjectStore(ingest_cfg.model_copy(update={"bucket": other}), max_attempts=1)
    assert _denied(foreign.put, "frames/cam/2026/01/01/f1.jpg", b"x")
    assert set(S3_GRANTS) == {"ingest", "worker", "web"}


class _Sub:
    """A bare MQTT v5 client that records SUBACK reason codes and every message it gets."""

    def __init__(self, config, *, persistent: bool = False) -> None:  # noqa: ANN001
        import paho.mqtt.client as mqtt

        self.messages: list[str] = []
        self._acked = threading.Event()
        self._connected = threading.Event()
        self.codes: list[int] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"hostile-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(config.username, config.password.get_secret_value())
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_message = lambda c, u, m: self.messages.append(m.topic)
        self.client.on_subscribe = self._on_subscribe
        props = None
        if persistent:  # in the old setup a persistent member kept its share while away
            props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(config.host, config.port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self.codes = [rc.value for rc in reason_codes]
        self._acked.set()

    def subscribe(self, topic: str) -> int:
        """SUBACK reason code: 1 granted QoS 1, 135 (0x87) not authorized."""
        self._acked.clear()
        self.client.subscribe(topic, qos=1)
        assert self._acked.wait(5), "no SUBACK"
        return self.codes[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


NOT_AUTHORIZED = 135


def test_a_device_may_subscribe_only_to_its_own_topics(stack_ns, wait_until) -> None:  # noqa: ANN001
    """Issue 8 item 4: subscriptions are checked when made (dynamic security), so a device can
    join neither the ingest's nor the worker's share group, nor read any other topic."""
    dev, other = stack_ns.device("hostile"), stack_ns.device("cam")
    t = stack_ns.topics
    hostile = _Sub(stack_ns.mqtt_config(dev))
    try:
        for topic in (f"$share/ingest/{t.all_devices('frames')}", f"$share/worker/{t.all_devices('acks')}",
                      f"$share/web/{t.all_devices('captions')}", f"$share/ingest/{t.frames(other)}",
                      f"$share/x/{t.acks(dev)}", "#", f"{stack_ns.prefix}/#", t.all_devices("frames"),
                      t.frames(other), t.frames(dev), t.captions(other), t.acks(other), t.alerts(other),
                      "$SYS/#", "$CONTROL/dynamic-security/v1/response"):
            assert hostile.subscribe(topic) == NOT_AUTHORIZED, topic
        for topic in (t.acks(dev), t.captions(dev), t.alerts(dev)):
            assert hostile.subscribe(topic) == 1, topic
    finally:
        hostile.close()


def test_a_hostile_device_cannot_hold_back_other_devices_frames(stack_ns, shared_dir, tmp_path) -> None:  # noqa: ANN001
    """A device that tries to join the ingest's share group (live, and with a persistent session
    that then goes away) is refused, and another device's frames all reach S3 at once: the
    edge drains well before its 30 s resend (with the old ACL file every second frame went to
    the hostile member and was dropped, so the drain waited for the resend)."""
    from cloud.ingest import IngestService
    from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig
    from edge.daemon import EdgeDaemon

    hostile_id, good = stack_ns.device("hostile"), stack_ns.device("cam")
    t = stack_ns.topics
    ingest_config = IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(role="ingest"))
    group = f"$share/{ingest_config.share_group}/{t.all_devices('frames')}"
    away = _Sub(stack_ns.mqtt_config(hostile_id), persistent=True)
    assert away.subscribe(group) == NOT_AUTHORIZED
    away.close()  # a persistent member that leaves would have kept its turn
    hostile = _Sub(stack_ns.mqtt_config(hostile_id))
    ingest = IngestService(ingest_config, client_id=stack_ns.client_id("ingest"))
    ingest.start()
    try:
        assert ingest.wait_connected(10)
        assert hostile.subscribe(group) == NOT_AUTHORIZED
        assert hostile.subscribe("#") == NOT_AUTHORIZED
        frames = 6
        config = EdgeConfig(
            device_id=good, source=str(shared_dir / "videos" / "vtest.avi"), max_frames=frames,
            mqtt=stack_ns.mqtt_config(good), sampling=SamplingConfig(interval_s=2.0, scene_change=False),
            spool=SpoolConfig(directory=tmp_path / "spool"), drain_timeout_s=60,
        )
        assert config.spool.resend_after_s >= 30
        t0 = time.monotonic()
        summary = EdgeDaemon(config, print_captions=False).run()
        took = time.monotonic() - t0
    finally:
        ingest.stop()
        hostile.close()
    assert summary.drained and summary.frames_acked == frames
    assert len(list(stack_ns.storage().list_keys(f"frames/{good}/"))) == frames
    assert took < config.spool.resend_after_s * 0.6, f"drain took {took:.1f} s: frames waited for a resend"
    assert hostile.messages == []


def test_compose_broker_config_refuses_a_device_in_the_ingest_share_group(tmp_path, wait_until) -> None:  # noqa: ANN001
    """deploy/mosquitto (entrypoint.sh writes the dynamic security JSON from the environment,
    mosquitto.conf loads the plugin) on the real mosquitto, paths moved into tmp_path."""
    import subprocess

    from common.config import MqttConfig
    from common.stack import find_dynsec_plugin, find_mosquitto, mqtt_connack, pick_port
    from common.stack.process import StackError

    try:
        find_mosquitto()
        plugin = find_dynsec_plugin()
    except StackError as err:
        pytest.skip(str(err))
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
    port = pick_port()
    conf = (deploy / "mosquitto.conf").read_text()
    settings = [line.split()[0] for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    assert "acl_file" not in settings and "password_file" not in settings and "plugin" in settings
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", plugin)
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1").replace("log_dest stdout", "log_dest stderr")
    conf = conf[:conf.index("\nlistener 8883")] + "\n"  # the TLS listener is tested in tests/test_deploy.py
    (tmp_path / "mosquitto.conf").write_text("user root\n" + conf)
    env = {"PATH": os.environ["PATH"], "FRAMECAP_MOSQUITTO_DATA": str(tmp_path),
           "FRAMECAP_MOSQUITTO_CONF": str(tmp_path / "mosquitto.conf"),
           "FRAMECAP_MQTT_INGEST_PASSWORD": "pw-ingest", "FRAMECAP_MQTT_WORKER_PASSWORD": "pw-worker",
           "FRAMECAP_MQTT_WEB_PASSWORD": "pw-web", "FRAMECAP_MQTT_DEVICES": "cam1:pw-cam1 cam2:pw-cam2"}
    broker = subprocess.Popen(["sh", str(deploy / "entrypoint.sh")], env=env, stderr=subprocess.PIPE)

    def up() -> bool:
        try:
            return mqtt_connack("127.0.0.1", port, "ingest", "pw-ingest") == 0
        except OSError:
            assert broker.poll() is None, broker.stderr.read() if broker.stderr else b""
            return False

    def config(user: str) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=port, username=user, password=SecretStr(f"pw-{user}"))

    clients: list[_Sub] = []
    try:
        assert wait_until(up, 10), "the deploy broker did not start"
        assert mqtt_connack("127.0.0.1", port, "cam1", "wrong") != 0
        assert mqtt_connack("127.0.0.1", port, None, None) != 0
        ingest, cam1, cam2, worker = (_Sub(config(u)) for u in ("ingest", "cam1", "cam2", "worker"))
        clients += [ingest, cam1, cam2, worker]
        assert ingest.subscribe("$share/ingest/framecap/+/frames") == 1
        assert worker.subscribe("$share/worker/framecap/+/acks") == 1
        for topic in ("$share/ingest/framecap/+/frames", "$share/worker/framecap/+/acks", "#",
                      "framecap/cam2/captions", "framecap/+/frames"):
            assert cam1.subscribe(topic) == NOT_AUTHORIZED, topic
        assert cam1.subscribe("framecap/cam1/captions") == 1
        cam1.client.publish("framecap/cam2/frames", b"forged", qos=1).wait_for_publish(5)
        for i in range(10):
            cam2.client.publish("framecap/cam2/frames", b"%d" % i, qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(ingest.messages) >= 10, 5)
        assert ingest.messages == ["framecap/cam2/frames"] * 10  # all of them, and not the forged one
    finally:
        for c in clients:
            c.close()
        broker.terminate()
        broker.wait(10)
