"""The caption index: one small interface, two backends.

- SQLite with FTS5 (stdlib ``sqlite3``), a file under the state dir: one web replica.
  :mod:`cloud.web.index_sqlite`.
- PostgreSQL full-text search (psycopg 3): several web replicas share it.
  :mod:`cloud.web.index_pg`.

:func:`open_index` picks one from a location: a ``postgresql://`` URL, else a file path.

Every write is idempotent, keyed by ``(device_id, frame_id)``: a caption heard on MQTT and again
at a reindex from S3 is one row. The index is a cache of S3 ``captions/``; it can always be
rebuilt. Filters are applied in the same SQL statement as the ranking, never to a top-N after.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cloud.web.model import AlertRule, CaptionDoc, DeviceSummary, SearchPage, SearchRequest


class CaptionIndexError(RuntimeError):
    """The index cannot be opened or a statement failed (the message says which and why)."""


class QueryError(ValueError):
    """A search query that cannot be parsed or run; the message is for the user (a 400)."""


class CaptionIndex(abc.ABC):
    """What the web process asks of its caption index. Thread-safe."""

    backend: str = "?"

    # -- captions ----------------------------------------------------------------------
    @abc.abstractmethod
    def upsert(self, docs: Sequence[CaptionDoc]) -> int:
        """Insert or replace captions keyed by ``(device_id, frame_id)``; returns how many rows
        were new (not replacements). One transaction for the batch."""

    @abc.abstractmethod
    def get(self, device_id: str, frame_id: str) -> CaptionDoc | None:
        """One caption, or None."""

    @abc.abstractmethod
    def search(self, request: SearchRequest) -> SearchPage:
        """Run a search: parse ``request.query`` (:mod:`cloud.web.query`), apply every filter
        of ``request.filters`` in the same statement as the ranking, order, page.

        Raises:
            QueryError: the query cannot be parsed (unbalanced quotes, NOT alone...).
        """

    @abc.abstractmethod
    def timeline(self, device_id: str, start: datetime, end: datetime, *, limit: int = 500,
                 offset: int = 0) -> list[CaptionDoc]:
        """Captions of one device captured in ``[start, end)`` (UTC), oldest first."""

    @abc.abstractmethod
    def counts_by_hour(self, device_id: str, start: datetime, end: datetime,
                       tz_offset_min: int = 0) -> dict[int, int]:
        """Caption counts of one device in ``[start, end)`` per local hour (0..23) of the viewer
        at UTC offset ``tz_offset_min``; hours without captions are absent."""

    @abc.abstractmethod
    def counts_by_day(self, device_id: str, start: datetime, end: datetime,
                      tz_offset_min: int = 0) -> dict[str, int]:
        """Caption counts of one device in ``[start, end)`` per local day ``YYYY-MM-DD``."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many captions the index holds."""

    # -- devices -----------------------------------------------------------------------
    @abc.abstractmethod
    def set_status(self, device_id: str, status: str, at: datetime) -> None:
        """Record a device's retained status (``online``/``offline``) heard at ``at``."""

    @abc.abstractmethod
    def devices(self, allowed: Sequence[str] | None, *, today_start: datetime) -> list[DeviceSummary]:
        """Every known device (with a caption or a status), restricted to ``allowed`` unless
        None, sorted by device_id; ``frames_today`` counts captions since ``today_start``."""

    # -- alert rules -------------------------------------------------------------------
    @abc.abstractmethod
    def save_rule(self, rule: AlertRule) -> None:
        """Create or replace a rule (by ``rule_id``)."""

    @abc.abstractmethod
    def delete_rule(self, rule_id: str) -> bool:
        """Delete a rule; True if it existed."""

    @abc.abstractmethod
    def rules(self) -> list[AlertRule]:
        """Every rule, sorted by rule_id."""

    @abc.abstractmethod
    def claim_alert(self, rule_id: str, doc: CaptionDoc, cooldown_s: float) -> bool:
        """Decide, atomically across every replica sharing this index, whether ``doc`` raises an
        alert for ``rule_id``: True exactly once per (rule, frame), and only if the rule's last
        alert for ``doc.device_id`` was more than ``cooldown_s`` before ``doc.captured_at``
        (consecutive matches fold into one alert). A frame that was folded is remembered too,
        so a second replica never sends it."""

    @abc.abstractmethod
    def recent_alerts(self, allowed: Sequence[str] | None, *, limit: int = 20) -> list[tuple[str, CaptionDoc]]:
        """The newest alerts that fired (not the folded frames), newest capture first, as
        ``(rule_id, caption)`` pairs, restricted to the devices ``allowed`` unless None."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


def open_index(location: str | Path) -> CaptionIndex:
    """The index at ``location``: ``postgresql://...`` (or ``postgres://``) for PostgreSQL,
    else a SQLite file path (its directory is created).

    Raises:
        CaptionIndexError: it cannot be opened (the reason names the location, never a password).
    """
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from cloud.web.index_pg import PostgresIndex

        return PostgresIndex(text)
    from cloud.web.index_sqlite import SqliteIndex

    return SqliteIndex(Path(text))
