"""Fixtures shared by every test: the real local stack (mosquitto + SeaweedFS) and ../shared.

- ``local_stack`` (session): one :class:`common.stack.LocalStack` on free ports in a temporary
  state directory, started once (about 4 s) and stopped at the end. Every test that uses it,
  directly or through another fixture, is marked ``integration``.
- ``stack_ns`` (function): a :class:`StackNamespace` of the session's stack for one test: its
  own topic prefix, its own bucket, unique device accounts and client ids, so tests never hear
  or see each other's messages and objects.
- ``shared_dir`` (session): ``../shared`` (data, videos); the test is skipped if it is absent.
- ``wait_until`` : ``wait_until(predicate, timeout_s=10.0, interval_s=0.05) -> bool``.

Without mosquitto or weed the integration tests are skipped, unless ``FRAMECAP_REQUIRE_STACK=1``
(``make test`` sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.config import MqttConfig, S3Config
from common.stack import LocalStack, StackError, find_mosquitto, find_weed
from common.topics import Topics

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_DIR.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs the real servers (through ``local_stack``) ``integration``."""
    for item in items:
        if "local_stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it returns something true or ``timeout_s`` passes; returns
    whether it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


@pytest.fixture
def wait_until() -> Callable[..., bool]:
    """:func:`wait_for` as a fixture: ``wait_until(predicate, timeout_s=10.0) -> bool``."""
    return wait_for


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository (DESIGN.md data and videos); skips if absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (data and videos live there)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The session's mosquitto + SeaweedFS on 127.0.0.1, free ports, a temporary state dir.

    Accounts ``admin``, ``ingest``, ``worker`` exist; add devices with ``add_device`` (or use
    ``stack_ns.device``). The ACL accepts any one-level topic prefix. A TLS listener runs too:
    ``mqtt_config(user, tls=True)`` gives a config with the generated CA (``stack.ca_file``). Stopped with SIGTERM and
    a 2 s grace (then SIGKILL): its data is thrown away.
    """
    try:
        find_mosquitto()
        find_weed()
    except StackError as err:
        if os.environ.get("FRAMECAP_REQUIRE_STACK") == "1":
            pytest.fail(f"local stack required (FRAMECAP_REQUIRE_STACK=1) but {err}")
        pytest.skip(f"local stack unavailable: {err}")
    stack = LocalStack(tmp_path_factory.mktemp("stack"), tls=True)
    try:
        stack.up(timeout_s=90.0)
    except StackError as err:
        stack.down(timeout_s=2.0)
        pytest.fail(f"local stack did not start: {err}")
    logger.info("local stack up in %.1f s", stack.timings.get("up_s", -1))
    # A SIGTERM (``timeout``, CI cancelling) would end Python without teardown and leave both
    # servers running (they are in a session of their own); turn it into KeyboardInterrupt.
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield stack
    finally:
        stack.down(timeout_s=2.0)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def unique(name: str) -> str:
    """``name`` with a random suffix: ``cam-1a2b3c4d``."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class StackNamespace:
    """One test's share of the session's stack: own topic prefix, bucket, devices, client ids."""

    stack: LocalStack
    prefix: str
    bucket: str
    devices: list[str] = field(default_factory=list)
    _bucket_ready: bool = False

    def ensure_bucket(self) -> str:
        """Create this test's bucket (once; about 0.2-0.4 s) and return its name."""
        if not self._bucket_ready:
            self.stack.storage(self.bucket).ensure_bucket()
            self._bucket_ready = True
        return self.bucket

    @property
    def topics(self) -> Topics:
        """Topic builder under this test's prefix."""
        return Topics(self.prefix)

    def device(self, name: str = "cam") -> str:
        """Create a device account with a unique id (``name-xxxxxxxx``) and return the id."""
        device_id = unique(name)
        self.stack.add_device(device_id)
        self.devices.append(device_id)
        return device_id

    def client_id(self, role: str) -> str:
        """A client_id nobody else uses (persistent sessions stay per test)."""
        return unique(f"{role}-{self.prefix}")

    def mqtt_config(self, user: str = "admin", **fields: Any) -> MqttConfig:
        """MqttConfig for ``user`` under this test's prefix (other fields pass through)."""
        return self.stack.mqtt_config(user, topic_prefix=self.prefix, **fields)

    def s3_config(self, **fields: Any) -> S3Config:
        """S3Config for this test's bucket (created on first use)."""
        return self.stack.s3_config(self.ensure_bucket(), **fields)

    def storage(self, **client_options: Any) -> Any:
        """An ObjectStore on this test's bucket (created on first use)."""
        return self.stack.storage(self.ensure_bucket(), **client_options)


@pytest.fixture
def stack_ns(local_stack: LocalStack) -> StackNamespace:
    """A fresh :class:`StackNamespace`: prefix ``t<hex>``, its own bucket ``t-<hex>`` (created
    on first use of ``s3_config``/``storage``/``ensure_bucket``).

    Restarts a server that an earlier (fault) test left stopped.
    """
    if not local_stack.mosquitto.running():
        logger.warning("mosquitto was left stopped by an earlier test; starting it")
        local_stack.start_mosquitto()
    if not local_stack.seaweedfs.running():
        logger.warning("SeaweedFS was left stopped by an earlier test; starting it")
        local_stack.start_seaweedfs()
    token = uuid.uuid4().hex[:10]
    return StackNamespace(stack=local_stack, prefix=f"t{token}", bucket=f"t-{token}")
