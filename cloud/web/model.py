"""Plain objects of ``framecap web``: what the index stores, what a search asks and answers.

Every datetime here is timezone-aware UTC. Pages convert to the viewer's local time; a time of
day filter carries the viewer's UTC offset (:attr:`SearchFilters.tz_offset_min`) so that
"22:00-06:00" means the viewer's night.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from common.messages import CaptionRecord

MAX_PAGE_SIZE = 500
"""Most results one search page may ask for (``limit``); more is a 422."""

COUNT_CAP = 10_000
"""Matches are counted up to this many; beyond, :attr:`SearchPage.total` is this number and
``total_exact`` False ("10,000+"): counting every match of a word in most captions would cost
more than ranking the page (search engines report "about N" for the same reason)."""

Order = Literal["relevance", "time", "time_asc"]


@dataclass(frozen=True)
class CaptionDoc:
    """One frame's caption as indexed, keyed by ``(device_id, frame_id)``.

    ``captured_at`` is UTC (the caption record's, else the frame key's date at midnight);
    ``score`` is the caption's natural-log probability (<= 0) or None on an error record;
    ``error`` is why the frame has no caption (then ``caption`` is empty).
    """

    device_id: str
    frame_id: str
    captured_at: datetime
    caption: str
    score: float | None
    model: str
    frame_key: str
    caption_key: str
    error: str | None = None

    @classmethod
    def from_record(cls, record: CaptionRecord) -> CaptionDoc:
        """From a caption record (MQTT ``captions`` topic or ``captions/...json``)."""
        captured = record.captured_at
        if captured is None:  # the worker knows it from the frame key; fall back to that day
            parts = record.frame_key.split("/")
            try:
                captured = datetime(int(parts[2]), int(parts[3]), int(parts[4]), tzinfo=timezone.utc)
            except (IndexError, ValueError):
                captured = datetime(1970, 1, 1, tzinfo=timezone.utc)
        return cls(
            device_id=record.device_id,
            frame_id=record.frame_id,
            captured_at=captured.astimezone(timezone.utc),
            caption=record.caption,
            score=record.score,
            model=record.model,
            frame_key=record.frame_key,
            caption_key=record.caption_key,
            error=record.error,
        )


@dataclass(frozen=True)
class SearchFilters:
    """Filters applied *before* ranking (never to a top-N after it).

    Attributes:
        devices: the devices to search; None means every device (an admin). A viewer's request
            always carries its allowed devices, intersected with what it asked for.
        start, end: capture time range, UTC, ``start`` inclusive, ``end`` exclusive.
        time_from_min, time_to_min: time of day in the viewer's local time, minutes since
            midnight (0..1439); ``from > to`` wraps midnight (22:00-06:00 is 1320..360).
        tz_offset_min: the viewer's UTC offset in minutes (UTC+2 is 120), used for time of day.
        min_score: only captions with ``score >= min_score`` (log-probability, <= 0).
        errors_only: only error records (frames that could not be captioned).
    """

    devices: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    time_from_min: int | None = None
    time_to_min: int | None = None
    tz_offset_min: int = 0
    min_score: float | None = None
    errors_only: bool = False

    def utc_minute_ranges(self) -> list[tuple[int, int]] | None:
        """The time-of-day filter as half-open ranges of UTC minute-of-day ``[lo, hi)``.

        None when there is no time-of-day filter. A range that wraps midnight (in local time
        or after shifting to UTC) is split in two, so each range has ``0 <= lo < hi <= 1440``.
        """
        if self.time_from_min is None or self.time_to_min is None:
            return None
        lo = (self.time_from_min - self.tz_offset_min) % 1440
        hi = (self.time_to_min - self.tz_offset_min) % 1440
        if lo == hi:
            return [(0, 1440)]
        if lo < hi:
            return [(lo, hi)]
        return [(lo, 1440), (0, hi)]


@dataclass(frozen=True)
class SearchRequest:
    """A search: the query text (see :mod:`cloud.web.query`), filters, order and one page.

    An empty ``query`` matches every caption (browse with filters). ``order`` is
    ``relevance`` (BM25 in SQLite, ``ts_rank`` in PostgreSQL; newest first among ties),
    ``time`` (newest first) or ``time_asc``.
    """

    query: str = ""
    filters: SearchFilters = field(default_factory=SearchFilters)
    order: Order = "relevance"
    limit: int = 50
    offset: int = 0
    widenings: dict[str, list[str]] = field(default_factory=dict)
    """Query word -> word-map words it is widened to (:mod:`cloud.web.widening`); each such
    word matches as ``(word OR w1 OR w2 ...)``. Returned as :attr:`SearchPage.widened`."""


@dataclass(frozen=True)
class SearchHit:
    """One result: the caption, its rank (higher is better; 0 when ordered by time) and the
    caption with matched words wrapped in ``<mark>...</mark>`` (the rest HTML-escaped)."""

    doc: CaptionDoc
    rank: float
    highlighted: str


@dataclass(frozen=True)
class SearchPage:
    """One page of results and the number of matches under the filters (exact up to
    :data:`COUNT_CAP`, then a lower bound with ``total_exact`` False)."""

    hits: list[SearchHit]
    total: int
    limit: int
    offset: int
    widened: dict[str, list[str]] = field(default_factory=dict)
    """Query words outside the model's word map and the word-map words they were widened to."""
    total_exact: bool = True
    """False when more than :data:`COUNT_CAP` captions match: ``total`` is then a lower bound."""


@dataclass(frozen=True)
class DeviceSummary:
    """A device as the devices page shows it."""

    device_id: str
    status: str | None  # "online" / "offline" (retained status topic), None if never heard
    status_at: datetime | None  # when that status was last received, UTC
    last_seen: datetime | None  # newest caption's captured_at, UTC
    latest: CaptionDoc | None
    frames_today: int  # captions captured since the viewer's local midnight


@dataclass(frozen=True)
class AlertRule:
    """A saved search that raises alerts.

    Attributes:
        rule_id: a safe id (``[A-Za-z0-9._-]``, see :func:`common.topics.validate_id`).
        name: shown on pages and in alert payloads.
        query: search syntax of :mod:`cloud.web.query` (widened like a search).
        devices: the devices it watches; None for every device the owner may see.
        min_score: only captions with at least this log-probability.
        cooldown_s: consecutive matching frames of one device within this many seconds of the
            last alert fold into it (a static scene repeats its caption every interval).
        webhook_url: where to POST the alert (HMAC-SHA256 signed), if set.
        owner: the account that made it; its devices bound what the rule sees.
    """

    rule_id: str
    name: str
    query: str
    devices: tuple[str, ...] | None = None
    min_score: float | None = None
    cooldown_s: float = 300.0
    webhook_url: str | None = None
    owner: str = "admin"
    created_at: datetime | None = None


@dataclass(frozen=True)
class AlertEvent:
    """An alert that fired: the rule, the caption that matched and the words that matched."""

    rule: AlertRule
    doc: CaptionDoc
    matched_words: list[str]
    fired_at: datetime
