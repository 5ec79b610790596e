"""One MQTT client wrapper for every framecap process (paho-mqtt 2.x, MQTT v5).

What it adds to paho (after frigate's ``frigate/comms/mqtt.py``, doing better where STYLE.md
asks): callback API VERSION2; a last will; ``connect_async`` + ``loop_start`` with reconnect
backoff; subscriptions remembered and renewed on every (re)connect; a handler that raises is
logged and never reaches paho's loop; and every answer of the broker said in words (STYLE.md
item 10), with a hint where the cause is usually ours:

- a connection that fails (socket error: refused, name not resolved, timeout, TLS; or a CONNACK
  failure) is logged with host:port and the cause, first at WARNING (ERROR for a CONNACK
  refusal), then at most every :data:`CONNECT_LOG_EVERY_S` seconds while it keeps failing;
- a QoS>0 publish the broker refuses (MQTT v5 PUBACK reason code >= 0x80, e.g. mosquitto's
  135 "Not authorized" for an ACL-denied topic) is NOT delivered: the ``on_published`` hooks
  are not called, the ``on_publish_refused`` hooks are, and it is logged at ERROR once per topic
  (then at DEBUG with a count; :attr:`MqttClient.publishes_refused` counts them all);
- a refused subscription (SUBACK failure) is logged at ERROR with its filter.

Spec: MQTT Version 5.0, OASIS Standard (2019): user properties (3.3.2.3.7), shared
subscriptions (4.8.2), session expiry (3.1.2.11.2).

Handlers run on paho's network thread (``start()``), or on the caller's thread that runs
:meth:`MqttClient.run_network` (``start(network_thread=False)``, the edge's publisher): they
must return quickly. Long work (an S3 put, a model
batch) goes to a queue and another thread, which acks later with :meth:`MqttClient.ack` when
the client was made with ``manual_ack=True``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from common.config import MqttConfig

logger = logging.getLogger(__name__)
paho_logger = logging.getLogger(f"{__name__}.paho")  # paho's own warnings and errors

MessageHandler = Callable[[mqtt.MQTTMessage], None]

CONNECT_LOG_EVERY_S = 30.0  # while a connection keeps failing, repeat its log line this often

# MQTT v5 reason codes (MQTT Version 5.0, 2.4 "Reason Code") in a sentence each: what the
# broker meant, and where to look. Only failures (>= 0x80) are listed.
CONNACK_REASONS: dict[int, str] = {
    128: "unspecified error: the broker refused the connection without saying why",
    129: "malformed packet: the broker could not parse the CONNECT",
    130: "protocol error in the CONNECT",
    131: "implementation specific error: the broker refused the connection (see its log)",
    132: "unsupported protocol version: the broker does not speak MQTT v5",
    133: "client identifier not valid: the broker refuses this client_id",
    134: "bad user name or password: check mqtt.username and $FRAMECAP_MQTT_PASSWORD",
    135: "not authorized: this user may not connect to the broker",
    136: "server unavailable",
    137: "server busy: try again later",
    138: "banned: the broker bans this client",
    140: "bad authentication method",
    144: "topic name invalid (the last-will topic)",
    149: "packet too large: the CONNECT exceeds the broker's maximum packet size",
    151: "quota exceeded",
    153: "payload format invalid (the last-will payload)",
    154: "retain not supported (the last will is retained)",
    155: "QoS not supported (the last will's QoS)",
    156: "use another server: the broker redirects this client elsewhere",
    157: "server moved: the broker has moved elsewhere",
    159: "connection rate exceeded: the broker limits how often a client may connect",
}
PUBACK_REASONS: dict[int, str] = {
    128: "unspecified error: the broker did not accept the message",
    131: "implementation specific error: the broker did not accept the message (see its log)",
    135: "not authorized: the broker's ACL does not let this user publish on this topic",
    144: "topic name invalid: the broker does not accept this topic name",
    145: "packet identifier in use: the broker still holds a message with this id",
    151: "quota exceeded: the broker's limits (queue, rate, size) refused the message",
    153: "payload format invalid: the payload does not match its payload format indicator",
}
SUBACK_REASONS: dict[int, str] = {
    128: "unspecified error: the broker did not accept the subscription",
    131: "implementation specific error: the broker did not accept the subscription (see its log)",
    135: "not authorized: the broker's ACL does not let this user subscribe to this filter",
    143: "topic filter invalid: the broker does not accept this filter",
    145: "packet identifier in use",
    151: "quota exceeded: the broker's limits refused the subscription",
    158: "shared subscriptions not supported by the broker ($share/...)",
    161: "subscription identifiers not supported by the broker",
    162: "wildcard subscriptions not supported by the broker (+ or #)",
}
_REASONS = {"CONNACK": CONNACK_REASONS, "PUBACK": PUBACK_REASONS, "SUBACK": SUBACK_REASONS}


def reason_sentence(packet: Literal["CONNACK", "PUBACK", "SUBACK"], code: ReasonCode | int) -> str:
    """``code`` (an MQTT v5 reason code of ``packet``) as a sentence ending in ``(code N)``.

    Codes not in the tables (successes, or codes the standard does not list for ``packet``)
    get paho's name of the code, or "reason code N".
    """
    value = code.value if isinstance(code, ReasonCode) else int(code)
    text = _REASONS[packet].get(value)
    if text is None:
        text = str(code) if isinstance(code, ReasonCode) else f"reason code {value}"
    return f"{text} (code {value})"


def describe_socket_error(err: BaseException) -> str:
    """A failed TCP/TLS connection attempt in words (the cause first, then Python's text)."""
    if isinstance(err, socket.gaierror):
        return f"host name not resolved ({err.strerror or err})"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (nothing listens on that port, or a firewall rejects it)"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out (the host does not answer: down, wrong address, or a firewall drops it)"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {err.verify_message or err} (check tls.ca_certs)"
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake failed: {err.reason or err} (is the port a TLS listener?)"
    if isinstance(err, ConnectionResetError):
        return "connection reset by the broker"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return f"{type(err).__name__}: {err}"


def publish_refused_hint(reason_code: int, username: str | None, topic_prefix: str) -> str:
    """Where to look when the broker refuses a publish with ``reason_code``."""
    if reason_code == 135:
        return (f"user {username or '(anonymous)'} may not publish here: a device's user name "
                f"must equal its device_id, topic_prefix ({topic_prefix!r}) must be the one the "
                "broker's ACL grants, and a service must use its own account")
    if reason_code == 151:
        return "the broker's queue, rate or size limits refused it; see the broker's log"
    return "see the broker's log"


READ_AHEAD_BYTES = 64 * 1024  # run_network's socket reads, bytes


class _PahoClient(mqtt.Client):
    """paho's client, remembering the ``OSError`` of the last failed connection attempt
    (paho's ``on_connect_fail`` callback is told nothing about the cause).

    With :attr:`read_ahead` (set by :meth:`MqttClient.run_network`'s mode only), socket reads
    are buffered: paho reads a packet's type byte, each length byte and the rest with a
    ``recv`` each (4 system calls for a PUBACK); here one ``recv`` of up to
    :data:`READ_AHEAD_BYTES` serves them all, and the loop reads on while bytes are buffered.
    """

    last_connect_error: OSError | None = None
    read_ahead = False
    _rbuf = b""
    _rpos = 0
    _rbuf_sock: object = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as err:
            self.last_connect_error = err
            raise
        self.last_connect_error = None
        return rc

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.read_ahead:
            return super()._sock_recv(bufsize)
        if self._rbuf_sock is not self._sock:  # a new connection: nothing buffered is its
            self._rbuf, self._rpos, self._rbuf_sock = b"", 0, self._sock
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            data = super()._sock_recv(max(bufsize, READ_AHEAD_BYTES))  # raises when none
            if len(data) <= bufsize:  # all of it (b"": the peer closed)
                self._rbuf, self._rpos = b"", 0
                return data
            buf, pos = data, 0
        end = pos + bufsize
        self._rbuf, self._rpos = buf, end
        return buf[pos:end]

    def buffered_bytes(self) -> int:
        """Bytes read from the current socket and not yet handed to paho."""
        if not self.read_ahead or self._rbuf_sock is not self._sock:
            return 0
        return max(0, len(self._rbuf) - self._rpos)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0 controls, DEL, C1 controls


class UserProperties(Properties):
    """The properties of a PUBLISH that carries only user properties (MQTT 5.0 spec, 3.3.2.3.7:
    identifier 0x26, then a UTF-8 string pair), packed once, straight from the pairs.

    paho's :class:`~paho.mqtt.properties.Properties` scans its table of 27 property names with
    ``str.replace`` for every attribute set and every name packed: about 45 us for a frame's
    8 pairs, paid on each frame the edge publishes; this takes about 9 us. The bytes are the same
    (tested).

    Args:
        pairs: ``(name, value)`` strings, in order; the same name may repeat.

    Raises:
        ValueError: a name or value over 65,535 bytes in UTF-8 (a UTF-8 string's limit), or
            holding a control character: U+0000 a UTF-8 string must not hold (1.5.4,
            MQTT-1.5.4-2), U+0001-U+001F and U+007F-U+009F it should not, and mosquitto closes
            the connection of a client that sends any of them (paho would send them, and resend
            at every reconnect).
    """

    UserProperty: list[tuple[str, str]]
    _packed: bytes

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:  # paho's __init__ is skipped
        if _CONTROL.search("".join(text for pair in pairs for text in pair)):
            name = next(n for n, v in pairs if _CONTROL.search(n + v))
            raise ValueError(f"user property {name!r}: a control character (U+0000 to U+001F, "
                             "U+007F to U+009F) is not allowed in MQTT")
        body = bytearray()
        for name, value in pairs:
            body += b"\x26"
            for text in (name, value):
                data = text.encode("utf-8")
                if len(data) > 0xFFFF:
                    raise ValueError(f"user property {name!r}: over 65535 bytes in UTF-8")
                body += len(data).to_bytes(2, "big") + data
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "UserProperty", list(pairs))
        object.__setattr__(self, "_packed", bytes(VariableByteIntegers.encode(len(body)) + body))

    def pack(self) -> bytes:
        return self._packed

    def isEmpty(self) -> bool:  # noqa: N802 - paho's name
        return not self.UserProperty

    def json(self) -> dict[str, object]:
        return {"UserProperty": list(self.UserProperty)}

    def __str__(self) -> str:
        return f"[UserProperty : {self.UserProperty}]"


class _PahoLogFilter(logging.Filter):
    """paho's own log lines: drop its per-packet DEBUG trace and the "Client is not connected"
    it logs at each failed attempt (we say why, rate-limited); its other ERRORs (a socket that
    failed to receive, a callback that raised) become WARNINGs, as we log the outcome too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or str(record.msg).startswith("Client is not connected"):
            return False
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def set_tcp_nodelay(sock: object) -> bool:
    """Turn Nagle's algorithm off on ``sock`` (TCP_NODELAY); True if it is set.

    paho writes a PUBLISH, PUBACK or SUBSCRIBE in one ``send`` but never sets TCP_NODELAY, so a
    small packet sent while an earlier one is unacknowledged waits for the peer's delayed ACK
    (40 ms on Linux): a frame's ack and a caption each paid it. Sockets that are not TCP (a
    Unix socket, a WebSocket wrapper without ``setsockopt``) are left alone (False).
    """
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return False
    try:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket
        return False
    return True


paho_logger.addFilter(_PahoLogFilter())


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _filter_for_matching(topic_filter: str) -> str:
    """Strip ``$share/{group}/`` so a shared-subscription filter can match concrete topics."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


class MqttClient:
    """A paho client with our defaults. Thread-safe for publish/ack/subscribe.

    Args:
        config: broker address, credentials (never logged), TLS, keepalive, session expiry.
        client_id: MQTT client_id; also the persistent-session name on the broker.
        will: last will, e.g. ``offline`` on the device's status topic.
        manual_ack: if True, QoS 1 messages are acknowledged only when :meth:`ack` is called
            (paho ``manual_ack_set``), so a crash before the ack means redelivery.
        clean_start: if False, the broker keeps the session (subscriptions and queued QoS 1
            messages) for ``config.session_expiry_s`` while the client is away.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will: Will | None = None,
        manual_ack: bool = False,
        clean_start: bool = False,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self._clean_start = clean_start
        self._manual_ack = manual_ack
        self._subscriptions: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connect_callbacks: list[Callable[[bool], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._publish_callbacks: list[Callable[[int], None]] = []
        self._refused_callbacks: list[Callable[[int, str], None]] = []
        self.last_connack_failure: str | None = None
        self.last_connect_error: str | None = None  # why the last attempt failed; None once connected
        self.connect_failures = 0  # failed attempts since the last successful connection
        self._failing_since: float | None = None
        self._problem_logged: str | None = None  # the connection problem last logged, and when
        self._problem_logged_at = 0.0
        self._connack_refused = False  # this attempt's CONNACK was a failure (logged already)
        # Best effort (paho may call back before publish()/subscribe() return): mid -> topic of
        # QoS>0 publishes awaiting their PUBACK, PUBACK failures that came before their mid was
        # recorded, and the same for SUBACKs. Keyed by mid (1..65535), so bounded.
        self._pub_topics: dict[int, str] = {}
        self._early_refusals: dict[int, tuple[int, str]] = {}
        self._sub_filters: dict[int, str] = {}
        self._early_subacks: dict[int, list[ReasonCode]] = {}
        self._unsubacks: dict[int, threading.Event] = {}  # mid -> set by its UNSUBACK
        self._early_unsubacks: set[int] = set()  # UNSUBACKs that came before their mid was known
        self._refused_by_topic: dict[str, int] = {}
        self._refused_total = 0
        # Never held while calling into paho: paho calls on_publish holding its own
        # out-message mutex, which publish() takes too (a lock held across both would deadlock).
        self._mids_lock = threading.Lock()
        # start(network_thread=False): the caller's thread runs run_network(); wakeup() pokes it
        self._own_loop = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False
        self._next_attempt = 0.0  # time.monotonic() of the next connection attempt
        self._attempt_delay = config.reconnect_min_s  # seconds; doubles up to reconnect_max_s

        client = _PahoClient(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        client.manual_ack_set(manual_ack)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)  # unbounded in memory; durability is the spool's job
        # paho annotates the delays as int, but _reconnect_wait works in float seconds: pass
        # floats so reconnect_min_s = 0.5 waits 0.5 s, not 1 s.
        client.reconnect_delay_set(
            config.reconnect_min_s,  # type: ignore[arg-type]
            config.reconnect_max_s,  # type: ignore[arg-type]
        )
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else None
            client.username_pw_set(config.username, password)
        if config.tls is not None:
            tls = config.tls
            client.tls_set(
                ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
                certfile=str(tls.certfile) if tls.certfile else None,
                keyfile=str(tls.keyfile) if tls.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(tls.insecure)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = self._on_socket_open
        client.enable_logger(paho_logger)
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, *, network_thread: bool = True) -> None:
        """Connect in the background and keep reconnecting; returns at once.

        Args:
            network_thread: run paho's network loop on a thread of its own (``loop_start``),
                where every hook runs. False: no thread is started; one thread of the caller's
                runs :meth:`run_network` again and again, and the hooks run there. A publish or
                an ack from that thread then goes to the socket at once, and what the broker
                sends is handled without waking another thread (the edge's publisher: one
                thread for its frames and the network, fewer context switches per frame).
        """
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        logger.info(
            "mqtt %s: connecting to %s:%d%s",
            self.client_id,
            self.config.host,
            self.config.port,
            " (TLS)" if self.config.tls else "",
        )
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=self._clean_start,
            properties=props,
        )
        self._stopping = False
        if network_thread:
            self._client.loop_start()
            return
        self._own_loop = True
        self._client.read_ahead = True
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self._next_attempt = 0.0
        self._attempt_delay = self.config.reconnect_min_s

    def wakeup(self) -> None:
        """End the current (or the next) :meth:`run_network` wait at once; any thread, never
        blocks (``start(network_thread=False)`` only)."""
        if self._wake_w is None:
            return
        with contextlib.suppress(OSError):  # full (a wake-up is already pending), or closed
            self._wake_w.send(b"\0")

    def run_network(self, timeout: float) -> None:
        """One pass of the network loop in the calling thread (``start(network_thread=False)``):
        connect when due (first at once, then after ``reconnect_min_s`` doubling up to
        ``reconnect_max_s`` while attempts fail), wait up to ``timeout`` seconds for the socket
        or :meth:`wakeup`, read what came (hooks and handlers run here), write what is queued
        and keep the connection alive (PINGREQ; a broker silent for 1.5 keepalives is lost).

        Uses paho's external-loop API (``socket``, ``loop_read``, ``loop_write``,
        ``want_write``, ``loop_misc``). Never raises for a network failure: a failed attempt
        is logged like the threaded loop's (:meth:`on_connected` hooks run once connected).
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            now = time.monotonic()
            if self._stopping or now < self._next_attempt:
                self._wait_wakeup(timeout if self._stopping else min(timeout, self._next_attempt - now))
                return
            self._next_attempt = now + self._attempt_delay
            self._attempt_delay = min(2 * self._attempt_delay, self.config.reconnect_max_s)
            try:
                client.reconnect()  # blocking TCP (and TLS) connect, then CONNECT is sent
            except OSError:
                self._on_connect_fail(client, None)
                return
            sock = client.socket()
            if sock is None:
                return
        pending = getattr(sock, "pending", None)  # ssl.SSLSocket: bytes decrypted, not read
        if client.buffered_bytes() or (pending is not None and pending()):
            timeout = 0.0
        assert self._wake_r is not None
        try:
            readable, writable, _ = select.select(
                [sock, self._wake_r], [sock] if client.want_write() else [], [], timeout)
        except (OSError, ValueError, TypeError):  # the socket was closed meanwhile
            return
        if self._wake_r in readable:
            self._drain_wakeups()
        if sock in readable or client.buffered_bytes():
            client.loop_read()
            while client.buffered_bytes() and client.socket() is sock:  # whole packets read ahead
                client.loop_read()
        if client.want_write() and (sock in writable or sock in readable):
            client.loop_write()
        client.loop_misc()

    def _wait_wakeup(self, timeout: float) -> None:
        assert self._wake_r is not None
        try:
            readable, _, _ = select.select([self._wake_r], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return
        if readable:
            self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: nothing more
            pass

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread. With
        ``start(network_thread=False)``, call it once :meth:`run_network` is no longer running
        (or from its thread)."""
        self._stopping = True
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.debug("mqtt %s: disconnect failed", self.client_id, exc_info=True)
        if self._own_loop:
            if self._client.socket() is not None:  # DISCONNECT not written yet (socket busy)
                self._client.loop_write()
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None
        else:
            self._client.loop_stop()
        self._connected.clear()

    # -- hooks ---------------------------------------------------------------------------
    def on_connected(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(session_present)`` after every successful (re)connect."""
        self._connect_callbacks.append(callback)

    def on_disconnected(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the connection is lost."""
        self._disconnect_callbacks.append(callback)

    def on_published(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(mid)`` when the broker has accepted a QoS>0 publish (PUBACK with a
        success code; also called for QoS 0 publishes once written to the socket)."""
        self._publish_callbacks.append(callback)

    def on_publish_refused(self, callback: Callable[[int, str], None]) -> None:
        """Call ``callback(mid, reason)`` when the broker refuses a QoS>0 publish (PUBACK reason
        code >= 0x80, e.g. 135 "not authorized"): the message was NOT delivered, and paho will
        not send it again. ``reason`` is :func:`reason_sentence`. Runs on paho's network thread
        while paho holds its out-message lock: queue the work, never publish from it."""
        self._refused_callbacks.append(callback)

    @property
    def publishes_refused(self) -> int:
        """QoS>0 publishes the broker refused since this client was made."""
        with self._mids_lock:
            return self._refused_total

    def refused_topics(self) -> dict[str, int]:
        """Refused publishes per topic (a copy; topics of early refusals may be missing)."""
        with self._mids_lock:
            return dict(self._refused_by_topic)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        if self.is_connected:
            self._subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str, timeout_s: float = 2.0) -> bool:
        """UNSUBSCRIBE ``topic_filter`` (no longer renewed on a reconnect) and wait at most
        ``timeout_s`` seconds for the broker's UNSUBACK; True if it came. False at once when
        not connected (the subscription is forgotten all the same). Not from the network
        loop's own thread (a hook, or ``run_network``'s caller): it would wait for itself."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        rc, mid = self._client.unsubscribe(topic_filter)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        done = threading.Event()
        with self._mids_lock:
            if mid in self._early_unsubacks:
                self._early_unsubacks.discard(mid)
                done.set()
            else:
                self._unsubacks[mid] = done
        return done.wait(timeout_s)

    def _on_unsubscribe(self, client: object, userdata: object, mid: int, *_: object) -> None:
        with self._mids_lock:
            done = self._unsubacks.pop(mid, None)
            if done is None:
                self._early_unsubacks.add(mid)
        if done is not None:
            done.set()

    def _subscribe(self, topic_filter: str, qos: int) -> None:
        """Send a SUBSCRIBE and remember its mid, so a refusal can name the filter."""
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: renewed by the next connect
        with self._mids_lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._sub_filters[mid] = topic_filter
        if early is not None:
            self._log_suback(topic_filter, early)

    # -- traffic -------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish; paho queues it in memory while disconnected. Returns paho's info (``mid``).

        A QoS>0 publish ends in exactly one of the ``on_published`` (accepted) or
        ``on_publish_refused`` (refused, not delivered) hooks, unless the session is lost.
        """
        props = UserProperties(user_properties) if user_properties else None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos > 0:
            with self._mids_lock:
                early = self._early_refusals.pop(info.mid, None)
                if early is None:
                    self._pub_topics[info.mid] = topic
            if early is not None:
                self._log_refusal(topic, info.mid, *early)
        return info

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK of a message received with ``manual_ack=True``."""
        rc = self._client.ack(mid, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            logger.warning("mqtt %s: ack of mid %d not sent (%s)", self.client_id, mid, rc)

    # -- paho callbacks (never raise) ----------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self.last_connack_failure = str(reason_code)
                self._connack_refused = True
                self._connect_problem(
                    f"the broker refused the connection: {reason_sentence('CONNACK', reason_code)}",
                    logging.ERROR,
                )
                return
            self.last_connack_failure = None
            session_present = bool(getattr(flags, "session_present", False))
            if self.connect_failures:
                logger.info(
                    "mqtt %s: connected to %s:%d after %d failed attempts in %.0f s "
                    "(session present: %s)",
                    self.client_id,
                    self.config.host,
                    self.config.port,
                    self.connect_failures,
                    time.monotonic() - (self._failing_since or time.monotonic()),
                    session_present,
                )
            else:
                logger.info(
                    "mqtt %s: connected to %s:%d (session present: %s)",
                    self.client_id,
                    self.config.host,
                    self.config.port,
                    session_present,
                )
            self.connect_failures = 0
            self._attempt_delay = self.config.reconnect_min_s
            self.last_connect_error = None
            self._failing_since = None
            self._problem_logged = None
            with self._lock:
                subs = list(self._subscriptions.items())
            for topic_filter, (qos, _) in subs:
                self._subscribe(topic_filter, qos)
            self._connected.set()
            for callback in list(self._connect_callbacks):
                callback(session_present)
        except Exception:  # noqa: BLE001 - a callback must never break paho's loop
            logger.exception("mqtt %s: error in connect handling", self.client_id)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was = self._connected.is_set()
            self._connected.clear()
            if was:  # run_network: like paho's loop, wait reconnect_min_s before the next attempt
                self._next_attempt = max(self._next_attempt, time.monotonic() + self._attempt_delay)
            if not was and reason_code.is_failure and not self._connack_refused:
                self._connect_problem(
                    f"the connection closed before the broker accepted it ({reason_code}; "
                    "a TLS listener reached without TLS, or a broker that drops this client)",
                    logging.WARNING,
                )
            self._connack_refused = False
            if was and reason_code.is_failure:
                logger.warning("mqtt %s: connection lost: %s", self.client_id, reason_code)
            elif was:
                logger.info("mqtt %s: disconnected", self.client_id)
            for callback in list(self._disconnect_callbacks):
                callback()
        except Exception:  # noqa: BLE001
            logger.exception("mqtt %s: error in disconnect handling", self.client_id)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        try:
            if reason_code.is_failure:
                code = int(reason_code.value)
                reason = reason_sentence("PUBACK", reason_code)
                with self._mids_lock:
                    self._refused_total += 1
                    topic = self._pub_topics.pop(mid, None)
                    if topic is None:  # publish() has not recorded the mid yet: it logs
                        self._early_refusals[mid] = (code, reason)
                if topic is not None:
                    self._log_refusal(topic, mid, code, reason)
                for refused in list(self._refused_callbacks):
                    refused(mid, reason)
                return
            with self._mids_lock:
                self._pub_topics.pop(mid, None)
            for callback in list(self._publish_callbacks):
                callback(mid)
        except Exception:  # noqa: BLE001
            logger.exception("mqtt %s: error in publish handling (mid %s)", self.client_id, mid)

    def _log_refusal(self, topic: str, mid: int, code: int, reason: str) -> None:
        """ERROR the first time a topic is refused, then DEBUG with the count."""
        with self._mids_lock:
            count = self._refused_by_topic.get(topic, 0) + 1
            self._refused_by_topic[topic] = count
        if count == 1:
            logger.error(
                "mqtt %s: the broker %s:%d refused a publish on %s: %s; the message was not "
                "delivered. Hint: %s. Further refusals on this topic are logged at DEBUG.",
                self.client_id,
                self.config.host,
                self.config.port,
                topic,
                reason,
                publish_refused_hint(code, self.config.username, self.config.topic_prefix),
            )
        else:
            logger.debug(
                "mqtt %s: publish on %s refused again (mid %d, %d refusals on it): %s",
                self.client_id,
                topic,
                mid,
                count,
                reason,
            )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            with self._mids_lock:
                topic_filter = self._sub_filters.pop(mid, None)
                if topic_filter is None and any(rc.is_failure for rc in reason_codes):
                    self._early_subacks[mid] = list(reason_codes)
            if topic_filter is not None:
                self._log_suback(topic_filter, reason_codes)
        except Exception:  # noqa: BLE001
            logger.exception("mqtt %s: error in subscribe handling (mid %s)", self.client_id, mid)

    def _log_suback(self, topic_filter: str, reason_codes: Sequence[ReasonCode]) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                logger.error(
                    "mqtt %s: the broker %s:%d refused the subscription to %s: %s; nothing "
                    "arrives from it. Hint: check topic_prefix (%r) and the broker's ACL for "
                    "user %s.",
                    self.client_id,
                    self.config.host,
                    self.config.port,
                    topic_filter,
                    reason_sentence("SUBACK", rc),
                    self.config.topic_prefix,
                    self.config.username or "(anonymous)",
                )
            else:
                logger.debug("mqtt %s: subscribed to %s (%s)", self.client_id, topic_filter, rc)

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        """paho: a new connection's socket is open: no Nagle delay on our small packets."""
        try:
            if not set_tcp_nodelay(sock):
                logger.debug("mqtt %s: TCP_NODELAY not set (not a TCP socket)", self.client_id)
        except Exception:  # noqa: BLE001 - never break paho's loop
            logger.exception("mqtt %s: error in socket-open handling", self.client_id)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        """paho: a connection attempt failed at the socket (before any CONNACK)."""
        try:
            err = getattr(client, "last_connect_error", None)
            self._connect_problem(
                describe_socket_error(err) if err is not None else "connection failed",
                logging.WARNING,
            )
        except Exception:  # noqa: BLE001
            logger.exception("mqtt %s: error in connect-failure handling", self.client_id)

    def _connect_problem(self, problem: str, level: int) -> None:
        """Log a failed connection attempt: at once if it is the first or a new problem, then
        at most every CONNECT_LOG_EVERY_S seconds (DEBUG in between). Network thread only."""
        now = time.monotonic()
        self.connect_failures += 1
        self.last_connect_error = problem
        if self._failing_since is None:
            self._failing_since = now
        where = f"{self.config.host}:{self.config.port}{' (TLS)' if self.config.tls else ''}"
        if self._problem_logged is None:
            logger.log(
                level,
                "mqtt %s: cannot connect to %s: %s; retrying (every %g to %g s)",
                self.client_id,
                where,
                problem,
                self.config.reconnect_min_s,
                self.config.reconnect_max_s,
            )
        elif problem != self._problem_logged or now - self._problem_logged_at >= CONNECT_LOG_EVERY_S:
            logger.log(
                level,
                "mqtt %s: still cannot connect to %s after %d attempts in %.0f s: %s",
                self.client_id,
                where,
                self.connect_failures,
                now - self._failing_since,
                problem,
            )
        else:
            logger.debug(
                "mqtt %s: connection attempt %d to %s failed: %s",
                self.client_id,
                self.connect_failures,
                where,
                problem,
            )
            return
        self._problem_logged = problem
        self._problem_logged_at = now

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic_filter, (_, handler) in subs:
            if mqtt.topic_matches_sub(_filter_for_matching(topic_filter), message.topic):
                try:
                    handler(message)
                except Exception:  # noqa: BLE001 - never let a handler raise into paho
                    logger.exception(
                        "mqtt %s: handler for %s failed on a message from %s",
                        self.client_id,
                        topic_filter,
                        message.topic,
                    )
                return
        logger.debug("mqtt %s: no handler for %s", self.client_id, message.topic)
        if self._manual_ack and message.qos > 0:  # nobody will ack it: do not leave it in flight
            self.ack(message.mid, message.qos)
