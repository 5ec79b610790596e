"""The state directory of a local stack: its paths, ports, secrets and ``stack.json``.

:class:`StackState` is the base of :class:`~common.stack.LocalStack`; the layout is in the
package docstring (:mod:`common.stack`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from common.config import MqttConfig, S3Config, TlsConfig
from common.stack.process import HOST, StackError, _Service, write_private
from common.topics import validate_id

DEFAULT_STATE_DIR = Path(".state/stack")
DEFAULT_BUCKET = "framecap"
ROLES = ("admin", "ingest", "worker", "web")
STATE_VERSION = 1


class StackState:
    """Paths, ports, accounts and saved state of one stack; see :class:`LocalStack` for args."""

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
                                  self.mosquitto_dir / "mosquitto.log", program="mosquitto")
        self.seaweedfs = _Service("seaweedfs", str(self.weed_dir / "data"), self.weed_dir / "weed.log",
                                  program="weed")
        self.timings: dict[str, float] = {}
        self.healed: list[str] = []  # servers the last up() found dead and started again
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
        write_private(self.accounts_file, json.dumps(accounts, indent=2))
        if not self.s3_credentials_file.exists():
            creds = {"access_key_id": "FC" + secrets.token_hex(9).upper(),
                     "secret_access_key": secrets.token_urlsafe(30)}
            write_private(self.s3_credentials_file, json.dumps(creds, indent=2))
        key_id, secret = self.s3_credentials()
        identities = {"identities": [{
            "name": "framecap",
            "credentials": [{"accessKey": key_id, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        write_private(self.secrets_dir / "s3-identities.json", json.dumps(identities, indent=2))

    # --- what runs, and stack.json -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What runs: ``{"state_dir", "bucket", "mosquitto": {...}, "seaweedfs": {...}}`` with
        running flags, PIDs, endpoints and log paths (no secrets). Each server's ``state`` is
        ``running``, ``stopped`` or ``dead`` (started, then gone without ``down``: killed or
        crashed; ``framecap stack up`` restarts it)."""
        mqtt: dict[str, Any] = {"running": self.mosquitto.running(), "state": self.mosquitto.state(),
                                "pid": self.mosquitto.pid,
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
            "seaweedfs": {"running": self.seaweedfs.running(), "state": self.seaweedfs.state(),
                          "pid": self.seaweedfs.pid,
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
