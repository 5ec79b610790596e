"""What every route of ``framecap web`` depends on: the context, the user, the filters.

- :class:`WebContext`: the process's index, S3 store, accounts, live hub, metrics, optional
  attention and widening services and feed status; one per app (``app.state.ctx``).
- :func:`get_ctx`, :func:`current_user`, :func:`require_admin`: FastAPI dependencies.
  ``current_user`` takes the session cookie or HTTP Basic; without either an API call gets a
  401 with ``WWW-Authenticate: Basic`` and a page raises :class:`LoginRequired` (the app
  redirects to ``/login?next=...``).
- :func:`check_device`, :func:`allowed_devices`, :func:`get_doc`: access checks. A device (or
  frame) the user may not see answers exactly like one that does not exist (404), so a viewer
  never learns what else exists.
- :func:`parse_filters` and friends: the search/timeline parameters shared by the API and the
  pages (devices, date range, time of day across midnight, UTC offset, minimum score, errors
  only). Bad values raise :class:`fastapi.HTTPException` 422 (400 for a bad query) with a
  message for the user.
- :func:`run_search`: widening, a viewer's device bound, metrics and error mapping around
  :meth:`CaptionIndex.search`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Any, Protocol
from urllib.parse import quote

from fastapi import Depends, HTTPException, Query, Request

from cloud.web.auth import SESSION_USER_KEY, Account, Accounts
from cloud.web.index import CaptionIndex, CaptionIndexError, QueryError
from cloud.web.live import LiveHub
from cloud.web.metrics import WebMetrics
from cloud.web.model import (
    MAX_PAGE_SIZE,
    CaptionDoc,
    Order,
    SearchFilters,
    SearchPage,
    SearchRequest,
)
from cloud.web.thumbnails import ThumbnailCache
from common.topics import InvalidIdError, validate_id

logger = logging.getLogger(__name__)

MAX_TZ_OFFSET_MIN = 14 * 60
"""Largest UTC offset accepted (UTC+14, Kiribati), in minutes either way."""
EXPORT_MAX = 10_000
"""Most results one export holds."""


class FrameStore(Protocol):
    """What the web process needs of S3 (:class:`common.storage.ObjectStore` fits)."""

    def get_object(self, key: str) -> Any:
        """The object (``.body`` bytes, ``.metadata``, ``.content_type``, ``.etag``).

        Raises ``common.storage.ObjectNotFoundError`` / ``StorageError``."""


def no_feed_status() -> dict[str, Any]:
    """Feed status when no feed runs (tests, an index browsed offline)."""
    return {"mqtt_connected": False, "s3_ok": False, "last_caption_at": None,
            "behind": "no feed is running: the index is not being updated"}


@dataclass(kw_only=True)
class WebContext:
    """Everything the routes of one web app use. Built by the CLI (or a test) and handed to
    :func:`cloud.web.app.create_app`.

    Attributes:
        index: the caption index (SQLite or PostgreSQL).
        accounts: who may log in, and their roles and devices.
        session_secret: key signing the session cookie (keep it secret, the same on every
            replica behind one address).
        store: S3, where frame JPEGs are read (served through the API, never a public bucket);
            None when S3 is not configured (frames then answer 503).
        live: the hub the feed publishes new captions to (``/api/v1/live``).
        attention: an ``AttentionService`` (``attention(doc, jpeg) -> dict``), or None (503).
        widener: a ``QueryWidener`` (``widen(words) -> {word: [words]}``), or None.
        feed_status: returns ``{mqtt_connected, s3_ok, last_caption_at, behind}`` (``behind``
            a sentence for the pages, or None when the feed is current).
        alert_rules_changed: called after a rule is created or deleted (the alert engine
            reloads), or None.
        public_url: the address users reach the app at (``https://cams.example.org``), used
            in absolute links; None gives relative links.
        https_only: the session cookie is sent over HTTPS only.
        metrics: the process's Prometheus metrics (shared with the feed and alerts).
        thumbnails: the thumbnail cache.
        export_max: most results one export holds.
    """

    index: CaptionIndex
    accounts: Accounts
    session_secret: str
    store: FrameStore | None = None
    live: LiveHub = field(default_factory=LiveHub)
    attention: Any | None = None
    widener: Any | None = None
    feed_status: Callable[[], dict[str, Any]] = no_feed_status
    alert_rules_changed: Callable[[], None] | None = None
    public_url: str | None = None
    https_only: bool = False
    metrics: WebMetrics = field(default_factory=WebMetrics)
    thumbnails: ThumbnailCache = field(default_factory=ThumbnailCache)
    export_max: int = EXPORT_MAX
    _known_devices: set[str] = field(default_factory=set, repr=False)
    _known_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def link(self, path: str) -> str:
        """``path`` (starting with ``/``) as a link: absolute under :attr:`public_url` if set."""
        return (self.public_url.rstrip("/") + path) if self.public_url else path

    def device_known(self, device_id: str) -> bool:
        """Whether the index knows ``device_id`` (a caption or a status). Known devices are
        remembered (devices do not disappear), so only an unknown id costs a query."""
        with self._known_lock:
            if device_id in self._known_devices:
                return True
        try:
            found = self.index.devices([device_id], today_start=datetime.now(timezone.utc))
        except CaptionIndexError as err:
            raise HTTPException(503, f"the caption index is unavailable: {err}") from err
        if any(d.device_id == device_id for d in found):
            with self._known_lock:
                self._known_devices.add(device_id)
            return True
        return False

    def feed(self) -> dict[str, Any]:
        """:attr:`feed_status`, never raising (a broken callback reads as "behind")."""
        try:
            return dict(self.feed_status())
        except Exception as err:  # noqa: BLE001 - a status page must not fail
            logger.exception("feed status callback failed")
            return {"mqtt_connected": False, "s3_ok": False, "last_caption_at": None,
                    "behind": f"the feed status is unknown: {err}"}


class LoginRequired(Exception):
    """A page was asked for without a login; the app answers a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url

    @property
    def location(self) -> str:
        return f"/login?next={quote(self.next_url, safe='/')}"


# -- context and user ------------------------------------------------------------------


def get_ctx(request: Request) -> WebContext:
    """The app's :class:`WebContext` (FastAPI dependency)."""
    ctx: WebContext = request.app.state.ctx
    return ctx


def is_api_request(request: Request) -> bool:
    """True for ``/api/...`` (JSON answers, 401 instead of a redirect to the login page)."""
    return request.url.path.startswith("/api/")


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as err:
        raise HTTPException(401, "the Authorization header is not valid Basic credentials",
                            headers={"WWW-Authenticate": 'Basic realm="framecap"'}) from err
    name, sep, password = decoded.partition(":")
    if not sep:
        raise HTTPException(401, "Basic credentials must be user:password",
                            headers={"WWW-Authenticate": 'Basic realm="framecap"'})
    return name, password


def optional_user(request: Request) -> Account | None:
    """The logged-in account (session cookie, else HTTP Basic), or None.

    Raises:
        HTTPException: 401 for HTTP Basic credentials that are wrong or malformed.
    """
    ctx = get_ctx(request)
    session = request.scope.get("session")
    if session:
        name = session.get(SESSION_USER_KEY)
        if isinstance(name, str):
            account = ctx.accounts.get(name)
            if account is not None:
                request.state.user = account
                return account
            session.clear()  # the account was removed
    creds = _basic_credentials(request)
    if creds is None:
        return None
    account = ctx.accounts.verify(*creds)
    if account is None:
        raise HTTPException(401, "wrong user name or password",
                            headers={"WWW-Authenticate": 'Basic realm="framecap"'})
    request.state.user = account
    return account


def current_user(request: Request) -> Account:
    """The logged-in account (FastAPI dependency; sync, so Argon2 runs in the thread pool).

    Raises:
        HTTPException: 401 with ``WWW-Authenticate: Basic`` for an API call without a login.
        LoginRequired: a page without a login (the app redirects to ``/login?next=...``).
    """
    account = optional_user(request)
    if account is not None:
        return account
    if is_api_request(request) or request.method != "GET":
        raise HTTPException(401, "log in first: a session cookie (POST /login) or HTTP Basic",
                            headers={"WWW-Authenticate": 'Basic realm="framecap"'})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginRequired(target)


def require_admin(user: Annotated[Account, Depends(current_user)]) -> Account:
    """The logged-in account if it is an admin, else 403."""
    if not user.is_admin:
        raise HTTPException(403, "only an admin may do this")
    return user


CtxDep = Annotated[WebContext, Depends(get_ctx)]
UserDep = Annotated[Account, Depends(current_user)]
AdminDep = Annotated[Account, Depends(require_admin)]


# -- access checks ---------------------------------------------------------------------


def allowed_devices(user: Account) -> frozenset[str] | None:
    """The devices ``user`` may see; None for every device (an admin)."""
    return user.allowed


def unknown_device(device_id: str) -> HTTPException:
    """The 404 for a device that does not exist *or* that the user may not see."""
    return HTTPException(404, f"unknown device {device_id!r}")


def valid_id(value: str, kind: str) -> str:
    """``value`` if it is a safe id (:func:`common.topics.validate_id`), else 422 saying why."""
    try:
        return validate_id(value, kind)
    except InvalidIdError as err:
        raise HTTPException(422, str(err)) from err


def check_device(user: Account, device_id: str, ctx: WebContext | None = None) -> str:
    """``device_id`` if it is a safe id the user may see (and, given ``ctx``, that the index
    knows).

    Raises:
        HTTPException: 422 for an unsafe id (``..``, ``/``...); 404 ``unknown device`` for one
            the user may not see or that does not exist (the same answer: never reveal).
    """
    valid_id(device_id, "device_id")
    if not user.may_see(device_id):
        raise unknown_device(device_id)
    if ctx is not None and not ctx.device_known(device_id):
        raise unknown_device(device_id)
    return device_id


def get_doc(ctx: WebContext, user: Account, device_id: str, frame_id: str) -> CaptionDoc:
    """The indexed caption of a frame the user may see.

    Raises:
        HTTPException: 422 for unsafe ids; 404 ``unknown frame`` for a frame that is not
            indexed or whose device the user may not see; 503 if the index fails.
    """
    check_device(user, device_id)
    valid_id(frame_id, "frame_id")
    try:
        doc = ctx.index.get(device_id, frame_id)
    except CaptionIndexError as err:
        raise HTTPException(503, f"the caption index is unavailable: {err}") from err
    if doc is None:
        raise HTTPException(404, f"unknown frame {device_id}/{frame_id}")
    return doc


# -- parameters ------------------------------------------------------------------------

_TIME_RANGE_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def bad_param(name: str, message: str) -> HTTPException:
    """A 422 naming the parameter."""
    return HTTPException(422, f"{name}: {message}")


def parse_tz(tz: int | None) -> int:
    """The viewer's UTC offset in minutes (UTC+2 is 120), -840..840; 0 when None."""
    if tz is None:
        return 0
    if not -MAX_TZ_OFFSET_MIN <= tz <= MAX_TZ_OFFSET_MIN:
        raise bad_param("tz", f"{tz} is not a UTC offset in minutes (-840..840, UTC+2 is 120)")
    return tz


def parse_time_of_day(text: str | None) -> tuple[int, int] | None:
    """``HH:MM-HH:MM`` as minutes since midnight ``(from, to)``; ``from > to`` wraps midnight
    (``22:00-06:00``). None for an empty value. ``24:00`` is accepted as an end."""
    if text is None or not text.strip():
        return None
    m = _TIME_RANGE_RE.match(text)
    if not m:
        raise bad_param("time", f"{text!r} is not a time of day range HH:MM-HH:MM (e.g. 22:00-06:00)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise bad_param("time", f"{text!r} holds an hour over 23 or a minute over 59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440:
        raise bad_param("time", f"{text!r} starts and ends at the same time; leave it empty for the whole day")
    return start, end % 1440


def local_tz(tz_offset_min: int) -> timezone:
    """The fixed-offset time zone of a UTC offset in minutes."""
    return timezone(timedelta(minutes=tz_offset_min))


def parse_when(text: str | None, name: str, tz_offset_min: int = 0, *,
               end: bool = False) -> datetime | None:
    """An ISO date or date-time as UTC; a date or naive date-time is the viewer's local time.

    A date alone as ``end`` means the end of that day (the next local midnight), so
    ``start=2026-01-01&end=2026-01-31`` covers all of January.
    """
    if text is None or not text.strip():
        return None
    value = text.strip()
    tz = local_tz(tz_offset_min)
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            when = datetime.combine(day, time(0), tz)
            if end:
                when += timedelta(days=1)
        else:
            when = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T", 1))
            if when.tzinfo is None:
                when = when.replace(tzinfo=tz)
        return when.astimezone(timezone.utc)
    except (ValueError, OverflowError) as err:
        raise bad_param(name, f"{text!r} is not an ISO date (2026-01-31) or date-time "
                              f"(2026-01-31T22:00, 2026-01-31T22:00:00Z): {err}") from err


def parse_day(text: str | None, tz_offset_min: int = 0, name: str = "day") -> tuple[datetime, datetime, date]:
    """A local day ``YYYY-MM-DD`` (today in the viewer's zone when empty) as its UTC
    ``[start, end)`` and the date."""
    tz = local_tz(tz_offset_min)
    if text is None or not text.strip():
        day = datetime.now(tz).date()
    else:
        try:
            if len(text.strip()) != 10:
                raise ValueError("expected YYYY-MM-DD")
            day = date.fromisoformat(text.strip())
        except ValueError as err:
            raise bad_param(name, f"{text!r} is not a day YYYY-MM-DD: {err}") from err
    try:
        start = datetime.combine(day, time(0), tz).astimezone(timezone.utc)
        return start, start + timedelta(days=1), day
    except OverflowError as err:
        raise bad_param(name, f"{text!r} is out of range") from err


def parse_month(text: str | None, tz_offset_min: int = 0, name: str = "month") -> tuple[datetime, datetime, date]:
    """A local month ``YYYY-MM`` (this month when empty) as its UTC ``[start, end)`` and its
    first day."""
    tz = local_tz(tz_offset_min)
    if text is None or not text.strip():
        first = datetime.now(tz).date().replace(day=1)
    else:
        m = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
        if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1:
            raise bad_param(name, f"{text!r} is not a month YYYY-MM (e.g. 2026-01)")
        first = date(int(m.group(1)), int(m.group(2)), 1)
    nxt = date(first.year + (first.month == 12), first.month % 12 + 1, 1) if first.year < 9999 or first.month < 12 else None
    if nxt is None:
        raise bad_param(name, f"{text!r} is out of range")
    try:
        start = datetime.combine(first, time(0), tz).astimezone(timezone.utc)
        end = datetime.combine(nxt, time(0), tz).astimezone(timezone.utc)
    except OverflowError as err:
        raise bad_param(name, f"{text!r} is out of range") from err
    return start, end, first


def parse_filters(user: Account, *, devices: Sequence[str] = (), start: str | None = None,
                  end: str | None = None, time_of_day: str | None = None, tz: int | None = 0,
                  min_score: float | None = None, errors_only: bool = False,
                  ctx: WebContext | None = None) -> SearchFilters:
    """Search filters from request parameters, bounded by what ``user`` may see.

    ``devices`` empty means every device the user may see (an admin: None, every device; a
    viewer: its list, possibly empty). Each named device must be a safe id the user may see
    (and, given ``ctx``, one the index knows), else 404 ``unknown device`` exactly as for a
    device that does not exist.

    Raises:
        HTTPException: 422 naming the bad parameter and why; 404 for a device.
    """
    tz_min = parse_tz(tz)
    wanted: list[str] = []
    for raw in devices:
        for part in raw.split(","):  # device=cam1,cam2 too
            if part.strip():
                wanted.append(part.strip())
    for device_id in wanted:
        check_device(user, device_id, ctx)
    chosen: tuple[str, ...] | None
    if wanted:
        chosen = tuple(sorted(set(wanted)))
    else:
        allowed = allowed_devices(user)
        chosen = None if allowed is None else tuple(sorted(allowed))
    t_start = parse_when(start, "start", tz_min)
    t_end = parse_when(end, "end", tz_min, end=True)
    if t_start is not None and t_end is not None and t_start >= t_end:
        raise bad_param("end", f"the range is empty: end {end!r} is not after start {start!r}")
    tod = parse_time_of_day(time_of_day)
    if min_score is not None and not math.isfinite(min_score):
        raise bad_param("min_score", "must be a finite number (a log-probability such as -8)")
    return SearchFilters(
        devices=chosen, start=t_start, end=t_end,
        time_from_min=tod[0] if tod else None, time_to_min=tod[1] if tod else None,
        tz_offset_min=tz_min, min_score=min_score, errors_only=errors_only,
    )


@dataclass(frozen=True)
class SearchParams:
    """The raw search parameters of a request (the same names in the API and the pages)."""

    q: str = ""
    device: tuple[str, ...] = ()
    start: str | None = None
    end: str | None = None
    time: str | None = None
    tz: int = 0
    min_score: float | None = None
    errors_only: bool = False
    order: Order = "relevance"
    limit: int = 50
    offset: int = 0

    def to_request(self, user: Account, ctx: WebContext | None = None, *,
                   max_limit: int = MAX_PAGE_SIZE) -> SearchRequest:
        """Validated :class:`SearchRequest` for ``user`` (see :func:`parse_filters`)."""
        if not 1 <= self.limit <= max_limit:
            raise bad_param("limit", f"{self.limit} is out of range 1..{max_limit}")
        if self.offset < 0:
            raise bad_param("offset", f"{self.offset} is negative")
        filters = parse_filters(user, devices=self.device, start=self.start, end=self.end,
                                time_of_day=self.time, tz=self.tz, min_score=self.min_score,
                                errors_only=self.errors_only, ctx=ctx)
        return SearchRequest(query=self.q, filters=filters, order=self.order,
                             limit=self.limit, offset=self.offset)


def filter_params(
    q: Annotated[str, Query(max_length=500, description="Search text: words, \"phrases\", OR, NOT / -word, (groups). Empty: every caption.")] = "",
    device: Annotated[list[str] | None, Query(description="Device id; repeat (or comma-separate) for several. Default: every device you may see.")] = None,
    start: Annotated[str | None, Query(description="From this ISO date or date-time (inclusive; a date or naive time is in your `tz`).")] = None,
    end: Annotated[str | None, Query(description="Until this ISO date (inclusive day) or date-time (exclusive).")] = None,
    time: Annotated[str | None, Query(description="Time of day HH:MM-HH:MM in your `tz`; 22:00-06:00 wraps midnight.")] = None,
    tz: Annotated[int, Query(ge=-MAX_TZ_OFFSET_MIN, le=MAX_TZ_OFFSET_MIN, description="Your UTC offset in minutes (UTC+2 is 120).")] = 0,
    min_score: Annotated[float | None, Query(description="Only captions with at least this log-probability (<= 0, e.g. -8).")] = None,
    errors_only: Annotated[bool, Query(description="Only frames that could not be captioned.")] = False,
) -> SearchParams:
    """The query and filter parameters of a request, without order and paging (FastAPI
    dependency; checked further by :meth:`SearchParams.to_request`)."""
    return SearchParams(q=q, device=tuple(device or ()), start=start, end=end, time=time, tz=tz,
                        min_score=min_score, errors_only=errors_only)


def search_params(
    base: Annotated[SearchParams, Depends(filter_params)],
    order: Annotated[Order, Query(description="relevance (best first), time (newest first) or time_asc.")] = "relevance",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Results per page (at most 500).")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Results to skip (paging).")] = 0,
) -> SearchParams:
    """The search parameters of a request: :func:`filter_params` plus order and paging."""
    return replace(base, order=order, limit=limit, offset=offset)


SearchParamsDep = Annotated[SearchParams, Depends(search_params)]


# -- searching -------------------------------------------------------------------------


def widen_query(ctx: WebContext, text: str) -> dict[str, list[str]]:
    """The widenings of ``text``'s words through ``ctx.widener`` (``{}`` without one, or if it
    fails: a search never fails for want of widening).

    Raises:
        HTTPException: 400 when the query does not parse (the message says why).
    """
    from cloud.web.query import parse_query, query_words

    try:
        words = query_words(parse_query(text))
    except QueryError as err:
        raise HTTPException(400, f"bad query: {err}") from err
    if ctx.widener is None or not words:
        return {}
    try:
        widened = ctx.widener.widen(words)
    except Exception:  # noqa: BLE001 - widening is a help, never a failure
        logger.exception("query widening failed for %r", text)
        return {}
    return {str(k): [str(w) for w in v] for k, v in dict(widened).items() if v}


def run_search(ctx: WebContext, request: SearchRequest, kind: str = "api", *,
               widen: bool = True) -> SearchPage:
    """Run ``request`` on the index (widened through ``ctx.widener`` unless ``widen=False``),
    counted and timed under ``kind`` in the metrics. An empty device tuple (a viewer without
    devices) answers an empty page without asking the index.

    Raises:
        HTTPException: 400 for a bad query, 503 if the index fails.
    """
    if widen and request.query.strip():
        request = replace(request, widenings=widen_query(ctx, request.query))
    if request.filters.devices == ():
        return SearchPage(hits=[], total=0, limit=request.limit, offset=request.offset,
                          widened=request.widenings)
    try:
        with ctx.metrics.time_search(kind):
            page = ctx.index.search(request)
    except QueryError as err:
        raise HTTPException(400, f"bad query: {err}") from err
    except CaptionIndexError as err:
        logger.error("search failed: %s", err)
        raise HTTPException(503, f"the caption index is unavailable: {err}") from err
    if not page.widened and request.widenings:
        page = replace(page, widened=request.widenings)
    return page


def doc_json(ctx: WebContext, doc: CaptionDoc) -> dict[str, Any]:
    """A caption as JSON (the API's and the live stream's item), with its links: ``url`` (the
    frame page), ``image_url`` (the JPEG), ``thumbnail_url`` and ``timeline_url``."""
    d, f = quote(doc.device_id, safe=""), quote(doc.frame_id, safe="")
    local_day = doc.captured_at.strftime("%Y-%m-%d")
    return {
        "device_id": doc.device_id,
        "frame_id": doc.frame_id,
        "captured_at": doc.captured_at.isoformat().replace("+00:00", "Z"),
        "caption": doc.caption,
        "score": doc.score,
        "model": doc.model,
        "frame_key": doc.frame_key,
        "caption_key": doc.caption_key,
        "error": doc.error,
        "url": ctx.link(f"/frames/{d}/{f}"),
        "image_url": ctx.link(f"/api/v1/frames/{d}/{f}.jpg"),
        "thumbnail_url": ctx.link(f"/api/v1/frames/{d}/{f}/thumbnail.jpg"),
        "timeline_url": ctx.link(f"/devices/{d}?day={local_day}"),
    }
