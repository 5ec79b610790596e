"""MQTT topics and S3 object keys: the contract of ../shared/DESIGN.md, defined in one place.

Topics (prefix configurable, default ``framecap``)::

    {prefix}/{device_id}/frames     edge -> ingest     JPEG bytes, metadata as MQTT v5 user properties
    {prefix}/{device_id}/acks       ingest -> edge     JSON FrameAck
    {prefix}/{device_id}/captions   worker -> edge     JSON CaptionRecord
    {prefix}/{device_id}/status     edge (retained)    ``online`` / ``offline`` (last will)
    {prefix}/{device_id}/alerts     web -> anyone      JSON AlertMessage (an alert rule matched a caption)

Object keys (bucket configurable, default ``framecap``)::

    frames/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.jpg
    captions/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.json

Every device_id and frame_id is validated with :func:`validate_id` so that none can escape its
topic level (``/``, ``+``, ``#``) or its object key (``..``, control characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone

FRAMES = "frames"
ACKS = "acks"
CAPTIONS = "captions"
STATUS = "status"
ALERTS = "alerts"
KINDS = (FRAMES, ACKS, CAPTIONS, STATUS, ALERTS)

FRAMES_PREFIX = "frames/"
CAPTIONS_PREFIX = "captions/"

MAX_ID_LENGTH = 128
# \Z, not $: "$" also matches before a trailing newline, which would let "cam1\n" through.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*\Z")
_FRAME_KEY_RE = re.compile(
    r"^frames/(?P<device_id>[^/]+)/(?P<year>\d{4})/(?P<month>\d{2})/(?P<day>\d{2})/"
    r"(?P<frame_id>[^/]+)\.jpg\Z"
)


class InvalidIdError(ValueError):
    """A device_id, frame_id, topic or object key that breaks the contract."""


def validate_id(value: object, kind: str = "id") -> str:
    """Return ``value`` if it is a safe device_id or frame_id, else raise.

    A safe id is 1..128 characters of ``[A-Za-z0-9._-]``, starts with a letter or digit and
    contains no ``..``; so it can never add a topic level (``/``), a wildcard (``+``, ``#``),
    a path step (``..``) or a control character (NUL included) to a topic or an object key.

    Raises:
        InvalidIdError: naming ``kind`` (``device_id``, ``frame_id``) and the reason.
    """
    if not isinstance(value, str):
        raise InvalidIdError(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidIdError(f"{kind} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(f"{kind} is {len(value)} characters long, the limit is {MAX_ID_LENGTH}")
    if ".." in value:
        raise InvalidIdError(f"{kind} {value!r} contains '..'")
    if not _ID_RE.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9._-]", c)})
        shown = ", ".join(repr(c) for c in bad) or "a leading '.', '_' or '-'"
        raise InvalidIdError(
            f"{kind} {value!r} may hold only letters, digits, '.', '_' and '-' "
            f"and must start with a letter or digit (found {shown})"
        )
    return value


def validate_prefix(prefix: str) -> str:
    """Check a topic prefix (one or more safe levels joined by ``/``).

    Raises:
        InvalidIdError: if a level is empty, holds a wildcard or ``..``, or starts with ``$``.
    """
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or ".." in prefix:
        raise InvalidIdError(
            f"topic prefix {prefix!r} must be levels of letters, digits, '.', '_' and '-' "
            "joined by '/', without wildcards, '$' or '..'"
        )
    return prefix


@dataclass(frozen=True)
class Topics:
    """Builds and parses the project's MQTT topics under one prefix."""

    prefix: str = "framecap"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def topic(self, device_id: str, kind: str) -> str:
        """``{prefix}/{device_id}/{kind}``; raises InvalidIdError on a bad device_id or kind."""
        if kind not in KINDS:
            raise InvalidIdError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
        return f"{self.prefix}/{validate_id(device_id, 'device_id')}/{kind}"

    def frames(self, device_id: str) -> str:
        return self.topic(device_id, FRAMES)

    def acks(self, device_id: str) -> str:
        return self.topic(device_id, ACKS)

    def captions(self, device_id: str) -> str:
        return self.topic(device_id, CAPTIONS)

    def status(self, device_id: str) -> str:
        return self.topic(device_id, STATUS)

    def alerts(self, device_id: str) -> str:
        """``{prefix}/{device_id}/alerts``: alerts raised by ``framecap web`` on this device's captions."""
        return self.topic(device_id, ALERTS)

    def all_devices(self, kind: str) -> str:
        """Topic filter for one kind of every device: ``{prefix}/+/{kind}``."""
        if kind not in KINDS:
            raise InvalidIdError(f"unknown topic kind {kind!r}")
        return f"{self.prefix}/+/{kind}"

    def shared(self, group: str, kind: str) -> str:
        """Shared-subscription filter ``$share/{group}/{prefix}/+/{kind}`` (MQTT v5, 4.8.2)."""
        return f"$share/{validate_id(group, 'share group')}/{self.all_devices(kind)}"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a concrete topic into ``(device_id, kind)``.

        Raises:
            InvalidIdError: if the topic is not ``{prefix}/{device_id}/{kind}`` with a safe id.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise InvalidIdError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[1] not in KINDS:
            raise InvalidIdError(f"topic {topic!r} is not {head}{{device_id}}/{{kind}}")
        return validate_id(parts[0], "device_id"), parts[1]


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise InvalidIdError("captured_at must be timezone-aware (UTC)")
    return ts.astimezone(timezone.utc)


def frame_key(device_id: str, frame_id: str, captured_at: datetime) -> str:
    """``frames/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.jpg`` (date of captured_at in UTC)."""
    day = _utc(captured_at)
    return (
        f"{FRAMES_PREFIX}{validate_id(device_id, 'device_id')}/"
        f"{day:%Y/%m/%d}/{validate_id(frame_id, 'frame_id')}.jpg"
    )


def caption_key(device_id: str, frame_id: str, captured_at: datetime) -> str:
    """``captions/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.json``."""
    day = _utc(captured_at)
    return (
        f"{CAPTIONS_PREFIX}{validate_id(device_id, 'device_id')}/"
        f"{day:%Y/%m/%d}/{validate_id(frame_id, 'frame_id')}.json"
    )


@dataclass(frozen=True)
class FrameKey:
    """The parts of a ``frames/...`` object key."""

    device_id: str
    year: int
    month: int
    day: int
    frame_id: str

    def date_error(self) -> str | None:
        """Why the key's ``YYYY/MM/DD`` is not a calendar date (month 13, February 30), or None."""
        try:
            date(self.year, self.month, self.day)
        except ValueError as err:
            return f"key date {self.year:04d}/{self.month:02d}/{self.day:02d} is not a date: {err}"
        return None

    @property
    def caption_key(self) -> str:
        """The matching ``captions/...json`` key."""
        return (
            f"{CAPTIONS_PREFIX}{self.device_id}/{self.year:04d}/{self.month:02d}/"
            f"{self.day:02d}/{self.frame_id}.json"
        )


def parse_frame_key(key: str, *, check_date: bool = True) -> FrameKey:
    """Parse ``frames/{device_id}/{YYYY}/{MM}/{DD}/{frame_id}.jpg``.

    ``check_date=False`` accepts a ``YYYY/MM/DD`` that is no calendar date (the caption worker
    still derives the caption key, to write an error record there; see
    :meth:`FrameKey.date_error`).

    Raises:
        InvalidIdError: if the key does not follow the contract, holds an unsafe id or (with
            ``check_date``) an impossible date such as month 13 or February 30.
    """
    m = _FRAME_KEY_RE.match(key)
    if not m:
        raise InvalidIdError(
            f"object key {key!r} is not frames/{{device_id}}/YYYY/MM/DD/{{frame_id}}.jpg"
        )
    frame = FrameKey(
        device_id=validate_id(m["device_id"], "device_id"),
        year=int(m["year"]),
        month=int(m["month"]),
        day=int(m["day"]),
        frame_id=validate_id(m["frame_id"], "frame_id"),
    )
    error = frame.date_error() if check_date else None
    if error is not None:
        raise InvalidIdError(f"object key {key!r}: {error}")
    return frame
