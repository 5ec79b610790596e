"""Typed, versioned messages of the MQTT and S3 contract (../shared/DESIGN.md).

Every payload is decoded once at the boundary into one of these frozen pydantic models, then
passed around as an object. Each carries ``schema_version``; a version this code does not know
is refused with :class:`MessageError`.

- :class:`FrameMetadata`: beside the JPEG bytes of ``{prefix}/{device_id}/frames``, as MQTT v5
  user properties (``fc-schema``, ``fc-frame-id``, ...), and as S3 object metadata on
  ``frames/...jpg`` (the same names without the ``fc-`` prefix). The payload is the raw JPEG.
- :class:`FrameAck`: JSON on ``{prefix}/{device_id}/acks``.
- :class:`CaptionRecord`: JSON on ``{prefix}/{device_id}/captions`` and in ``captions/...json``.
- :class:`AlertMessage`: JSON on ``{prefix}/{device_id}/alerts`` (and the body of an alert
  webhook POST): an alert rule of ``framecap web`` matched a caption.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.topics import InvalidIdError, validate_id

SCHEMA_VERSION: Final = 1
USER_PROPERTY_PREFIX = "fc-"
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"


class MessageError(ValueError):
    """A payload or its metadata that cannot be decoded into a message (the reason says why)."""


def _device_id(v: str) -> str:
    return validate_id(v, "device_id")


def _frame_id(v: str) -> str:
    return validate_id(v, "frame_id")


def _utc(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("must be timezone-aware (UTC), e.g. 2026-01-31T12:00:00Z")
    try:
        return v.astimezone(timezone.utc)
    except OverflowError as err:  # e.g. 0001-01-01T00:00:00+01:00: pydantic would not wrap it
        raise ValueError(f"out of range in UTC: {v.isoformat()}") from err


DeviceId = Annotated[str, AfterValidator(_device_id)]
FrameId = Annotated[str, AfterValidator(_frame_id)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="Version of this message's schema."
    )


M = TypeVar("M", bound=_Message)


def _first_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "payload"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _validate(cls: type[M], data: Any) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise MessageError(f"invalid {cls.__name__}: {_first_error(err)}") from err
    except InvalidIdError as err:  # pragma: no cover - validators wrap it, kept for safety
        raise MessageError(f"invalid {cls.__name__}: {err}") from err


class FrameMetadata(_Message):
    """What travels beside a frame's JPEG bytes.

    ``width`` and ``height`` are in pixels of the encoded JPEG; ``sha256`` is the hex digest of
    the JPEG bytes; ``seq`` counts frames sampled by this device since its spool was created.
    """

    device_id: DeviceId = Field(description="The device that captured the frame.")
    frame_id: FrameId = Field(description="Unique per device; names the S3 object.")
    captured_at: UtcDatetime = Field(description="When the frame was captured, UTC.")
    seq: int = Field(ge=0, description="Per-device sample counter.")
    width: int = Field(gt=0, le=16384, description="JPEG width in pixels.")
    height: int = Field(gt=0, le=16384, description="JPEG height in pixels.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the JPEG bytes.")

    def flat(self) -> dict[str, str]:
        """The metadata as string pairs (S3 object metadata names)."""
        return {
            "schema": str(self.schema_version),
            "device-id": self.device_id,
            "frame-id": self.frame_id,
            # isoformat pads the year to 4 digits; strftime("%Y") does not below year 1000.
            "captured-at": self.captured_at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "seq": str(self.seq),
            "width": str(self.width),
            "height": str(self.height),
            "sha256": self.sha256,
        }

    def to_user_properties(self) -> list[tuple[str, str]]:
        """MQTT v5 user properties (``fc-`` prefixed names)."""
        return [(USER_PROPERTY_PREFIX + k, v) for k, v in self.flat().items()]

    def to_s3_metadata(self) -> dict[str, str]:
        """S3 object metadata (sent as ``x-amz-meta-*``)."""
        return self.flat()

    @classmethod
    def from_flat(cls, flat: Mapping[str, str]) -> FrameMetadata:
        """Decode the string pairs of :meth:`flat`.

        The schema version is checked first: a message of another version is reported as
        such, not by the fields this version has and it lacks.

        Raises:
            MessageError: an unknown schema version, a missing field or an invalid value.
        """
        schema = flat.get("schema")
        if schema is not None and schema != str(SCHEMA_VERSION):
            raise MessageError(
                f"unknown frame metadata schema version {schema[:16]!r} "
                f"(this code speaks {SCHEMA_VERSION})"
            )
        known = {"schema", "device-id", "frame-id", "captured-at", "seq", "width", "height", "sha256"}
        missing = sorted(known - set(flat))
        if missing:
            raise MessageError(f"frame metadata lacks {', '.join(missing)}")
        return _validate(
            cls,
            {
                "schema_version": SCHEMA_VERSION,
                "device_id": flat["device-id"],
                "frame_id": flat["frame-id"],
                "captured_at": flat["captured-at"],
                "seq": flat["seq"],
                "width": flat["width"],
                "height": flat["height"],
                "sha256": flat["sha256"],
            },
        )

    @classmethod
    def from_user_properties(cls, props: Iterable[tuple[str, str]] | None) -> FrameMetadata:
        """Decode MQTT v5 user properties; names without the ``fc-`` prefix are ignored.

        Raises:
            MessageError: as :meth:`from_flat`, or when a property is repeated.
        """
        flat: dict[str, str] = {}
        for name, value in props or ():
            if not name.startswith(USER_PROPERTY_PREFIX):
                continue
            key = name[len(USER_PROPERTY_PREFIX) :]
            if key in flat:
                raise MessageError(f"user property {name!r} appears twice")
            flat[key] = value
        return cls.from_flat(flat)

    @classmethod
    def from_s3_metadata(cls, metadata: Mapping[str, str]) -> FrameMetadata:
        """Decode S3 object metadata (keys as boto3 returns them, lower-cased)."""
        return cls.from_flat({k.lower(): v for k, v in metadata.items()})

    def check_payload(self, jpeg: bytes) -> None:
        """Raise MessageError if ``jpeg`` does not hash to :attr:`sha256`."""
        digest = hashlib.sha256(jpeg).hexdigest()
        if digest != self.sha256:
            raise MessageError(
                f"frame {self.frame_id}: payload sha256 {digest[:12]}... "
                f"does not match metadata {self.sha256[:12]}..."
            )


class _JsonMessage(_Message):
    def to_json(self) -> bytes:
        """UTF-8 JSON bytes (datetimes as ISO 8601 UTC)."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls: type[M], payload: bytes | str) -> M:
        """Decode a JSON payload.

        Raises:
            MessageError: not JSON, not an object, an unknown schema version or a bad field.
        """
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, int digits
            raise MessageError(f"{cls.__name__} payload is not JSON: {str(err)[:200]}") from err
        if not isinstance(data, dict):
            raise MessageError(f"{cls.__name__} payload is not a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise MessageError(
                f"unknown {cls.__name__} schema version {version!r} (this code speaks {SCHEMA_VERSION})"
            )
        return _validate(cls, data)


class FrameAck(_JsonMessage):
    """Sent by the ingest to ``{prefix}/{device_id}/acks`` once a frame is stored in S3
    (``key``), or once it refused the frame for good (``rejected``): exactly one of the two.

    A rejection is sent only for a frame whose own bytes or metadata fail the ingest's checks
    (a JPEG that does not decode, metadata that does not match it, a frame over the ingest's
    size limits): sending it again cannot help, so the device drops it from its spool instead of
    resending it for ever. A device from before rejections reads one as a malformed ack and
    keeps resending (``extra="forbid"``), as it did.
    """

    device_id: DeviceId = Field(description="The device whose frame was stored or refused.")
    frame_id: FrameId = Field(description="The stored or refused frame.")
    key: str | None = Field(default=None, description="Its S3 object key, frames/...jpg; None if rejected.")
    rejected: str | None = Field(
        default=None, max_length=400,
        description="Why the ingest refused the frame for good, 'reason: detail' (e.g. "
        "'undecodable: OpenCV cannot decode the JPEG'); None if stored.")

    def to_json(self) -> bytes:
        """UTF-8 JSON without the field that is None: a stored frame's ack is byte for byte what
        devices from before rejections read."""
        return self.model_dump_json(exclude_none=True).encode()

    @model_validator(mode="after")
    def _stored_or_rejected(self) -> FrameAck:
        if (self.key is None) == (self.rejected is None):
            raise ValueError("an ack has either a key (stored) or rejected (refused), not both or neither")
        return self


class CaptionRecord(_JsonMessage):
    """A frame's caption: on ``{prefix}/{device_id}/captions`` and in ``captions/...json``.

    ``score`` is the beam's total log-probability (natural log, <= 0). If the frame could not be
    captioned (a corrupt image, say), ``caption`` is empty and ``error`` says why.
    """

    frame_id: FrameId = Field(description="The captioned frame.")
    device_id: DeviceId = Field(description="The device that captured it.")
    captured_at: UtcDatetime | None = Field(description="When it was captured, UTC, if known.")
    caption: str = Field(description="The caption, words joined by spaces; empty on error.")
    score: float | None = Field(description="Log-probability of the caption under the model.")
    model: str = Field(description="Name of the model that wrote the caption.")
    frame_key: str = Field(description="S3 key of the frame.")
    caption_key: str = Field(description="S3 key of this record.")
    error: str | None = Field(default=None, description="Why the frame has no caption, if so.")


class AlertRuleRef(BaseModel):
    """The rule an alert came from, as carried in :class:`AlertMessage`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="The rule's id.")
    name: str = Field(description="The rule's name.")


class AlertMessage(_JsonMessage):
    """Sent by ``framecap web`` on ``{prefix}/{device_id}/alerts`` (QoS 1) when an alert rule
    matches a new caption; also the body of the rule's webhook POST.

    Consecutive matching frames of one device within the rule's cooldown fold into one alert,
    so one message stands for the first frame of a run.
    """

    rule: AlertRuleRef = Field(description="The rule that matched (id and name).")
    device_id: DeviceId = Field(description="The device whose caption matched.")
    frame_id: FrameId = Field(description="The frame whose caption matched.")
    captured_at: UtcDatetime = Field(description="When the frame was captured, UTC.")
    caption: str = Field(description="The caption that matched.")
    matched_words: list[str] = Field(description="Words of the caption that matched the rule's query.")
    frame_key: str = Field(description="S3 key of the frame.")
    caption_key: str = Field(description="S3 key of the caption record.")
    url: str | None = Field(default=None, description="Link to the frame's page in framecap web, if known.")
