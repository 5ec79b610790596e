"""The SQLite caption index: one file, FTS5 full-text search, WAL, one connection per thread.

Tables:

- ``captions``: one row per ``(device_id, frame_id)``. Its rowid ``id`` is the capture time
  ``(captured_ms << 12) | k`` (``k`` tells apart frames of the same millisecond), so rowid order
  *is* time order: a date range is a rowid range on both tables, and FTS5 yields matches newest
  first without sorting. ``minute`` (UTC minute of day), ``score`` and ``error`` are plain
  columns for the other filters; indexes on ``device_id`` (with the rowid: device + time) and
  the unique ``(device_id, frame_id)``.
- ``captions_fts``: a contentless FTS5 table (``unicode61``, diacritics kept, ``'`` inside
  words, no stemming) holding each caption's words as :func:`cloud.web.query.tokenize` splits
  them, so SQL and :func:`cloud.web.query.match_caption` agree. Kept in sync by :meth:`upsert`
  (a replaced caption's old words are deleted with FTS5's ``delete`` command).
- ``devices`` (status), ``rules``, ``alert_frames`` (every (rule, frame) decided) and
  ``alert_last`` (the last alert per (rule, device)) for :meth:`SqliteIndex.claim_alert`.

Filters and ranking run in one statement; relevance is BM25 (``bm25()``), ties newest first.
The helpers :func:`to_us`, :func:`from_us`, :func:`rule_to_json`, :func:`rule_from_json`,
:func:`compile_request` and :func:`make_hit` are shared with :mod:`cloud.web.index_pg`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

from cloud.web import query as ql
from cloud.web.index import CaptionIndex, CaptionIndexError, QueryError
from cloud.web.model import (
    COUNT_CAP,
    MAX_PAGE_SIZE,
    AlertRule,
    CaptionDoc,
    DeviceSummary,
    SearchFilters,
    SearchHit,
    SearchPage,
    SearchRequest,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_K_BITS = 12  # frames per millisecond told apart in a rowid
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS captions (
    id INTEGER PRIMARY KEY,          -- (captured_ms << {_K_BITS}) | k : time order
    device_id TEXT NOT NULL,
    frame_id TEXT NOT NULL,
    captured_us INTEGER NOT NULL,    -- exact capture time, microseconds since the epoch, UTC
    minute INTEGER NOT NULL,         -- UTC minute of day 0..1439, for the time-of-day filter
    caption TEXT NOT NULL,
    score REAL,
    model TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    caption_key TEXT NOT NULL,
    error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS captions_frame ON captions(device_id, frame_id);
CREATE INDEX IF NOT EXISTS captions_device_time ON captions(device_id);
CREATE INDEX IF NOT EXISTS captions_errors ON captions(device_id) WHERE error IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS captions_fts USING fts5(
    words, tags, content='', tokenize="unicode61 remove_diacritics 0 tokenchars ''''");
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, status TEXT, status_us INTEGER);
CREATE TABLE IF NOT EXISTS rules (rule_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_frames (
    rule_id TEXT NOT NULL, device_id TEXT NOT NULL, frame_id TEXT NOT NULL,
    fired INTEGER NOT NULL, captured_us INTEGER NOT NULL,
    PRIMARY KEY (rule_id, device_id, frame_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_last (
    rule_id TEXT NOT NULL, device_id TEXT NOT NULL, captured_us INTEGER NOT NULL,
    PRIMARY KEY (rule_id, device_id)) WITHOUT ROWID;
"""

_DOC_COLS = "c.device_id, c.frame_id, c.captured_us, c.caption, c.score, c.model, c.frame_key, c.caption_key, c.error"


# -- helpers shared with the PostgreSQL backend ----------------------------------------------


def to_us(dt: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (naive is read as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """The UTC datetime of :func:`to_us`."""
    return _EPOCH + timedelta(microseconds=us)


def rule_to_json(rule: AlertRule) -> str:
    """An alert rule as JSON text (datetimes ISO 8601)."""
    body = asdict(rule)
    body["devices"] = list(rule.devices) if rule.devices is not None else None
    body["created_at"] = rule.created_at.isoformat() if rule.created_at else None
    return json.dumps(body, sort_keys=True)


def rule_from_json(text: str) -> AlertRule:
    """The alert rule of :func:`rule_to_json`."""
    body: dict[str, Any] = json.loads(text)
    if body.get("devices") is not None:
        body["devices"] = tuple(body["devices"])
    if body.get("created_at"):
        body["created_at"] = datetime.fromisoformat(body["created_at"])
    return AlertRule(**body)


def compile_request(request: SearchRequest) -> ql.Query | None:
    """The request's query parsed and widened; checks ``limit`` and ``offset``.

    Raises:
        QueryError: a bad query, ``limit`` outside 1..MAX_PAGE_SIZE or a negative offset.
    """
    if not 1 <= request.limit <= MAX_PAGE_SIZE:
        raise QueryError(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {request.limit}")
    if request.offset < 0:
        raise QueryError(f"offset must be 0 or more, not {request.offset}")
    q = ql.parse_query(request.query)
    if q is not None and request.widenings:
        q = ql.apply_widenings(q, request.widenings)
    return q


def make_hit(doc: CaptionDoc, rank: float, q: ql.Query | None) -> SearchHit:
    """A search hit with the words of ``q`` found in its caption highlighted."""
    words = ql.match_caption(q, doc.caption) or []
    return SearchHit(doc=doc, rank=rank, highlighted=ql.highlight(doc.caption, words))


def words_text(caption: str) -> str:
    """What the full-text index stores of a caption: its words, space-separated."""
    return " ".join(ql.tokenize(caption))


# -- the SQLite index -------------------------------------------------------------------------


def _device_tag(device_id: str) -> str:
    return "d" + device_id.encode().hex()


_SCORE_FLOOR = -400  # tenths of a log-probability; lower scores share this facet bucket


def _score_tenths(score: float) -> int:
    """The score's facet bucket: ``floor(score * 10)`` computed exactly, in -400..0."""
    return max(_SCORE_FLOOR, min(0, math.floor(Fraction(score) * 10)))


def _tags(device_id: str, us: int, error: str | None, score: float | None) -> str:
    """Filter facets indexed beside the words (column ``tags``), so that filters narrow the
    FTS5 match itself (a doclist intersection) rather than a row lookup per match: ``all``,
    the device, UTC hour ``hH`` and minute of the hour ``nM``, ``e`` for an error record, and
    the score's tenths bucket as integer part ``sJ`` and tenth ``tT``."""
    minute = (us // 60_000_000) % 1440
    tags = ["all", _device_tag(device_id), f"h{minute // 60}", f"n{minute % 60}"]
    if error is not None:
        tags.append("e")
    if score is not None:
        tenths = _score_tenths(score)
        tags += [f"s{-(tenths // 10)}", f"t{tenths % 10}"]
    return " ".join(tags)


def _minute_facet(ranges: list[tuple[int, int]]) -> str:
    """FTS5 expression on ``tags`` for UTC minutes of day in the half-open ``ranges``: whole
    hours by their ``hH`` token, a partial hour as ``hH AND (nA OR ...)``. Exact."""
    parts: list[str] = []
    for lo, hi in ranges:
        minute = lo
        while minute < hi:
            hour, start = divmod(minute, 60)
            stop = min(hi, (hour + 1) * 60) - hour * 60  # exclusive minute of this hour
            if start == 0 and stop == 60:
                parts.append(f'"h{hour}"')
            else:
                minutes = " OR ".join(f'"n{m}"' for m in range(start, stop))
                parts.append(f'("h{hour}" AND ({minutes}))')
            minute = hour * 60 + stop
    return " OR ".join(parts)


def _score_facet(min_score: float) -> str | None:
    """FTS5 expression on ``tags`` for ``score >= min_score``, or None when the facet buckets
    cannot say it exactly (then the caller checks the row)."""
    exact = Fraction(min_score) * 10
    k = math.floor(exact)
    if not _SCORE_FLOOR < k <= 0:
        return None
    if exact != k and Fraction(math.nextafter(min_score, -math.inf)) * 10 >= k:
        return None  # bucket k holds scores on both sides of min_score
    j, t = divmod(k, 10)
    parts = [f'"s{i}"' for i in range(0, -j)]
    if t == 0:
        parts.append(f'"s{-j}"')
    else:
        parts.append(f'("s{-j}" AND (' + " OR ".join(f'"t{x}"' for x in range(t, 10)) + "))")
    return " OR ".join(parts)


def _row_id_floor(us: int) -> int:
    return (us // 1000) << _K_BITS


def _doc(row: Sequence[Any]) -> CaptionDoc:
    device_id, frame_id, captured_us, caption, score, model, frame_key, caption_key, error = row
    return CaptionDoc(device_id=device_id, frame_id=frame_id, captured_at=from_us(captured_us),
                      caption=caption, score=score, model=model, frame_key=frame_key,
                      caption_key=caption_key, error=error)


class SqliteIndex(CaptionIndex):
    """The caption index in one SQLite file (created with its directory if absent).

    Thread-safe: each thread gets its own connection (WAL: readers never wait for the
    writer); writes take ``BEGIN IMMEDIATE``.

    Raises:
        CaptionIndexError: the file cannot be opened or holds a newer schema.
    """

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CaptionIndexError(f"cannot create the index directory {self.path.parent}: {err}") from err
        conn = self._conn()
        with self._errors("create the schema"):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CaptionIndexError(
                    f"{self.path} has index schema {version}, newer than this program's "
                    f"{SCHEMA_VERSION}; use a new file (the index can be rebuilt with a reindex)")
            upgrade = ""
            if 0 < version < SCHEMA_VERSION:  # the captions are a cache: rebuild them (rules stay)
                logger.warning("index %s: schema %s -> %s, captions dropped; they come back at the "
                               "next reindex", self.path, version, SCHEMA_VERSION)
                upgrade = "DROP TABLE IF EXISTS captions_fts; DROP TABLE IF EXISTS captions;"
            conn.executescript(f"BEGIN IMMEDIATE; {upgrade} {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    # -- connections ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise CaptionIndexError(f"the index {self.path} is closed")
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB per connection
            conn.execute("PRAGMA mmap_size=1073741824")
            conn.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as err:
            raise CaptionIndexError(f"cannot open the index {self.path}: {err}") from err
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise CaptionIndexError(f"index {self.path}: cannot {what}: {err}") from err

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; later calls raise CaptionIndexError."""
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # -- captions ---------------------------------------------------------------------
    def upsert(self, docs: Sequence[CaptionDoc]) -> int:
        """Insert or replace captions by ``(device_id, frame_id)`` in one transaction;
        returns how many were new."""
        conn = self._conn()
        new = 0
        with self._errors("store captions"), self._write(conn):
            for device_id in {d.device_id for d in docs}:
                conn.execute("INSERT OR IGNORE INTO devices(device_id) VALUES (?)", (device_id,))
            for doc in docs:
                new += self._upsert_one(conn, doc)
        return new

    def _upsert_one(self, conn: sqlite3.Connection, doc: CaptionDoc) -> int:
        us = to_us(doc.captured_at)
        words = words_text(doc.caption)
        tags = _tags(doc.device_id, us, doc.error, doc.score)
        values = (doc.device_id, doc.frame_id, us, (us // 60_000_000) % 1440, doc.caption, doc.score,
                  doc.model, doc.frame_key, doc.caption_key, doc.error)
        old = conn.execute("SELECT id, caption, captured_us, error, score FROM captions "
                           "WHERE device_id = ? AND frame_id = ?", (doc.device_id, doc.frame_id)).fetchone()
        if old is not None:
            old_id, old_caption, old_us, old_error, old_score = old
            conn.execute("INSERT INTO captions_fts(captions_fts, rowid, words, tags) VALUES ('delete', ?, ?, ?)",
                         (old_id, words_text(old_caption), _tags(doc.device_id, old_us, old_error, old_score)))
            if old_id >> _K_BITS == us // 1000:  # same millisecond: keep the rowid
                conn.execute("UPDATE captions SET device_id=?, frame_id=?, captured_us=?, minute=?, caption=?, "
                             "score=?, model=?, frame_key=?, caption_key=?, error=? WHERE id=?",
                             (*values, old_id))
                conn.execute("INSERT INTO captions_fts(rowid, words, tags) VALUES (?, ?, ?)", (old_id, words, tags))
                return 0
            conn.execute("DELETE FROM captions WHERE id = ?", (old_id,))
        floor = _row_id_floor(us)
        top = conn.execute("SELECT max(id) FROM captions WHERE id >= ? AND id < ?",
                           (floor, floor + (1 << _K_BITS))).fetchone()[0]
        row_id = floor if top is None else top + 1
        if row_id >= floor + (1 << _K_BITS):
            raise CaptionIndexError(f"more than {1 << _K_BITS} frames captured in one millisecond "
                                    f"({doc.captured_at.isoformat()}); frame {doc.device_id}/{doc.frame_id} not indexed")
        conn.execute("INSERT INTO captions(id, device_id, frame_id, captured_us, minute, caption, score, "
                     "model, frame_key, caption_key, error) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (row_id, *values))
        conn.execute("INSERT INTO captions_fts(rowid, words, tags) VALUES (?, ?, ?)", (row_id, words, tags))
        return 0 if old is not None else 1

    def get(self, device_id: str, frame_id: str) -> CaptionDoc | None:
        """One caption, or None."""
        with self._errors("read a caption"):
            row = self._conn().execute(f"SELECT {_DOC_COLS} FROM captions c WHERE device_id = ? AND frame_id = ?",
                                       (device_id, frame_id)).fetchone()
        return _doc(row) if row else None

    def count(self) -> int:
        """How many captions the index holds."""
        with self._errors("count captions"):
            return int(self._conn().execute("SELECT count(*) FROM captions").fetchone()[0])

    # -- search -----------------------------------------------------------------------
    count_cap = COUNT_CAP
    """Matches counted at most (:data:`cloud.web.model.COUNT_CAP`); an attribute so tests can
    lower it."""
    RELEVANCE_WINDOW = 10_000
    """Above this many matches, relevance ranks the newest ``RELEVANCE_WINDOW`` matches (under
    the filters; at least ``offset + limit``) instead of all: BM25 costs about 1.5 us a match,
    and past this many the first pages are ties of the same few scores anyway. ``total`` stays
    exact, and every hit satisfies every filter."""

    @staticmethod
    def _table_filters(f: SearchFilters) -> tuple[list[str], list[Any]]:
        """Date range and devices as SQL on ``captions c`` (its rowid and device index)."""
        where: list[str] = []
        params: list[Any] = []
        if f.start is not None:
            where += ["c.id >= ?", "c.captured_us >= ?"]
            params += [_row_id_floor(to_us(f.start)), to_us(f.start)]
        if f.end is not None:
            where += ["c.id < ?", "c.captured_us < ?"]
            params += [_row_id_floor(to_us(f.end) + 999), to_us(f.end)]
        if f.devices is not None:
            where.append(f"c.device_id IN ({','.join('?' * len(f.devices))})")
            params.extend(f.devices)
        return where, params

    @staticmethod
    def _fts_filters(f: SearchFilters) -> tuple[list[str], list[str], list[Any], list[str], list[Any]]:
        """Every filter for an FTS5-driven statement: facet expressions on ``tags``, rowid
        conditions (the date range) with parameters, and residual conditions on ``captions c``
        (only what facets cannot say exactly) with parameters."""
        facets: list[str] = []
        rowid: list[str] = []
        rowid_params: list[Any] = []
        residual: list[str] = []
        residual_params: list[Any] = []
        if f.start is not None:
            rowid.append("f.rowid >= ?")
            rowid_params.append(_row_id_floor(to_us(f.start)))
            if to_us(f.start) % 1000:
                residual.append("c.captured_us >= ?")
                residual_params.append(to_us(f.start))
        if f.end is not None:
            rowid.append("f.rowid < ?")
            rowid_params.append(_row_id_floor(to_us(f.end) + 999))
            if to_us(f.end) % 1000:
                residual.append("c.captured_us < ?")
                residual_params.append(to_us(f.end))
        if f.devices is not None:
            facets.append(" OR ".join(f'"{_device_tag(d)}"' for d in f.devices))
        ranges = f.utc_minute_ranges()
        if ranges is not None and ranges != [(0, 1440)]:
            facets.append(_minute_facet(ranges))
        if f.min_score is not None:
            score_facet = _score_facet(f.min_score)
            if score_facet is None:
                residual.append("c.score >= ?")
                residual_params.append(f.min_score)
            else:
                facets.append(score_facet)
        if f.errors_only:
            facets.append('"e"')
        return facets, rowid, rowid_params, residual, residual_params

    def search(self, request: SearchRequest) -> SearchPage:
        """Run a search (see :meth:`CaptionIndex.search`): filters, ranking and paging in one
        statement, the total under the same filters in a second one.

        Filters become FTS5 facet terms (device, time of day, score, error) and a rowid range
        (dates), so they narrow the match itself. A blank query filtered only by date and
        device reads ``captions`` through its indexes instead.

        Raises:
            QueryError: a bad query, limit or offset.
            CaptionIndexError: the statement failed.
        """
        q = compile_request(request)
        f = request.filters
        if f.devices is not None and not f.devices:
            return SearchPage(hits=[], total=0, limit=request.limit, offset=request.offset,
                              widened=dict(request.widenings))
        conn = self._conn()
        with self._errors("search"):
            if q is None and f.time_from_min is None and f.min_score is None and not f.errors_only:
                rows, total = self._search_table(conn, request)
                ranked = False
            else:
                rows, total = self._search_fts(conn, request, q)
                ranked = request.order == "relevance" and q is not None and ql.negated_part(q) is None
        hits = [make_hit(_doc(row[:-1]), float(row[-1]) if ranked else 0.0, q) for row in rows]
        return SearchPage(hits=hits, total=min(total, self.count_cap), limit=request.limit,
                          offset=request.offset, widened=dict(request.widenings),
                          total_exact=total <= self.count_cap)

    def _search_table(self, conn: sqlite3.Connection, request: SearchRequest) -> tuple[list[Any], int]:
        where, params = self._table_filters(request.filters)
        base = "FROM captions c" + (" WHERE " + " AND ".join(where) if where else "")
        order = "c.id ASC" if request.order == "time_asc" else "c.id DESC"
        rows = conn.execute(f"SELECT {_DOC_COLS}, 0.0 {base} ORDER BY {order} LIMIT ? OFFSET ?",
                            (*params, request.limit, request.offset)).fetchall()
        return rows, self._capped_count(conn, f"SELECT 1 {base}", params)

    def _capped_count(self, conn: sqlite3.Connection, select: str, params: Sequence[Any]) -> int:
        """Rows of ``select``, counted up to ``count_cap + 1`` (more means "over the cap")."""
        return int(conn.execute(f"SELECT count(*) FROM ({select} LIMIT ?)",
                                (*params, self.count_cap + 1)).fetchone()[0])

    def _search_fts(self, conn: sqlite3.Connection, request: SearchRequest,
                    q: ql.Query | None) -> tuple[list[Any], int]:
        facets, rowid, rowid_params, residual, residual_params = self._fts_filters(request.filters)
        negated = ql.negated_part(q) if q is not None else None
        if q is None:
            match = ['tags : "all"']
        elif negated is not None:
            match = [f'(tags : "all") NOT (words : ({ql.to_fts5(negated)}))']
        else:
            match = [f"words : ({ql.to_fts5(q)})"]
        match += [f"tags : ({x})" for x in facets]
        fts_cond = " AND ".join(["captions_fts MATCH ?", *rowid])
        fts_params: list[Any] = [" AND ".join(f"({m})" for m in match), *rowid_params]
        cond = " AND ".join([fts_cond, *residual])
        params = [*fts_params, *residual_params]
        joined = f"FROM captions_fts f CROSS JOIN captions c ON c.id = f.rowid WHERE {cond}"
        count_from = joined if residual else f"FROM captions_fts f WHERE {fts_cond}"
        total = self._capped_count(conn, f"SELECT 1 {count_from}", params)
        page = (request.limit, request.offset)
        if request.order != "relevance" or q is None or negated is not None:
            order = "f.rowid ASC" if request.order == "time_asc" else "f.rowid DESC"
            rows = conn.execute(f"SELECT {_DOC_COLS}, 0.0 {joined} ORDER BY {order} LIMIT ? OFFSET ?",
                                (*params, *page)).fetchall()
            return rows, total
        window = max(self.RELEVANCE_WINDOW, request.offset + request.limit)
        if total > window:  # rank the newest `window` matches only (see RELEVANCE_WINDOW)
            oldest = conn.execute(f"SELECT f.rowid {count_from} ORDER BY f.rowid DESC LIMIT 1 OFFSET ?",
                                  (*params, window - 1)).fetchone()
            if oldest is not None:
                fts_cond += " AND f.rowid >= ?"
                fts_params.append(oldest[0])
                joined += " AND f.rowid >= ?"
                params.append(oldest[0])
        bm25 = "bm25(captions_fts, 1.0, 0.0)"
        if residual:  # the row decides: rank with the join
            rows = conn.execute(f"SELECT {_DOC_COLS}, -{bm25} {joined} ORDER BY {bm25} ASC, f.rowid DESC "
                                "LIMIT ? OFFSET ?", (*params, *page)).fetchall()
        else:  # rank in the FTS5 table alone, then read the page's rows
            rows = conn.execute(
                f"WITH top AS (SELECT f.rowid AS id, {bm25} AS b FROM captions_fts f WHERE {fts_cond} "
                "ORDER BY b ASC, f.rowid DESC LIMIT ? OFFSET ?) "
                f"SELECT {_DOC_COLS}, -top.b FROM top CROSS JOIN captions c ON c.id = top.id "
                "ORDER BY top.b ASC, top.id DESC", (*fts_params, *page)).fetchall()
        return rows, total

    # -- timeline ---------------------------------------------------------------------
    def timeline(self, device_id: str, start: datetime, end: datetime, *, limit: int = 500,
                 offset: int = 0) -> list[CaptionDoc]:
        """Captions of one device captured in ``[start, end)``, oldest first."""
        with self._errors("read a timeline"):
            rows = self._conn().execute(
                f"SELECT {_DOC_COLS} FROM captions c WHERE device_id = ? AND id >= ? AND id < ? "
                "AND captured_us >= ? AND captured_us < ? ORDER BY id LIMIT ? OFFSET ?",
                (device_id, _row_id_floor(to_us(start)), _row_id_floor(to_us(end) + 999),
                 to_us(start), to_us(end), limit, offset)).fetchall()
        return [_doc(r) for r in rows]

    def _counts(self, device_id: str, start: datetime, end: datetime, key_sql: str) -> list[tuple[Any, int]]:
        with self._errors("count captions"):
            return self._conn().execute(
                f"SELECT {key_sql} AS k, count(*) FROM captions WHERE device_id = ? AND id >= ? AND id < ? "
                "AND captured_us >= ? AND captured_us < ? GROUP BY k",
                (device_id, _row_id_floor(to_us(start)), _row_id_floor(to_us(end) + 999),
                 to_us(start), to_us(end))).fetchall()

    def counts_by_hour(self, device_id: str, start: datetime, end: datetime,
                       tz_offset_min: int = 0) -> dict[int, int]:
        """Caption counts per local hour (0..23) at UTC offset ``tz_offset_min``."""
        shift = int(tz_offset_min) * 60_000_000
        rows = self._counts(device_id, start, end, f"((captured_us + {shift}) / 3600000000) % 24")
        return {int(k): int(n) for k, n in rows}

    def counts_by_day(self, device_id: str, start: datetime, end: datetime,
                      tz_offset_min: int = 0) -> dict[str, int]:
        """Caption counts per local day ``YYYY-MM-DD`` at UTC offset ``tz_offset_min``."""
        shift = int(tz_offset_min) * 60_000_000
        rows = self._counts(device_id, start, end,
                            f"date((captured_us + {shift}) / 1000000, 'unixepoch')")
        return {str(k): int(n) for k, n in rows}

    # -- devices ----------------------------------------------------------------------
    def set_status(self, device_id: str, status: str, at: datetime) -> None:
        """Record a device's retained status heard at ``at``."""
        conn = self._conn()
        with self._errors("store a device status"), self._write(conn):
            conn.execute("INSERT INTO devices(device_id, status, status_us) VALUES (?, ?, ?) "
                         "ON CONFLICT(device_id) DO UPDATE SET status = excluded.status, "
                         "status_us = excluded.status_us", (device_id, status, to_us(at)))

    def devices(self, allowed: Sequence[str] | None, *, today_start: datetime) -> list[DeviceSummary]:
        """Every known device (restricted to ``allowed`` unless None), sorted by device_id."""
        conn = self._conn()
        sql = "SELECT device_id, status, status_us FROM devices"
        params: list[Any] = []
        if allowed is not None:
            if not allowed:
                return []
            sql += f" WHERE device_id IN ({','.join('?' * len(allowed))})"
            params = list(allowed)
        out: list[DeviceSummary] = []
        with self._errors("list devices"):
            for device_id, status, status_us in conn.execute(sql + " ORDER BY device_id", params).fetchall():
                row = conn.execute(f"SELECT {_DOC_COLS} FROM captions c WHERE device_id = ? "
                                   "ORDER BY id DESC LIMIT 1", (device_id,)).fetchone()
                today = conn.execute("SELECT count(*) FROM captions WHERE device_id = ? AND id >= ? "
                                     "AND captured_us >= ?",
                                     (device_id, _row_id_floor(to_us(today_start)), to_us(today_start))).fetchone()[0]
                latest = _doc(row) if row else None
                out.append(DeviceSummary(
                    device_id=device_id, status=status,
                    status_at=from_us(status_us) if status_us is not None else None,
                    last_seen=latest.captured_at if latest else None, latest=latest,
                    frames_today=int(today)))
        return out

    # -- alert rules ------------------------------------------------------------------
    def save_rule(self, rule: AlertRule) -> None:
        """Create or replace a rule by ``rule_id``."""
        conn = self._conn()
        with self._errors("save a rule"), self._write(conn):
            conn.execute("INSERT INTO rules(rule_id, body) VALUES (?, ?) ON CONFLICT(rule_id) "
                         "DO UPDATE SET body = excluded.body", (rule.rule_id, rule_to_json(rule)))

    def delete_rule(self, rule_id: str) -> bool:
        """Delete a rule and its alert history; True if it existed."""
        conn = self._conn()
        with self._errors("delete a rule"), self._write(conn):
            gone = conn.execute("DELETE FROM rules WHERE rule_id = ?", (rule_id,)).rowcount
            conn.execute("DELETE FROM alert_frames WHERE rule_id = ?", (rule_id,))
            conn.execute("DELETE FROM alert_last WHERE rule_id = ?", (rule_id,))
        return gone > 0

    def rules(self) -> list[AlertRule]:
        """Every rule, sorted by rule_id."""
        with self._errors("read rules"):
            rows = self._conn().execute("SELECT body FROM rules ORDER BY rule_id").fetchall()
        return [rule_from_json(body) for (body,) in rows]

    def recent_alerts(self, allowed: Sequence[str] | None, *, limit: int = 20) -> list[tuple[str, CaptionDoc]]:
        """The newest fired alerts as ``(rule_id, caption)``, newest capture first."""
        where = "a.fired = 1"
        params: list[Any] = []
        if allowed is not None:
            if not allowed:
                return []
            where += f" AND a.device_id IN ({','.join('?' * len(allowed))})"
            params.extend(allowed)
        sql = (f"SELECT a.rule_id, {_DOC_COLS} FROM alert_frames a JOIN captions c "
               f"ON c.device_id = a.device_id AND c.frame_id = a.frame_id WHERE {where} "
               "ORDER BY a.captured_us DESC LIMIT ?")
        with self._errors("read recent alerts"):
            rows = self._conn().execute(sql, (*params, limit)).fetchall()
        return [(str(row[0]), _doc(row[1:])) for row in rows]

    def claim_alert(self, rule_id: str, doc: CaptionDoc, cooldown_s: float) -> bool:
        """True exactly once per (rule, frame), and only when the rule's last alert for the
        device is more than ``cooldown_s`` older than ``doc.captured_at`` (one ``BEGIN
        IMMEDIATE`` transaction: every thread and process on this file agrees)."""
        conn = self._conn()
        us = to_us(doc.captured_at)
        with self._errors("claim an alert"), self._write(conn):
            seen = conn.execute("SELECT 1 FROM alert_frames WHERE rule_id = ? AND device_id = ? AND frame_id = ?",
                                (rule_id, doc.device_id, doc.frame_id)).fetchone()
            if seen is not None:
                return False
            last = conn.execute("SELECT captured_us FROM alert_last WHERE rule_id = ? AND device_id = ?",
                                (rule_id, doc.device_id)).fetchone()
            fire = last is None or us - last[0] > cooldown_s * 1_000_000
            conn.execute("INSERT INTO alert_frames(rule_id, device_id, frame_id, fired, captured_us) "
                         "VALUES (?, ?, ?, ?, ?)", (rule_id, doc.device_id, doc.frame_id, int(fire), us))
            if fire:
                conn.execute("INSERT INTO alert_last(rule_id, device_id, captured_us) VALUES (?, ?, ?) "
                             "ON CONFLICT(rule_id, device_id) DO UPDATE SET captured_us = excluded.captured_us",
                             (rule_id, doc.device_id, us))
        return fire
