"""What ``framecap ingest`` and ``framecap worker`` share.

:class:`CloudService` is the base of :class:`~cloud.ingest.IngestService` and
:class:`~cloud.worker.CaptionWorker`: the client_id, the counters, the MQTT client's connected
state, and S3 calls retried with backoff across an outage (logged once when it starts and once
when it ends). An S3 error that no retry heals (:attr:`common.storage.StorageError.permanent`:
credentials, access, a missing bucket) is not an outage: the service says why and stops
(:attr:`CloudService.failure`; the command exits 1). A missing bucket is created first when
``s3.create_bucket`` allows it. The rest is their command line: the options both take
(:func:`add_common_arguments`), logging, and running until SIGINT or SIGTERM.

Share-group consumers (:func:`share_group_client`) use clean MQTT sessions (``clean_start`` and
a session expiry of 0): on mosquitto a persistent member of ``$share/...`` that is away keeps
its round-robin turn, so a replica replaced under a new client_id (a container's new hostname)
would strand every N-th frame in the broker for the session's lifetime. Nothing needs the
session: the edge keeps each frame in its spool until the ingest's ack and resends it, and the
worker also lists ``frames/``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal, Protocol, TypeVar

import prometheus_client

from common.config import MqttConfig, S3Config
from common.mqtt import MessageHandler, MqttClient
from common.storage import BucketNotFoundError, ObjectStore, StorageError
from common.topics import Topics

logger = logging.getLogger(__name__)

T = TypeVar("T")


def default_client_id(role: str) -> str:
    """``framecap-{role}-{hostname}``. Replicas connected at the same time need different ids
    (the broker drops the older connection of an id): set ``mqtt.client_id`` (or
    ``--client-id``) per replica when several run on one host. The id need not survive a
    restart: share-group consumers use clean sessions (module docstring)."""
    return f"framecap-{role}-{socket.gethostname()}"[:64]


def open_store(config: S3Config, role: str = "service") -> ObjectStore:
    """The bucket of ``config``, probed (:meth:`ObjectStore.probe`); calls fail fast (3 attempts,
    3 s connect) so outages show.

    Creates the bucket when it is missing and ``config.create_bucket``. If S3 does not answer
    yet, says so and goes on (every later call retries).

    Raises:
        StorageError: a permanent error (credentials, access, a missing bucket not created);
            its ``hint`` says where to look.
    """
    store = ObjectStore(config, connect_timeout_s=3.0, read_timeout_s=15.0, max_attempts=3)
    try:
        if store.probe(create_bucket=config.create_bucket):
            logger.warning("%s: bucket %s was missing; created it (s3.create_bucket)", role,
                           config.bucket)
    except StorageError as err:
        if err.permanent:
            raise
        logger.warning("%s: S3 does not answer at start (%s); every S3 call is retried until it "
                       "does", role, err)
    return store


def failure_message(err: StorageError) -> str:
    """A permanent S3 error in one line: what failed, and where to look."""
    return f"{err} ({err.hint})" if err.hint else str(err)


class ShareGroupClient(MqttClient):
    """An :class:`MqttClient` for a ``$share/...`` consumer: a clean session (``clean_start``,
    session expiry 0, whatever ``config.session_expiry_s`` says; see the module docstring), and
    :meth:`leave` to stop getting messages before disconnecting.

    Args:
        config: the broker settings.
        client_id: MQTT client_id (unique among the replicas connected at one time).
        manual_ack: as :class:`MqttClient`.
    """

    def __init__(self, config: MqttConfig, client_id: str, *, manual_ack: bool = False) -> None:
        super().__init__(config.model_copy(update={"session_expiry_s": 0}), client_id,
                         manual_ack=manual_ack, clean_start=True)

    def share(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Subscribe to ``topic_filter`` now and after every reconnect (what :meth:`subscribe`
        does; named for the share group it joins)."""
        self.subscribe(topic_filter, handler, qos)

    def leave(self, topic_filter: str, timeout_s: float = 2.0) -> bool:
        """UNSUBSCRIBE ``topic_filter`` (not renewed on a reconnect) and wait at most
        ``timeout_s`` seconds for the broker's UNSUBACK. From then on the broker sends the
        group's messages to the other members; the messages it had already sent here can still
        be acknowledged. Returns True if the UNSUBACK came (see :meth:`MqttClient.unsubscribe`)."""
        return self.unsubscribe(topic_filter, timeout_s)


def retry_delays(first_s: float = 0.5, max_s: float = 10.0) -> Iterator[float]:
    """Endless backoff delays in seconds: ``first_s``, doubling, capped at ``max_s``."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


class Stopping(Exception):
    """The service was asked to stop while it was waiting for S3."""


class CloudService:
    """Counters, connected state and S3 retries of a cloud service.

    Args:
        role: ``ingest`` or ``worker``: the start of every log line and of the default client_id.
        mqtt: the broker settings (their ``client_id`` and ``topic_prefix`` are used here).
        store: the object store (tests pass a fake); the subclass opens one at start when None.
        client_id: MQTT client_id; default ``mqtt.client_id``, else :func:`default_client_id`.
        s3_errors: the Prometheus counter of failed S3 calls.
        create_bucket: create the bucket when S3 says it is missing (``s3.create_bucket``).

    Attributes:
        failure: the permanent S3 error that stopped the service, else None.
    """

    def __init__(
        self,
        role: str,
        mqtt: MqttConfig,
        *,
        store: ObjectStore | None,
        client_id: str | None,
        s3_errors: prometheus_client.Counter,
        create_bucket: bool = False,
    ) -> None:
        self.role = role
        self.create_bucket = create_bucket
        self.failure: StorageError | None = None
        self._failure_callbacks: list[Callable[[StorageError], None]] = []
        self.topics = Topics(mqtt.topic_prefix)
        self.client_id = client_id or mqtt.client_id or default_client_id(role)
        self._store = store
        self._client: MqttClient | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._s3_down_since: float | None = None
        self._s3_errors = s3_errors

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected to the broker (within ``timeout`` seconds)."""
        return self._client is not None and self._client.wait_connected(timeout)

    def _disconnect(self) -> None:
        """Stop the MQTT client, if there is one, and log the final counters."""
        if self._client is not None:
            self._client.stop()
        logger.info("%s %s: stopped; %s", self.role, self.client_id, self.counters)

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (see the subclass's docstring)."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _require_store(self) -> ObjectStore:
        if self._store is None:
            raise RuntimeError("start() opens the store")
        return self._store

    def on_failure(self, callback: Callable[[StorageError], None]) -> None:
        """Call ``callback(error)`` (on the failing thread) when a permanent S3 error stops the
        service."""
        self._failure_callbacks.append(callback)

    def _s3(self, call: Callable[[ObjectStore], T], doing: str) -> T:
        """``call(store)``, retried with backoff while S3 fails (``doing`` says what, for the log).

        A missing bucket is created when allowed, then the call is retried; any other permanent
        error stops the service (:meth:`_s3_permanent`).

        Raises:
            Stopping: :meth:`stop` was called before S3 answered, or a permanent error stopped
                the service.
        """
        store = self._require_store()
        for delay in retry_delays():
            try:
                result = call(store)
            except StorageError as err:
                verdict = self._s3_permanent(doing, err)
                if verdict == "failed":
                    raise Stopping from err
                if verdict == "outage":
                    self._s3_failed(doing, err)
                if self._stop.wait(delay):
                    raise Stopping from err
                continue
            self._s3_back()
            return result
        raise AssertionError("retry_delays() never ends")  # pragma: no cover

    def _s3_permanent(self, doing: str, err: StorageError) -> Literal["outage", "created", "failed"]:
        """Sort a failed S3 call: ``outage`` (retry it, and log it as one), ``created`` (the
        bucket was missing and ``create_bucket`` allowed creating it: retry the call), or
        ``failed``: an error no retry heals. The service then fails: logged at ERROR with the
        cause and a hint, :attr:`failure` set, the failure hooks called, :meth:`stop`'s event
        set.
        """
        if isinstance(err, BucketNotFoundError) and self.create_bucket:
            try:
                created = self._require_store().ensure_bucket()
            except StorageError as create_err:
                if not create_err.permanent:
                    return "outage"  # S3 went away meanwhile
                err = create_err
            else:
                logger.warning("%s: bucket %s was missing while %s; %s", self.role, err.bucket,
                               doing, "created it" if created else "it exists again")
                return "created"
        if not err.permanent:
            return "outage"
        self._count("s3_errors")
        self._s3_errors.inc()
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = err
        if first:
            logger.error("%s: S3 refuses %s, and asking again will not help: %s; stopping",
                         self.role, doing, failure_message(err))
            self._stop.set()
            for callback in list(self._failure_callbacks):
                callback(err)
        return "failed"

    def _s3_failed(self, doing: str, err: Exception) -> None:
        """Count a failed S3 call; log the first of an outage as an error, the rest as debug."""
        self._count("s3_errors")
        self._s3_errors.inc()
        if self._s3_down_since is None:
            self._s3_down_since = time.monotonic()
            logger.error("%s: S3 unavailable while %s: %s; retrying", self.role, doing, err)
        else:
            logger.debug("%s: S3 still unavailable: %s", self.role, err)

    def _s3_back(self) -> None:
        """After a successful S3 call: log the end of an outage, if there was one."""
        if self._s3_down_since is not None:
            logger.warning(
                "%s: S3 is back after %.1f s", self.role, time.monotonic() - self._s3_down_since
            )
            self._s3_down_since = None


# -- command line ------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``framecap ingest`` and ``framecap worker``: each overrides a key of
    the config file; its help says the default and the environment variable behind it."""
    parser.add_argument("--config", metavar="YAML",
                        help="YAML config file (default: none; the defaults and $FRAMECAP_* variables)")
    parser.add_argument("--validate-config", action="store_true",
                        help="check the config and the files it names (TLS, model), then exit")
    parser.add_argument("--mqtt-host", metavar="HOST",
                        help="override mqtt.host (default: $FRAMECAP_MQTT_HOST, else 127.0.0.1)")
    parser.add_argument("--mqtt-port", type=int, metavar="PORT",
                        help="override mqtt.port (default: $FRAMECAP_MQTT_PORT, else 1883)")
    parser.add_argument("--mqtt-username", metavar="USER",
                        help="override mqtt.username (default: $FRAMECAP_MQTT_USERNAME; the password "
                             "comes from $FRAMECAP_MQTT_PASSWORD)")
    parser.add_argument("--client-id", metavar="ID",
                        help="override mqtt.client_id (default: framecap-ROLE-HOSTNAME; replicas on "
                             "one host need different ids)")
    parser.add_argument("--topic-prefix", metavar="PREFIX",
                        help="override mqtt.topic_prefix (default: framecap)")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="override s3.endpoint_url (default: $FRAMECAP_S3_ENDPOINT_URL; AWS when "
                             "empty; keys from $FRAMECAP_S3_ACCESS_KEY_ID and "
                             "$FRAMECAP_S3_SECRET_ACCESS_KEY)")
    parser.add_argument("--bucket", help="override s3.bucket (default: $FRAMECAP_S3_BUCKET, else framecap)")
    parser.add_argument("--share-group", metavar="GROUP",
                        help="override share_group, the MQTT shared subscription replicas split "
                             "(default: the command's name, ingest or worker)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="override metrics_port: serve Prometheus /metrics on this port "
                             "(default: none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: INFO)")


def start_metrics(port: int | None) -> str | None:
    """Serve Prometheus ``/metrics`` on ``port`` (nothing when None); returns why it cannot (the
    port is taken, or not ours to bind) for the command to print and exit 2, else None."""
    if port is None:
        return None
    from cloud import metrics

    try:
        metrics.serve(port)
    except OSError as err:
        return (f"--metrics-port {port}: cannot listen on it: {err.strerror or err} "
                "(another process has it? pick another port)")
    return None


def common_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Dotted config keys from the options of :func:`add_common_arguments`."""
    return {
        "mqtt.host": args.mqtt_host,
        "mqtt.port": args.mqtt_port,
        "mqtt.username": args.mqtt_username,
        "mqtt.client_id": args.client_id,
        "mqtt.topic_prefix": args.topic_prefix,
        "s3.endpoint_url": args.s3_endpoint,
        "s3.bucket": args.bucket,
        "share_group": args.share_group,
        "metrics_port": args.metrics_port,
    }


def setup_logging(verbose: bool) -> None:
    """Log to stderr with timestamps; DEBUG when ``verbose``, else INFO with boto quiet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class Service(Protocol):
    """What :func:`run_until_signal` runs: IngestService, CaptionWorker."""

    failure: StorageError | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def on_failure(self, callback: Callable[[StorageError], None]) -> None: ...


def run_until_signal(service: Service, name: str) -> int:
    """Run ``service`` until SIGINT or SIGTERM (exit status 0), or until a permanent S3 error
    stops it (1; also when it cannot start: the cause and a hint on stderr)."""
    import signal

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    service.on_failure(lambda _err: done.set())
    try:
        service.start()
    except StorageError as err:
        print(f"framecap {name}: cannot start: {failure_message(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"framecap {name}: cannot start: {err}", file=sys.stderr)
        return 1
    done.wait()
    service.stop()
    if service.failure is not None:
        print(f"framecap {name}: stopped: {failure_message(service.failure)}", file=sys.stderr)
        return 1
    return 0
