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
# What each service's S3 identity may do, per (SeaweedFS action, key prefix), in every bucket the
# stack knows (``Action:bucket/prefix/*`` in the identities file). Measured against weed 4.48:
# ``Write`` covers PutObject (If-None-Match included) and DeleteObject (there is no separate
# delete action), ``Read`` GetObject and HeadObject, ``List`` ListObjectsV2 under the prefix;
# a ``*`` in an action matches across ``/``, so every grant names its bucket. HeadBucket and
# CreateBucket need more (``Read:bucket``, ``Admin``): only ``admin`` creates buckets.
S3_GRANTS: dict[str, tuple[tuple[str, str], ...]] = {
    # stores frames (If-None-Match), and reads one back when it was there already
    "ingest": (("Write", "frames"), ("Read", "frames")),
    # finds frames without captions, writes captions and outbox markers, deletes the markers
    "worker": (("Read", "frames"), ("List", "frames"), ("Read", "captions"), ("List", "captions"),
               ("Write", "captions"), ("List", "outbox"), ("Write", "outbox")),
    # shows frames and captions, writes nothing
    "web": (("Read", "frames"), ("Read", "captions"), ("List", "captions"), ("List", "frames")),
}
S3_ROLES = ("admin", *S3_GRANTS)
ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]


def s3_identities(credentials: dict[str, tuple[str, str]], buckets: Iterable[str]) -> dict[str, Any]:
    """The SeaweedFS ``-s3.config`` document: one identity per role of ``credentials``
    (``{role: (access_key_id, secret_access_key)}``), ``admin`` with every right and each
    service with :data:`S3_GRANTS` in each of ``buckets``. Devices have no S3 identity."""
    identities = []
    for role, (key_id, secret) in credentials.items():
        if role == "admin":
            actions = list(ADMIN_ACTIONS)
        else:
            actions = [f"{action}:{bucket}/{prefix}/*" for bucket in sorted(set(buckets))
                       for action, prefix in S3_GRANTS[role]]
        identities.append({"name": f"framecap-{role}", "actions": actions,
                           "credentials": [{"accessKey": key_id, "secretKey": secret}]})
    return {"identities": identities}


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
        self.healed: list[str] = []
        self.buckets: list[str] = [bucket]  # buckets the service identities have rights in  # servers the last up() found dead and started again
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
        """JSON ``{role: {"access_key_id", "secret_access_key"}}`` (0600), one S3 identity per
        service role (:data:`S3_GRANTS`) and ``admin``."""
        return self.secrets_dir / "s3-credentials.json"

    @property
    def s3_identities_file(self) -> Path:
        """SeaweedFS's ``-s3.config`` (0600), written from :attr:`s3_credentials_file`."""
        return self.secrets_dir / "s3-identities.json"

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

    def _s3_credentials_all(self) -> dict[str, tuple[str, str]]:
        try:
            data = json.loads(self.s3_credentials_file.read_text())
        except FileNotFoundError:
            return {}
        if "access_key_id" in data:  # a state directory from before the per-role identities
            data = {"admin": data}
        return {role: (c["access_key_id"], c["secret_access_key"]) for role, c in data.items()}

    def s3_credentials(self, role: str = "admin") -> tuple[str, str]:
        """``(access_key_id, secret_access_key)`` of the S3 identity of ``role`` (``admin``,
        ``ingest``, ``worker`` or ``web``; see :data:`S3_GRANTS`).

        Raises:
            StackError: no such role (devices have no S3 identity), or no secrets yet.
        """
        creds = self._s3_credentials_all().get(role)
        if creds is None:
            raise StackError(f"no S3 identity for {role!r} in {self.s3_credentials_file} "
                             f"(roles: {', '.join(S3_ROLES)}; devices have none)")
        return creds

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

    def s3_config(self, bucket: str | None = None, *, role: str = "admin", **fields: Any) -> S3Config:
        """A ready :class:`S3Config` (endpoint, path style, keys as SecretStr) for ``bucket``
        (default: the stack's bucket) with the S3 identity of ``role``: ``admin`` (default: all
        rights, creates buckets), ``ingest``, ``worker`` or ``web`` (least privilege,
        :data:`S3_GRANTS`). A service role is granted ``bucket`` first if it is new to the
        stack (:meth:`grant_bucket`)."""
        bucket = bucket or self.bucket
        if role != "admin":
            self.grant_bucket(bucket)
        return self._s3_config_as(role, bucket, **fields)

    def _s3_config_as(self, role: str, bucket: str, **fields: Any) -> S3Config:
        key_id, secret = self.s3_credentials(role)
        return S3Config(
            endpoint_url=self.s3_endpoint, bucket=bucket, region="us-east-1",
            access_key_id=SecretStr(key_id), secret_access_key=SecretStr(secret), path_style=True,
            **fields,
        )

    def storage(self, bucket: str | None = None, *, role: str = "admin", **client_options: Any) -> Any:
        """A :class:`common.storage.ObjectStore` on ``bucket`` (default: the stack's bucket) with
        the S3 identity of ``role`` (see :meth:`s3_config`)."""
        from common.storage import ObjectStore

        return ObjectStore(self.s3_config(bucket, role=role), **client_options)

    def env(self, user: str = "admin", *, bucket: str | None = None) -> dict[str, str]:
        """``FRAMECAP_*`` environment variables for a process that connects as ``user``: its MQTT
        account and the S3 identity of that account's role (``admin``, ``ingest``, ``worker``,
        ``web``). A device gets no S3 variables at all: devices only speak MQTT.

        Holds secrets (``FRAMECAP_MQTT_PASSWORD``, ``FRAMECAP_S3_*_KEY*``): pass it to a child
        process's environment, never print it.
        """
        env = {
            "FRAMECAP_MQTT_HOST": self.host,
            "FRAMECAP_MQTT_PORT": str(self.mqtt_port),
            "FRAMECAP_MQTT_USERNAME": user,
            "FRAMECAP_MQTT_PASSWORD": self.password(user),
        }
        role = self.accounts()[user]["role"]
        if role in S3_ROLES:
            config = self.s3_config(bucket, role=role)
            assert config.access_key_id is not None and config.secret_access_key is not None
            env.update({
                "FRAMECAP_S3_ENDPOINT_URL": self.s3_endpoint,
                "FRAMECAP_S3_BUCKET": config.bucket,
                "FRAMECAP_S3_ACCESS_KEY_ID": config.access_key_id.get_secret_value(),
                "FRAMECAP_S3_SECRET_ACCESS_KEY": config.secret_access_key.get_secret_value(),
            })
        return env

    def grant_bucket(self, bucket: str, timeout_s: float = 15.0) -> None:
        """Give the service identities their rights (:data:`S3_GRANTS`) in ``bucket`` too: add it
        to the stack's buckets, rewrite the identities file and make a running SeaweedFS reload
        it (SIGHUP), then wait until the new grant answers. Nothing when it is known already.

        Raises:
            StackError: SeaweedFS did not apply the grant within ``timeout_s``.
        """
        if bucket in self.buckets:
            return
        with self._locked():
            saved = self._read_state() or {}
            self.buckets = sorted(set(self.buckets) | set(saved.get("buckets", [])))
            if bucket in self.buckets:
                return
            self.buckets.append(bucket)
            self._write_s3_identities()
            if self.state_file.exists():
                self._save_state()
        self._reload_s3_identities(bucket, timeout_s)

    def _reload_s3_identities(self, bucket: str, timeout_s: float) -> None:
        """Overridden by the SeaweedFS half: SIGHUP and wait."""

    def _write_s3_identities(self) -> None:
        buckets = sorted(set(self.buckets) | {self.bucket})
        doc = s3_identities(self._s3_credentials_all(), buckets)
        write_private(self.s3_identities_file, json.dumps(doc, indent=2))

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
        creds = self._s3_credentials_all()
        if set(creds) != set(S3_ROLES):
            for role in S3_ROLES:
                creds.setdefault(role, ("FC" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)))
            data = {role: {"access_key_id": k, "secret_access_key": s} for role, (k, s) in creds.items()}
            write_private(self.s3_credentials_file, json.dumps(data, indent=2))
        if self.bucket not in self.buckets:
            self.buckets.append(self.bucket)
        self._write_s3_identities()

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
            "buckets": sorted(set(self.buckets)),
            "secrets": {"mqtt_accounts": str(self.accounts_file),
                        "s3_credentials": str(self.s3_credentials_file)},
            "s3_identities": sorted(self._s3_credentials_all()),
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
