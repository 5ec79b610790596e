"""Wait for the broker's SUBACKs to framecap's MQTT clients, instead of sleeping after CONNACK.

``common.mqtt.MqttClient`` sends its SUBSCRIBEs right after the CONNACK, so ``wait_connected``
returns before the broker has the subscriptions, and a message published then can be routed
to nobody. The client logs each SUBACK: a granted filter at DEBUG ("mqtt CLIENT_ID: subscribed
to FILTER (...)"), a refused one at ERROR ("... refused the subscription to FILTER: ...").
:class:`SubackWatch` reads those lines (raising ``common.mqtt``'s level to DEBUG only while it
is open) so a test waits for the event itself::

    with SubackWatch() as subacks:
        service.start()
        subacks.wait_for(service)  # every filter the service subscribed to is granted
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from common.mqtt import MqttClient

_GRANTED = re.compile(r"^mqtt (\S+): subscribed to (\S+) \(")
_REFUSED = re.compile(r"^mqtt (\S+): the broker \S+ refused the subscription to (\S+):")
_LOGGER = "common.mqtt"


class SubackWatch(logging.Handler):
    """Records the SUBACKs ``common.mqtt`` logs, per client id, while open (a context manager)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.granted: dict[str, set[str]] = {}
        self.refused: dict[str, set[str]] = {}
        self._changed = threading.Condition()
        self._level: int | None = None

    def __enter__(self) -> SubackWatch:
        logger = logging.getLogger(_LOGGER)
        self._level = logger.level
        if not logger.isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(_LOGGER)
        logger.removeHandler(self)
        if self._level is not None:
            logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record is not ours to report
            return
        for pattern, found in ((_GRANTED, self.granted), (_REFUSED, self.refused)):
            match = pattern.match(message)
            if match:
                with self._changed:
                    found.setdefault(match.group(1), set()).add(match.group(2))
                    self._changed.notify_all()

    def wait(self, client_id: str, filters: Iterable[str], timeout_s: float = 10.0) -> None:
        """Wait until the broker granted every filter of ``filters`` to ``client_id``.

        Raises:
            AssertionError: a filter was refused, or not granted within ``timeout_s`` seconds.
        """
        wanted = set(filters)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                refused = wanted & self.refused.get(client_id, set())
                assert not refused, f"the broker refused {client_id} the subscriptions {sorted(refused)}"
                missing = wanted - self.granted.get(client_id, set())
                if not missing:
                    return
                left = deadline - time.monotonic()
                assert left > 0, f"no SUBACK for {client_id}'s {sorted(missing)} within {timeout_s:g} s"
                self._changed.wait(left)

    def wait_for(self, owner: Any, timeout_s: float = 10.0) -> None:
        """``wait`` for every filter an ``MqttClient``, or a service holding one as ``_client``
        (IngestService, CaptionWorker), has subscribed to."""
        client = owner if isinstance(owner, MqttClient) else getattr(owner, "_client", None)
        assert isinstance(client, MqttClient), f"{owner!r} has no MQTT client"
        with client._lock:
            filters = list(client._subscriptions)
        assert filters, f"{client.client_id} has no subscriptions to wait for"
        self.wait(client.client_id, filters, timeout_s)
