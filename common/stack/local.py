""":class:`LocalStack`: mosquitto + SeaweedFS on 127.0.0.1, brought up and down as one."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.stack.mosquitto import MosquittoControl, find_mosquitto
from common.stack.process import GRPC_OFFSET, StackError, pick_port, port_is_free
from common.stack.seaweedfs import SeaweedControl, find_weed
from common.stack.state import DEFAULT_BUCKET, DEFAULT_STATE_DIR

logger = logging.getLogger(__name__)


class StackAlreadyRunning(StackError):
    """:meth:`LocalStack.up` found both servers of its state directory running."""


PORT_RELEASE_S = 5.0
"""How long :meth:`LocalStack.up` waits for an earlier port to be released before it picks another
(the sockets of a server killed a moment ago are torn down by the kernel after its PID is gone)."""


def _freed(*ports: int, grace_s: float = PORT_RELEASE_S) -> bool:
    """True once every port in ``ports`` is free, waiting up to ``grace_s`` for it."""
    deadline = time.monotonic() + grace_s
    while not all(port_is_free(p) for p in ports):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class LocalStack(MosquittoControl, SeaweedControl):
    """mosquitto + SeaweedFS on 127.0.0.1 for tests, the demo and a laptop.

    Args:
        state_dir: where configs, data, logs, secrets and ``stack.json`` live (created).
        mqtt_port: MQTT listener port; a free one when None.
        s3_port: S3 gateway port; a free one (with port + 10000 free for gRPC) when None.
        bucket: the bucket created at :meth:`up`.
        devices: device accounts to create at :meth:`up` (more with :meth:`add_device`).
        tls: also open a TLS listener (CA and server certificate generated with openssl).
        acl_prefix: the topic prefix the ACL grants; ``"+"`` (default) grants any one-level prefix.

    Use as a context manager (``with LocalStack(dir) as stack:``) or call :meth:`up` and
    :meth:`down`. :meth:`load` attaches to a stack that ``framecap stack up`` started.
    """

    def _choose_ports(self, keep: Iterable[str] = ()) -> None:
        """Fill :attr:`ports`: earlier ports when free, else free ones; the ports in ``keep``
        (those of a server that runs) are kept as they are."""
        taken: list[int] = [p for n, p in self.ports.items() if n in keep and p is not None]
        if not self.tls:
            self.ports["mqtt_tls"] = None
        for name in ("mqtt", "mqtt_tls"):
            if name in keep or (name == "mqtt_tls" and not self.tls):
                continue
            port = self.ports.get(name)
            if port is None or not _freed(port):
                if port is not None and name == "mqtt" and self._explicit_mqtt:
                    raise StackError(f"MQTT port {port} is in use")
                port = pick_port(taken=taken)
            self.ports[name] = port
            taken.append(port)
        for name in ("s3", "master", "volume", "filer"):
            if name in keep:
                continue
            port = self.ports.get(name)
            if port is None or not _freed(port, port + GRPC_OFFSET):
                if port is not None and name == "s3" and self._explicit_s3:
                    raise StackError(f"S3 port {port} or its gRPC port {port + GRPC_OFFSET} is in use")
                port = pick_port(grpc_too=True, taken=taken)
            self.ports[name] = port
            taken += [port, port + GRPC_OFFSET]

    def _adopt(self, previous: dict[str, Any]) -> list[str]:
        """Take over what an earlier ``up`` in this state directory left: the PIDs of its servers
        (or of a server found on our config/data under another PID), and, when one of them
        still runs, its ports, bucket, TLS and ACL settings. Returns the names of the servers
        that run."""
        for svc in (self.mosquitto, self.seaweedfs):
            svc.pid = previous.get(svc.name, {}).get("pid")
            svc.stopped = previous.get(svc.name, {}).get("state") == "stopped"
            if not svc.running():
                others = svc.others()
                if len(others) > 1:
                    raise StackError(f"{len(others)} {svc.name} servers (pids {others}) run on "
                                     f"{svc.needle}; stop them before 'framecap stack up'")
                if others:
                    logger.warning("%s runs on %s as pid %d, not the pid %s in %s: adopting it",
                                   svc.name, svc.needle, others[0], svc.pid, self.state_file)
                    svc.pid = others[0]
        alive = [svc.name for svc in (self.mosquitto, self.seaweedfs) if svc.running()]
        for name, port in previous.get("ports", {}).items():
            if alive or self.ports.get(name) is None:
                self.ports[name] = port
        if alive:  # a running server keeps the settings it was started with
            self.bucket = previous.get("bucket", self.bucket)
            self.tls = bool(previous.get("tls", self.tls))
            self.acl_prefix = previous.get("acl_prefix", self.acl_prefix)
            self._explicit_mqtt = self._explicit_s3 = True  # a dead server comes back on its ports
        self.devices += [d for d in previous.get("devices", []) if d not in self.devices]
        self.buckets = sorted(set(self.buckets) | set(previous.get("buckets", [])) | {self.bucket})
        return alive

    def up(self, timeout_s: float = 90.0) -> LocalStack:
        """Start mosquitto and SeaweedFS, create the bucket, write ``stack.json``; returns self.

        Reuses the secrets, data and (when free) ports of an earlier run in the same state dir.
        Heals a partly dead stack: when one server still runs (the other was killed or crashed),
        it is kept and only the dead one is started again, on its own ports and data; a server
        found running on this stack's config or data directory is adopted, never doubled.
        :attr:`healed` names what was restarted.

        Raises:
            StackAlreadyRunning: both servers already run here (a StackError).
            StackError: a binary is missing, a port is taken, or
                a server did not come up (whatever this call started is stopped again).
        """
        find_mosquitto(), find_weed()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with self._locked():
            previous = self._read_state()
            alive = self._adopt(previous) if previous else []
            if len(alive) == 2:
                self._save_state()  # with the PIDs found running
                raise StackAlreadyRunning(f"a stack already runs in {self.state_dir}; "
                                          "'framecap stack down' first")
            self.healed = [svc.name for svc in (self.mosquitto, self.seaweedfs)
                           if alive and svc.name not in alive]
            for name in self.healed:
                logger.warning("%s is dead (pid %s gone): restarting it; %s keeps running", name,
                               getattr(self, name).pid, " and ".join(alive))
            keep = {"mosquitto": ("mqtt", "mqtt_tls"), "seaweedfs": ("s3", "master", "volume", "filer")}
            devices_before = set(self.accounts())
            self._ensure_secrets()
            self.mosquitto_dir.mkdir(parents=True, exist_ok=True)
            if self.tls:
                self._make_tls_files()
            self._choose_ports([port for name in alive for port in keep[name]])
            started: list[str] = []
            try:
                if "mosquitto" in alive:
                    for user, account in self.accounts().items():
                        if user not in devices_before:
                            self._add_live_account(user, account)
                else:
                    started.append("mosquitto")
                    self.start_mosquitto()
                if "seaweedfs" not in alive:
                    started.append("seaweedfs")
                    self.start_seaweedfs(timeout_s)
            except BaseException:
                for name in started:
                    getattr(self, name).stop(signal.SIGKILL, 3.0)
                self._remove_sockets()
                self._save_state()
                raise
            self._save_state()
        self.timings["up_s"] = round(time.monotonic() - t0, 3)
        logger.info("local stack up in %.1f s: mqtt://%s:%s, %s, bucket %s", self.timings["up_s"],
                    self.host, self.mqtt_port, self.s3_endpoint, self.bucket)
        return self

    def down(self, timeout_s: float = 30.0) -> float:
        """Stop both servers (SIGTERM to both at once; SIGKILL what still runs after
        ``timeout_s``), remove SeaweedFS's leftover sockets. A server found running on this
        stack's config or data under another PID than stack.json's is stopped too. Returns the
        seconds it took."""
        t0 = time.monotonic()
        for svc in (self.mosquitto, self.seaweedfs):
            others = [] if svc.running() else svc.others()
            if others:  # stack.json had a stale PID: stop the server that runs on our files
                logger.warning("%s runs on %s as pid %d, not the pid %s in stack.json: stopping it",
                               svc.name, svc.needle, others[0], svc.pid)
                svc.pid, svc.proc = others[0], None
        self.mosquitto.signal(signal.SIGTERM)
        self.seaweedfs.signal(signal.SIGTERM)
        self.mosquitto.stop(signal.SIGTERM, timeout_s)
        self.seaweedfs.stop(signal.SIGTERM, max(0.0, timeout_s - (time.monotonic() - t0)))
        self._remove_sockets()
        self._save_state()
        took = time.monotonic() - t0
        self.timings["down_s"] = round(took, 3)
        return took

    def __enter__(self) -> LocalStack:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down(timeout_s=3.0)

    @classmethod
    def load(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> LocalStack:
        """Attach to the stack described by ``state_dir/stack.json`` (running or not).

        Raises:
            StackError: there is no stack.json there.
        """
        stack = cls(state_dir)
        state = stack._read_state()
        if state is None:
            raise StackError(f"no local stack in {stack.state_dir} (no stack.json); run 'framecap stack up'")
        stack.bucket = state.get("bucket", DEFAULT_BUCKET)
        stack.tls = bool(state.get("tls"))
        stack.acl_prefix = state.get("acl_prefix", "+")
        stack.devices = list(state.get("devices", []))
        stack.buckets = sorted(set(state.get("buckets", [])) | {stack.bucket})
        stack.ports.update(state.get("ports", {}))
        stack.timings = dict(state.get("timings", {}))
        for svc in (stack.mosquitto, stack.seaweedfs):
            svc.pid = state.get(svc.name, {}).get("pid")
            svc.stopped = state.get(svc.name, {}).get("state") == "stopped"
        return stack
