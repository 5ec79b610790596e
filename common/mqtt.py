"""One MQTT client wrapper for every framecap process (paho-mqtt 2.x, MQTT v5).

What it adds to paho (after frigate's ``frigate/comms/mqtt.py``, doing better where STYLE.md
asks): callback API VERSION2; a last will; ``connect_async`` + ``loop_start`` with reconnect
backoff; subscriptions remembered and renewed on every (re)connect; a failed CONNACK is logged
and nothing else happens on it; a handler that raises is logged and never reaches paho's loop.

Spec: MQTT Version 5.0, OASIS Standard (2019): user properties (3.3.2.3.7), shared
subscriptions (4.8.2), session expiry (3.1.2.11.2).

Handlers run on paho's network thread: they must return quickly. Long work (an S3 put, a model
batch) goes to a queue and another thread, which acks later with :meth:`MqttClient.ack` when
the client was made with ``manual_ack=True``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.config import MqttConfig

logger = logging.getLogger(__name__)

MessageHandler = Callable[[mqtt.MQTTMessage], None]


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
        self._subscriptions: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connect_callbacks: list[Callable[[bool], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._publish_callbacks: list[Callable[[int], None]] = []
        self.last_connack_failure: str | None = None

        client = mqtt.Client(
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
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and keep reconnecting; returns at once."""
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
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.debug("mqtt %s: disconnect failed", self.client_id, exc_info=True)
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
        """Call ``callback(mid)`` when the broker has acknowledged a QoS>0 publish."""
        self._publish_callbacks.append(callback)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        if self.is_connected:
            self._client.subscribe(topic_filter, qos)

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
        """Publish; paho queues it in memory while disconnected. Returns paho's info (``mid``)."""
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

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
                logger.error(
                    "mqtt %s: broker %s:%d refused the connection: %s",
                    self.client_id,
                    self.config.host,
                    self.config.port,
                    reason_code,
                )
                return
            self.last_connack_failure = None
            session_present = bool(getattr(flags, "session_present", False))
            logger.info(
                "mqtt %s: connected to %s:%d (session present: %s)",
                self.client_id,
                self.config.host,
                self.config.port,
                session_present,
            )
            with self._lock:
                subs = list(self._subscriptions.items())
            for topic_filter, (qos, _) in subs:
                client.subscribe(topic_filter, qos)
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
            for callback in list(self._publish_callbacks):
                callback(mid)
        except Exception:  # noqa: BLE001
            logger.exception("mqtt %s: error in publish handling (mid %s)", self.client_id, mid)

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
