"""Typed, validated configuration: one YAML file per process (edge, ingest, worker, web).

Each section is a pydantic model with ``extra="forbid"`` and a description on every field, so a
typo is refused instead of ignored. Secrets (MQTT password, S3 keys) and the endpoints may be
left out of the file and come from the environment (``framecap stack env`` prints these exports
for the local stack); a value in the file or on the command line wins over the environment:

| field | environment variable | default without it |
| --- | --- | --- |
| ``mqtt.host`` | ``FRAMECAP_MQTT_HOST`` | ``127.0.0.1`` |
| ``mqtt.port`` | ``FRAMECAP_MQTT_PORT`` | ``1883`` |
| ``mqtt.username`` | ``FRAMECAP_MQTT_USERNAME`` | none |
| ``mqtt.password`` | ``FRAMECAP_MQTT_PASSWORD`` | none |
| ``s3.endpoint_url`` | ``FRAMECAP_S3_ENDPOINT_URL`` | none (AWS) |
| ``s3.bucket`` | ``FRAMECAP_S3_BUCKET`` | ``framecap`` |
| ``s3.access_key_id`` | ``FRAMECAP_S3_ACCESS_KEY_ID``, else ``AWS_ACCESS_KEY_ID`` | none |
| ``s3.secret_access_key`` | ``FRAMECAP_S3_SECRET_ACCESS_KEY``, else ``AWS_SECRET_ACCESS_KEY`` | none |
| ``web: host``, ``port`` | ``FRAMECAP_WEB_HOST``, ``FRAMECAP_WEB_PORT`` | ``127.0.0.1``, ``8080`` |
| ``web: state_dir`` | ``FRAMECAP_WEB_STATE_DIR`` | ``.state/web`` |
| ``web: index`` | ``FRAMECAP_WEB_INDEX`` (password: ``FRAMECAP_WEB_INDEX_PASSWORD``) | ``STATE/index.sqlite3`` |
| ``web: accounts_file`` | ``FRAMECAP_WEB_ACCOUNTS_FILE`` | ``STATE/accounts.yaml`` |
| ``web: session_secret`` | ``FRAMECAP_WEB_SESSION_SECRET`` | generated into ``STATE/session-secret`` |
| ``web: webhook_secret`` | ``FRAMECAP_WEBHOOK_SECRET`` | none (webhooks refused) |
| ``web: public_url`` | ``FRAMECAP_WEB_PUBLIC_URL`` | ``http://host:port`` |

An empty variable counts as unset. A value from the environment is validated like one from the
file (``FRAMECAP_MQTT_PORT=abc`` is a config error, not ignored).

:func:`load_config` reads a file and raises :class:`ConfigError` whose message names the key, the
value and why; the CLIs print it and exit with status 2. ``--validate-config`` checks and exits
(also that the files the config names exist: :func:`missing_files`). A value from the
environment that does not validate names its variable (``mqtt.port = 'abc' from
$FRAMECAP_MQTT_PORT``).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from common.topics import InvalidIdError, validate_id, validate_prefix

SafeId = Annotated[str, AfterValidator(lambda v: validate_id(v, "id"))]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message is for the user."""


class Section(BaseModel):
    """Base of every config section: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _env(name: str, default: Any = None) -> Any:
    """``$name`` if set and not empty, else ``default`` (validated by the field either way)."""
    return os.environ.get(name) or default


def _env_secret(*names: str) -> SecretStr | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return SecretStr(value)
    return None


class TlsConfig(Section):
    """TLS towards the MQTT broker."""

    ca_certs: Path | None = Field(default=None, description="CA bundle (PEM) to verify the broker.")
    certfile: Path | None = Field(default=None, description="Client certificate (PEM), if the broker asks for one.")
    keyfile: Path | None = Field(default=None, description="Client private key (PEM) for certfile.")
    insecure: bool = Field(default=False, description="Skip the broker hostname check (tests only).")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile must be given together")
        return self


class MqttConfig(Section):
    """Connection to the MQTT broker (MQTT v5)."""

    host: str = Field(
        default_factory=lambda: _env("FRAMECAP_MQTT_HOST", "127.0.0.1"),
        description="Broker host name or address; default from $FRAMECAP_MQTT_HOST, else 127.0.0.1.",
    )
    port: int = Field(
        default_factory=lambda: _env("FRAMECAP_MQTT_PORT", 1883),
        ge=1,
        le=65535,
        description="Broker TCP port; default from $FRAMECAP_MQTT_PORT, else 1883.",
    )
    topic_prefix: str = Field(default="framecap", description="First topic level(s) of every topic.")
    client_id: str | None = Field(default=None, description="MQTT client_id; derived from the role and device when empty.")
    username: str | None = Field(
        default_factory=lambda: _env("FRAMECAP_MQTT_USERNAME"),
        description="Broker user name, if the broker checks one; default from $FRAMECAP_MQTT_USERNAME.",
    )
    password: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_MQTT_PASSWORD"),
        description="Broker password; default from $FRAMECAP_MQTT_PASSWORD. Never logged.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    session_expiry_s: int = Field(
        default=86400, ge=0, description="Persistent-session lifetime on the broker, seconds (MQTT v5)."
    )
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First reconnect delay, seconds.")
    reconnect_max_s: float = Field(default=10.0, gt=0, description="Longest reconnect delay, seconds.")
    tls: TlsConfig | None = Field(default=None, description="TLS settings; plain TCP when absent.")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        validate_prefix(self.topic_prefix)
        if self.password is not None and self.username is None:
            raise ValueError(
                "a password is set (in the file or $FRAMECAP_MQTT_PASSWORD) "
                "but no username (in the file or $FRAMECAP_MQTT_USERNAME)"
            )
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class S3Config(Section):
    """Connection to the S3 bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW)."""

    endpoint_url: str | None = Field(
        default_factory=lambda: _env("FRAMECAP_S3_ENDPOINT_URL"),
        description="S3 endpoint, e.g. http://127.0.0.1:8333; default from $FRAMECAP_S3_ENDPOINT_URL; AWS when empty.",
    )
    bucket: str = Field(
        default_factory=lambda: _env("FRAMECAP_S3_BUCKET", "framecap"),
        min_length=3,
        max_length=63,
        description="Bucket name; default from $FRAMECAP_S3_BUCKET, else framecap.",
    )
    region: str = Field(default="us-east-1", description="S3 region.")
    access_key_id: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        description="Access key; default from $FRAMECAP_S3_ACCESS_KEY_ID or $AWS_ACCESS_KEY_ID.",
    )
    secret_access_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        description="Secret key; default from $FRAMECAP_S3_SECRET_ACCESS_KEY or $AWS_SECRET_ACCESS_KEY. Never logged.",
    )
    path_style: bool = Field(default=True, description="Path-style addressing (needed by SeaweedFS and MinIO).")
    create_bucket: bool = Field(default=False, description="Create the bucket at start if it is missing.")


class SamplingConfig(Section):
    """Which frames the edge sends."""

    interval_s: float = Field(
        default=1.0, gt=0, description="Send at most one frame per interval, seconds (video time for files, wall time for live sources)."
    )
    scene_change: bool = Field(default=True, description="Skip frames too similar to the last one sent.")
    scene_threshold: float = Field(
        default=0.02, ge=0, le=1, description="Mean absolute difference (0..1, on a small grey thumbnail) below which a frame counts as unchanged."
    )
    max_static_s: float = Field(
        default=60.0, gt=0, description="Send a frame at least this often even if the scene is static, seconds."
    )


class EncodingConfig(Section):
    """JPEG encoding of sampled frames."""

    max_bytes: int = Field(default=128 * 1024, ge=4096, description="Payload cap, bytes (AWS IoT Core: 128 KB).")
    quality: int = Field(default=85, ge=10, le=100, description="First JPEG quality tried.")
    min_quality: int = Field(default=40, ge=5, le=100, description="Lowest quality before the frame is scaled down.")
    max_width: int = Field(default=1280, ge=32, description="Frames wider than this are scaled down first, pixels.")

    @model_validator(mode="after")
    def _qualities(self) -> EncodingConfig:
        if self.min_quality > self.quality:
            raise ValueError("min_quality must be <= quality")
        return self


class SpoolConfig(Section):
    """The edge's bounded on-disk spool of frames not yet acknowledged."""

    directory: Path = Field(default=Path("spool"), description="Spool directory (created).")
    max_frames: int = Field(default=10000, ge=1, description="Most frames kept; the oldest is dropped beyond.")
    max_bytes: int = Field(default=1 << 30, ge=1 << 16, description="Most bytes kept; the oldest is dropped beyond.")
    resend_after_s: float = Field(default=30.0, gt=0, description="Resend a frame not acknowledged within this time, seconds.")
    reconnect_grace_s: float = Field(
        default=2.0, gt=0, description="After a reconnect, resend a frame not acknowledged within this time, doubling up to resend_after_s until a frame sent since is acknowledged, seconds (a broker restart loses shared subscriptions until the ingest is back).")
    overtaken_grace_s: float = Field(
        default=2.0, gt=0, description="Resend a frame the broker accepted when a frame sent after it has been acknowledged for this long, seconds (its ingest replica died with it).")
    fsync: Literal["interval", "always"] = Field(
        default="interval", description="'interval': frames still unacknowledged fsync_interval_s after spooling are fsynced (a crash loses nothing, a power cut at most that long of unacknowledged frames); 'always': every frame is fsynced before it is published.")
    fsync_interval_s: float = Field(
        default=1.0, ge=0, description="With fsync 'interval': fsync frames still unacknowledged this long after spooling, seconds.")


class EdgeConfig(Section):
    """``framecap edge``: capture, sample, spool and publish frames of one device."""

    device_id: SafeId = Field(description="This device's id; a topic level and an S3 key part.")
    source: str = Field(default="0", description="Camera index, video file, RTSP URL or GStreamer pipeline (with '!').")
    reopen_min_s: float = Field(default=1.0, gt=0, description="First delay before reopening a lost source, seconds.")
    reopen_max_s: float = Field(default=30.0, gt=0, description="Longest delay between reopen attempts, seconds.")
    playback_speed: float = Field(
        default=0.0, ge=0, le=1000, description="Read a video file at this multiple of its frame rate (1: real time, as a camera delivers it; 0: as fast as it decodes). Live sources are never paced."
    )
    max_frames: int | None = Field(default=None, ge=1, description="Stop after sampling this many frames.")
    drain_timeout_s: float = Field(default=120.0, ge=0, description="On a file's end, wait this long for every ack, seconds.")
    captions_jsonl: Path | None = Field(default=None, description="Append each caption received to this JSONL file.")
    captions_jsonl_max_bytes: int = Field(
        default=64 << 20, ge=0, description="Rotate captions_jsonl to <file>.1 when a line would take it past this size, bytes, so a device's disk is never filled by it (the two files hold at most twice this); 0: never.")
    wait_for_captions_s: float = Field(
        default=0.0, ge=0, description="On a file's end, after every ack, wait this long for the captions of the frames sent, seconds (0: don't wait)."
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Frame sampling.")
    encoding: EncodingConfig = Field(default_factory=EncodingConfig, description="JPEG encoding.")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="Disk spool.")

    @model_validator(mode="after")
    def _reopen(self) -> EdgeConfig:
        if self.reopen_max_s < self.reopen_min_s:
            raise ValueError("reopen_max_s must be >= reopen_min_s")
        return self



class IngestConfig(Section):
    """``framecap ingest``: MQTT frames -> S3, then acks."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    s3: S3Config = Field(default_factory=S3Config, description="Bucket the frames go to.")
    share_group: SafeId = Field(default="ingest", description="MQTT v5 shared-subscription group; replicas split the load.")
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024, description="Frames larger than this are refused, bytes.")
    max_pixels: int = Field(default=4096 * 4096, ge=64, description="Frames with more pixels are refused.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Serve Prometheus metrics on this port.")
    io_threads: int = Field(default=8, ge=1, le=64, description="Frames validated and stored in S3 at once; PUBACKs still go in the order the frames arrived.")



class WorkerConfig(Section):
    """``framecap worker``: caption every frame under frames/."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    s3: S3Config = Field(default_factory=S3Config, description="Bucket with frames/ and captions/.")
    share_group: SafeId = Field(default="worker", description="Shared-subscription group for frame notifications.")
    model: Path | None = Field(default=None, description="Model checkpoint; the packaged default model when empty.")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="Torch device: auto (cuda when a GPU is visible), cpu, cuda or cuda:N (GPU N).")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        default="auto",
        description="Precision of the caption model: auto is fp32 on a CPU and fp16 on CUDA; bf16 "
        "(also on a CPU) moves val BLEU-4 and CIDEr by about 0.005, fp16 by under 0.001; fp16 needs CUDA; "
        "int8 (CPU only) quantizes the decoder for a 2-4x faster beam search, BLEU-4 and CIDEr within 0.0015.")
    beam_size: int = Field(default=3, ge=1, le=20, description="Beam width of the caption search.")
    max_caption_length: int = Field(default=30, ge=2, le=100, description="Longest caption, words.")
    batch_size: int = Field(default=8, ge=1, le=256, description="Most frames per model batch.")
    threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "CPU threads for the model: a batch is split into this many chunks captioned in parallel, "
            "each torch op on one thread. 1 leaves the other cores to ingest, the broker and S3 on a "
            "shared machine and cannot collapse under contention as torch's default team of threads "
            "does; on a machine of its own set the number of cores."
        ),
    )
    max_wait_s: float = Field(default=0.5, ge=0, description="Longest wait to fill a batch while more frames are being fetched (a burst of acks), seconds; an idle model takes a lone frame at once.")
    io_threads: int = Field(default=2, ge=1, le=16, description="Frames fetched from S3 at once (three requests each); twice as many records are written at once.")
    list_interval_s: float = Field(default=30.0, gt=0, description="How often to list the recent days of frames/ and captions/ to catch up (frames whose ack was lost), seconds.")
    recent_days: int = Field(default=2, ge=1, le=366, description="UTC days a periodic listing looks at: today and the days before (2: today and yesterday, so midnight is safe); tomorrow too, for an edge clock ahead. Older days are listed only by a full pass.")
    full_list_interval_s: float = Field(default=0.0, ge=0, description="Seconds between the end of one full listing pass (every key of frames/ and captions/) and the next; 0: only at start and on SIGHUP.")
    listing_settle_s: float = Field(default=600.0, ge=0, description="A periodic listing resumes after the last frame of a day that has its caption and was stored at least this long ago, seconds: a frame stored late under an earlier key (a resend) is still listed.")
    max_frame_bytes: int = Field(default=16 << 20, ge=1024, description="Objects under frames/ larger than this get an error record, bytes.")
    max_pixels: int = Field(default=4096 * 4096, ge=64, description="Images with more pixels get an error record.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Serve Prometheus metrics on this port.")



def _is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


class WebConfig(Section):
    """``framecap web``: pages, search, live captions and alerts in a browser.

    The index is a cache of S3 ``captions/`` (rebuilt by ``framecap web reindex``): a SQLite file
    under ``state_dir`` by default, or a ``postgresql://`` URL that several replicas share.
    """

    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection (the 'web' account).")
    s3: S3Config = Field(default_factory=S3Config, description="Bucket with frames/ and captions/.")
    host: str = Field(
        default_factory=lambda: _env("FRAMECAP_WEB_HOST", "127.0.0.1"),
        min_length=1,
        description="Address the web server binds; default from $FRAMECAP_WEB_HOST, else 127.0.0.1 (this machine only).",
    )
    port: int = Field(
        default_factory=lambda: _env("FRAMECAP_WEB_PORT", 8080),
        ge=0,
        le=65535,
        description="TCP port of the web server; default from $FRAMECAP_WEB_PORT, else 8080 (0: a free port).",
    )
    state_dir: Path = Field(
        default_factory=lambda: Path(_env("FRAMECAP_WEB_STATE_DIR", ".state/web")),
        description="Directory of the SQLite index, accounts, session secret and attention cache; "
        "default from $FRAMECAP_WEB_STATE_DIR, else .state/web (created).",
    )
    index: str | None = Field(
        default_factory=lambda: _env("FRAMECAP_WEB_INDEX"),
        description="Caption index: a SQLite file path, or a postgresql://user@host:port/db URL "
        "(password from $FRAMECAP_WEB_INDEX_PASSWORD or in the URL, never logged); default from "
        "$FRAMECAP_WEB_INDEX, else index.sqlite3 in state_dir.",
    )
    index_password: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_WEB_INDEX_PASSWORD"),
        description="PostgreSQL password when the index URL has none; default from "
        "$FRAMECAP_WEB_INDEX_PASSWORD. Never logged.",
    )
    accounts_file: Path | None = Field(
        default_factory=lambda: _env("FRAMECAP_WEB_ACCOUNTS_FILE"),
        description="Accounts file (hashed passwords, roles, devices) that 'framecap web add-user' "
        "writes; default from $FRAMECAP_WEB_ACCOUNTS_FILE, else accounts.yaml in state_dir.",
    )
    rules_file: Path | None = Field(
        default=None, description="YAML list of alert rules loaded at start (more can be made in the UI and API)."
    )
    session_secret: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_WEB_SESSION_SECRET"),
        description="Key that signs login cookies; default from $FRAMECAP_WEB_SESSION_SECRET, else "
        "generated once into state_dir/session-secret (mode 0600). Never logged.",
    )
    webhook_secret: SecretStr | None = Field(
        default_factory=lambda: _env_secret("FRAMECAP_WEBHOOK_SECRET"),
        description="Key of the HMAC-SHA256 signature of alert webhooks (X-Framecap-Signature); "
        "default from $FRAMECAP_WEBHOOK_SECRET. Webhooks are refused without it. Never logged.",
    )
    public_url: str | None = Field(
        default_factory=lambda: _env("FRAMECAP_WEB_PUBLIC_URL"),
        description="Base URL people reach the pages at, for links in alerts (e.g. "
        "https://cams.example.org); default from $FRAMECAP_WEB_PUBLIC_URL, else http://host:port.",
    )
    model: Path | None = Field(
        default=None, description="Caption model checkpoint for attention maps; the packaged default model when empty."
    )
    widening: bool = Field(
        default=True, description="Widen query words outside the model's word map to their nearest word-map words."
    )
    reindex_at_start: bool = Field(
        default=True, description="Rebuild the index from S3 captions/ in the background at start."
    )
    https_only_cookies: bool = Field(
        default=False, description="Mark session cookies Secure (set when served over HTTPS, e.g. behind a proxy)."
    )

    @field_validator("index")
    @classmethod
    def _check_index(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must be a SQLite file path or a postgresql:// URL, not blank")
        if _is_postgres_url(value):
            parts = urlsplit(value)
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as err:
                raise ValueError(f"the URL has a bad port: {err}") from None
            if not parts.hostname or not parts.path.strip("/"):
                raise ValueError("must be postgresql://[user[:password]@]host[:port]/database")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL, e.g. https://cams.example.org")
        return value

    @property
    def index_is_postgres(self) -> bool:
        """True when the index is a PostgreSQL URL."""
        return self.index is not None and _is_postgres_url(self.index)

    def index_location(self) -> str:
        """Where :func:`cloud.web.index.open_index` opens the index: the SQLite path (default
        ``state_dir/index.sqlite3``) or the PostgreSQL URL with :attr:`index_password` put in
        when the URL has none. Holds a secret: never log it (log :meth:`index_display`)."""
        if self.index is None:
            return str(self.state_dir / "index.sqlite3")
        if not self.index_is_postgres or self.index_password is None:
            return self.index
        parts = urlsplit(self.index)
        if parts.password is not None:
            return self.index
        user = quote(unquote(parts.username or ""), safe="")
        password = quote(self.index_password.get_secret_value(), safe="")
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))

    def index_display(self) -> str:
        """:meth:`index_location` without any password, for logs and pages."""
        return redact_url(self.index_location())

    @property
    def accounts_path(self) -> Path:
        """The accounts file: :attr:`accounts_file`, else ``state_dir/accounts.yaml``."""
        return self.accounts_file if self.accounts_file is not None else self.state_dir / "accounts.yaml"

    @property
    def base_url(self) -> str:
        """:attr:`public_url` without a trailing ``/``, else ``http://host:port``."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def session_secret_value(self) -> SecretStr:
        """The cookie-signing key: :attr:`session_secret`, else the one in
        ``state_dir/session-secret``, generated there (mode 0600) on first use.

        Raises:
            OSError: the state dir or the file cannot be written or read.
        """
        if self.session_secret is not None:
            return self.session_secret
        path = self.state_dir / "session-secret"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return SecretStr(path.read_text().strip())
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
        return SecretStr(path.read_text().strip())


C = TypeVar("C", bound=Section)


SECRET_KEYS = frozenset({
    "password", "access_key_id", "secret_access_key",
    "index_password", "session_secret", "webhook_secret",
})
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it as ``***``."""
    return _URL_PASSWORD_RE.sub(r"\g<head>:***@", text)


def redact(value: Any, key: str | None = None) -> Any:
    """``value`` with every secret field (:data:`SECRET_KEYS`) replaced by ``'***'``."""
    if key in SECRET_KEYS and value is not None:
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


_ENV_NAME_RE = re.compile(r"\$([A-Z][A-Z0-9_]*)")


def _section_of(annotation: Any) -> type[Section] | None:
    """The Section class of a field's annotation (``TlsConfig | None`` -> TlsConfig), or None."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in get_args(annotation):
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def env_variable_of(cls: type[Section], loc: tuple[Any, ...], data: Any) -> str | None:
    """The ``FRAMECAP_*`` (or ``AWS_*``) environment variable the value at ``loc`` came from:
    one named in the field's description, set, while ``data`` (file and command line) leaves
    the key out. None when the value came from the file or the command line, or has no
    variable."""
    model: type[Section] | None = cls
    node = data
    description = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        description = field.description
        node = node.get(part) if isinstance(node, dict) else None
        model = _section_of(field.annotation)
    if node is not None or not description:
        return None
    return next((name for name in _ENV_NAME_RE.findall(description) if os.environ.get(name)), None)


def _section_path(cls: type[Section], name: str) -> tuple[str, ...] | None:
    """Where the section class called ``name`` sits under ``cls`` (``("mqtt",)``), if it does."""
    if cls.__name__ == name:
        return ()
    for field_name, field in cls.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            below = _section_path(section, name)
            if below is not None:
                return (field_name, *below)
    return None


def format_validation_error(err: ValidationError, data: Any, source: str,
                            cls: type[Section] | None = None) -> str:
    """One line per problem: ``source: key.path = value: why`` (secret values shown as ***);
    a value that came from the environment (``cls`` given) says which variable:
    ``source: mqtt.port = 'abc' from $FRAMECAP_MQTT_PORT: why``."""
    # A section left out of the file is built by its default factory: its errors come with
    # their own model's title and locations relative to it.
    prefix = (_section_path(cls, err.title) or ()) if cls is not None else ()
    lines = []
    for e in err.errors():
        full_loc = (*prefix, *e["loc"])
        loc = ".".join(str(x) for x in full_loc)
        leaf = str(full_loc[-1]) if full_loc else None
        value = redact(e.get("input", ""), leaf)
        variable = env_variable_of(cls, full_loc, data) if cls is not None else None
        origin = f" from ${variable}" if variable else ""
        if e["type"] == "missing":
            lines.append(f"{source}: {loc}: required key is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc} = {value!r}: unknown key (typo?)")
        else:
            lines.append(f"{source}: {loc or '(top level)'} = {value!r}{origin}: {e['msg']}")
    return "\n".join(lines)


def parse_config(cls: type[C], data: Any, source: str = "config") -> C:
    """Validate a mapping into ``cls``; raises ConfigError naming key, value and reason."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, data, source, cls)) from err
    except InvalidIdError as err:
        raise ConfigError(f"{source}: {err}") from err


# Fields whose file must exist when set, wherever they sit in a config: what the file is.
FILES_THAT_MUST_EXIST: dict[str, str] = {
    "ca_certs": "CA bundle",
    "certfile": "client certificate",
    "keyfile": "client private key",
    "model": "model checkpoint",
}


def missing_files(config: Section, prefix: str = "") -> list[str]:
    """One line per file the config names that cannot be read (the MQTT TLS CA bundle, client
    certificate and key, the worker's model; :data:`FILES_THAT_MUST_EXIST`):
    ``mqtt.tls.ca_certs = '/etc/ca.pem': no such file (CA bundle)``, or ``is a directory``.
    ``--validate-config`` prints them and exits 2, so a deploy finds them before the start."""
    problems: list[str] = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Section):
            problems += missing_files(value, f"{prefix}{name}.")
        elif name in FILES_THAT_MUST_EXIST and isinstance(value, (str, Path)):
            path = Path(value)
            what = FILES_THAT_MUST_EXIST[name]
            if path.is_dir():
                why = f"is a directory, not a file ({what})"
            elif not path.is_file():
                why = f"no such file ({what})"
            elif not os.access(path, os.R_OK):
                why = f"not readable by this user ({what})"
            else:
                continue
            problems.append(f"{prefix}{name} = {str(path)!r}: {why}")
    return problems


def load_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any] | None = None) -> C:
    """Read a YAML config file (or none) into ``cls``, applying ``overrides`` (dotted keys).

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate.
    """
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {part} must be a mapping of keys to set {dotted}")
        node[leaf] = value
    return parse_config(cls, data, source)
