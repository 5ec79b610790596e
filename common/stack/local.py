""":class:`LocalStack`: mosquitto + SeaweedFS on 127.0.0.1, brought up and down as one."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from common.stack.mosquitto import MosquittoControl, find_mosquitto
from common.stack.process import GRPC_OFFSET, StackError, pick_port, pid_alive, port_is_free
from common.stack.seaweedfs import SeaweedControl, find_weed
from common.stack.state import DEFAULT_BUCKET, DEFAULT_STATE_DIR

logger = logging.getLogger(__name__)


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

    def _choose_ports(self) -> None:
        taken: list[int] = []
        if not self.tls:
            self.ports["mqtt_tls"] = None
        for name in ("mqtt", "mqtt_tls"):
            if name == "mqtt_tls" and not self.tls:
                continue
            port = self.ports.get(name)
            if port is None or not port_is_free(port):
                if port is not None and name == "mqtt" and self._explicit_mqtt:
                    raise StackError(f"MQTT port {port} is in use")
                port = pick_port(taken=taken)
            self.ports[name] = port
            taken.append(port)
        for name in ("s3", "master", "volume", "filer"):
            port = self.ports.get(name)
            if port is None or not (port_is_free(port) and port_is_free(port + GRPC_OFFSET)):
                if port is not None and name == "s3" and self._explicit_s3:
                    raise StackError(f"S3 port {port} or its gRPC port {port + GRPC_OFFSET} is in use")
                port = pick_port(grpc_too=True, taken=taken)
            self.ports[name] = port
            taken += [port, port + GRPC_OFFSET]

    def up(self, timeout_s: float = 90.0) -> LocalStack:
        """Start mosquitto and SeaweedFS, create the bucket, write ``stack.json``; returns self.

        Reuses the secrets, data and (when free) ports of an earlier run in the same state dir.

        Raises:
            StackError: already running here, a binary is missing, or a server did not come up
                (whatever was started is stopped again).
        """
        find_mosquitto(), find_weed()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        previous = self._read_state()
        if previous and (pid_alive(previous.get("mosquitto", {}).get("pid"), self.mosquitto.needle)
                         or pid_alive(previous.get("seaweedfs", {}).get("pid"), self.seaweedfs.needle)):
            raise StackError(f"a stack already runs in {self.state_dir}; 'framecap stack down' first")
        for name, port in (previous or {}).get("ports", {}).items():
            if self.ports.get(name) is None:
                self.ports[name] = port
        t0 = time.monotonic()
        with self._locked():
            self._ensure_secrets()
            self.mosquitto_dir.mkdir(parents=True, exist_ok=True)
            if self.tls:
                self._make_tls_files()
            self._choose_ports()
        try:
            self.start_mosquitto()
            self.start_seaweedfs(timeout_s)
        except BaseException:
            self.down(timeout_s=3.0)
            raise
        self.timings["up_s"] = round(time.monotonic() - t0, 3)
        logger.info("local stack up in %.1f s: mqtt://%s:%s, %s, bucket %s", self.timings["up_s"],
                    self.host, self.mqtt_port, self.s3_endpoint, self.bucket)
        return self

    def down(self, timeout_s: float = 30.0) -> float:
        """Stop both servers (SIGTERM to both at once; SIGKILL what still runs after
        ``timeout_s``), remove SeaweedFS's leftover sockets. Returns the seconds it took."""
        t0 = time.monotonic()
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
        stack.ports.update(state.get("ports", {}))
        stack.timings = dict(state.get("timings", {}))
        stack.mosquitto.pid = state.get("mosquitto", {}).get("pid")
        stack.seaweedfs.pid = state.get("seaweedfs", {}).get("pid")
        return stack
