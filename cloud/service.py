"""What ``framecap ingest`` and ``framecap worker`` share.

:class:`CloudService` is the base of :class:`~cloud.ingest.IngestService` and
:class:`~cloud.worker.CaptionWorker`: the client_id, the counters, the MQTT client's connected
state and S3 calls retried with backoff across an outage (logged once when it starts and once
when it ends). The rest is their command line: the options both take
(:func:`add_common_arguments`), logging, and running until SIGINT or SIGTERM.
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
from typing import Protocol, TypeVar

import prometheus_client

from common.config import MqttConfig, S3Config
from common.mqtt import MqttClient
from common.storage import ObjectStore, StorageError
from common.topics import Topics

logger = logging.getLogger(__name__)

T = TypeVar("T")


def default_client_id(role: str) -> str:
    """``framecap-{role}-{hostname}``: stable across restarts, so the persistent session (and
    the frames the broker holds for it) is found again. Set ``mqtt.client_id`` (or
    ``--client-id``) per replica when several run on one host."""
    return f"framecap-{role}-{socket.gethostname()}"[:64]


def open_store(config: S3Config) -> ObjectStore:
    """The bucket of ``config``; calls fail fast (3 attempts, 3 s connect) so outages show.

    Creates the bucket when ``config.create_bucket``; if S3 does not answer yet, says so and
    goes on (every later call retries).
    """
    store = ObjectStore(config, connect_timeout_s=3.0, read_timeout_s=15.0, max_attempts=3)
    if config.create_bucket:
        try:
            store.ensure_bucket()
        except StorageError as err:
            logger.warning("bucket %s not checked at start: %s", config.bucket, err)
    return store


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
    """

    def __init__(
        self,
        role: str,
        mqtt: MqttConfig,
        *,
        store: ObjectStore | None,
        client_id: str | None,
        s3_errors: prometheus_client.Counter,
    ) -> None:
        self.role = role
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

    def _s3(self, call: Callable[[ObjectStore], T], doing: str) -> T:
        """``call(store)``, retried with backoff while S3 fails (``doing`` says what, for the log).

        Raises:
            Stopping: :meth:`stop` was called before S3 answered.
        """
        store = self._require_store()
        for delay in retry_delays():
            try:
                result = call(store)
            except StorageError as err:
                self._s3_failed(doing, err)
                if self._stop.wait(delay):
                    raise Stopping from err
                continue
            self._s3_back()
            return result
        raise AssertionError("retry_delays() never ends")  # pragma: no cover

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
    """Options shared by ``framecap ingest`` and ``framecap worker``."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--validate-config", action="store_true", help="check the config and exit")
    parser.add_argument("--mqtt-host", help="override mqtt.host")
    parser.add_argument("--mqtt-port", type=int, help="override mqtt.port")
    parser.add_argument("--mqtt-username", help="override mqtt.username")
    parser.add_argument("--client-id", help="override mqtt.client_id")
    parser.add_argument("--topic-prefix", help="override mqtt.topic_prefix")
    parser.add_argument("--s3-endpoint", help="override s3.endpoint_url")
    parser.add_argument("--bucket", help="override s3.bucket")
    parser.add_argument("--share-group", help="override share_group")
    parser.add_argument("--metrics-port", type=int, help="override metrics_port")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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
    """Anything with start() and stop(): IngestService, CaptionWorker."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def run_until_signal(service: Service, name: str) -> int:
    """Run ``service`` (has start/stop) until SIGINT or SIGTERM; returns the exit status."""
    import signal

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        service.start()
    except (StorageError, OSError) as err:
        print(f"framecap {name}: cannot start: {err}", file=sys.stderr)
        return 1
    done.wait()
    service.stop()
    return 0
