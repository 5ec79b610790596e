"""The HTML pages of ``framecap web``: devices, a device's timeline, a frame with its attention,
search, live captions and alert rules (server-rendered Jinja2, a little plain JavaScript).

Every page keeps its whole state in its URL (filters, query, page), so a link can be shared.
Times are stored in UTC and shown in the viewer's local time: ``static/tz.js`` puts the
browser's UTC offset (minutes, UTC+2 is 120) in a ``tz`` cookie and reloads once; a ``tz``
query parameter overrides the cookie and is carried in the page's links.

The search parameters have the API's names (:class:`cloud.web.deps.SearchParams`: ``q``,
``device``, ``start``, ``end``, ``time``, ``min_score``, ``errors_only``, ``order``, ``limit``,
``offset``), so a search page's query string is also its export's. Bad input renders the page
(or an error page) with a 4xx status and the message, never a traceback.

Stable ids for browser tests: ``#login-form``, ``#search-form``, ``#search-q``, ``.result``,
``.result-caption``, ``#total``, ``#widened``, ``#frame-img``, ``.attn-word``,
``#attn-canvas``, ``#live-list``, ``.live-item``, ``#rule-form``, ``.rule``, ``#feed-behind``,
``.device-card``, ``.error-card``.
"""

from __future__ import annotations

import calendar
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from cloud.web import query as ql
from cloud.web.api import RuleIn, make_rule, remove_rule, rules_for
from cloud.web.api import frame as api_frame
from cloud.web.auth import Account, safe_next
from cloud.web.deps import (
    MAX_TZ_OFFSET_MIN,
    SearchParams,
    UserDep,
    WebContext,
    allowed_devices,
    check_device,
    get_ctx,
    get_doc,
    local_tz,
    optional_user,
    parse_day,
    parse_month,
    run_search,
)
from cloud.web.index import CaptionIndexError, QueryError
from cloud.web.model import (
    MAX_PAGE_SIZE,
    AlertEvent,
    AlertRule,
    CaptionDoc,
    SearchFilters,
    SearchRequest,
)

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")
"""Served by the app under ``/static``."""
SEARCH_PAGE_SIZE = 48
"""Results per search page unless ``limit`` says otherwise."""
HOUR_PAGE_SIZE = 240
"""Frames of one hour shown per timeline page."""
ORDERS = ("relevance", "time", "time_asc")

router = APIRouter(include_in_schema=False)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates = Jinja2Templates(env=_env)


class PageError(Exception):
    """A page cannot be shown: ``status`` (4xx/503) and a message for the viewer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- time zone and links -----------------------------------------------------------------


def viewer_tz(request: Request) -> int:
    """The viewer's UTC offset in minutes: the ``tz`` query parameter, else the ``tz`` cookie
    (set by ``tz.js``), else 0 (UTC). A bad cookie reads as 0.

    Raises:
        PageError: 422 for a ``tz`` query parameter that is not an offset in -840..840.
    """
    raw = request.query_params.get("tz")
    if raw is not None and raw.strip():
        try:
            value = int(raw)
        except ValueError:
            raise PageError(422, f"tz: {raw!r} is not a UTC offset in minutes (UTC+2 is 120)") from None
        if not -MAX_TZ_OFFSET_MIN <= value <= MAX_TZ_OFFSET_MIN:
            raise PageError(422, f"tz: {value} is out of range -840..840 minutes")
        return value
    cookie = request.cookies.get("tz", "")
    try:
        value = int(cookie)
    except ValueError:
        return 0
    return value if -MAX_TZ_OFFSET_MIN <= value <= MAX_TZ_OFFSET_MIN else 0


def tz_label(tz_offset_min: int) -> str:
    """``UTC+02:00`` for 120, ``UTC-05:30`` for -330, ``UTC`` for 0."""
    if tz_offset_min == 0:
        return "UTC"
    sign = "+" if tz_offset_min > 0 else "-"
    hours, minutes = divmod(abs(tz_offset_min), 60)
    return f"UTC{sign}{hours:02d}:{minutes:02d}"


def make_lt(tz_offset_min: int) -> Callable[..., str]:
    """A template function: a UTC datetime as text in the viewer's zone (``''`` for None)."""
    zone = local_tz(tz_offset_min)

    def lt(when: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        if when is None:
            return ""
        return when.astimezone(zone).strftime(fmt)

    return lt


def _static(name: str) -> str:
    """The URL of a static file, with its modification time as a cache buster."""
    try:
        version = int((STATIC_DIR / name).stat().st_mtime)
    except OSError:
        version = 0
    return f"/static/{quote(name)}?v={version}"


def _link(request: Request, path: str, params: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> str:
    """``path`` with ``params`` (None and ``''`` left out) and the page's own ``tz`` query
    parameter when it has one, so an explicit time zone survives navigation."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    pairs = [(k, str(v)) for k, v in items if v is not None and v != ""]
    tz = request.query_params.get("tz")
    if tz and not any(k == "tz" for k, _ in pairs):
        pairs.append(("tz", tz))
    return path + ("?" + urlencode(pairs) if pairs else "")


def _q(value: str) -> str:
    return quote(value, safe="")


def timeline_url(request: Request, doc: CaptionDoc, tz_offset_min: int) -> str:
    """The device timeline at the hour ``doc`` was captured (viewer's local time)."""
    local = doc.captured_at.astimezone(local_tz(tz_offset_min))
    return _link(request, f"/devices/{_q(doc.device_id)}",
                 {"day": local.strftime("%Y-%m-%d"), "hour": f"{local.hour:02d}"})


def frame_url(request: Request, doc: CaptionDoc) -> str:
    """The frame page of ``doc``."""
    return _link(request, f"/frames/{_q(doc.device_id)}/{_q(doc.frame_id)}")


# -- rendering -------------------------------------------------------------------------


def _feed_behind(ctx: WebContext) -> str | None:
    behind = ctx.feed().get("behind")
    return str(behind) if behind else None


def render(request: Request, name: str, context: dict[str, Any], *, user: Account | None,
           status_code: int = 200, nav: str = "", tz_offset_min: int | None = None) -> HTMLResponse:
    """Render template ``name`` with the base layout's context (user, feed banner, time zone).

    ``tz_offset_min`` None reads it from the request (a bad ``tz`` parameter then reads as UTC
    here: the page's own handler reports it).
    """
    ctx = get_ctx(request)
    if tz_offset_min is None:
        try:
            tz_offset_min = viewer_tz(request)
        except PageError:
            tz_offset_min = 0
    base: dict[str, Any] = {
        "user": user,
        "user_name": user.name if user else "",
        "user_role": user.role if user else "",
        "feed_behind": _feed_behind(ctx) if user else None,
        "tz": tz_offset_min,
        "tz_label": tz_label(tz_offset_min),
        "lt": make_lt(tz_offset_min),
        "static": _static,
        "nav": nav,
        "tz_query": _link(request, "")  # "?tz=N" when the page was asked with one
    }
    base.update(context)
    response = templates.TemplateResponse(request, name, base, status_code=status_code)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def render_error(request: Request, status: int, message: str, *, user: Account | None = None,
                 back_url: str = "/") -> HTMLResponse:
    """The error page: ``status`` with ``message`` (for the app's HTML exception handler too)."""
    titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 422: "Bad input",
              429: "Too many requests", 503: "Unavailable"}
    if user is None:
        try:
            user = optional_user(request)
        except HTTPException:
            user = None
    return render(request, "error.html", {"status_code": status,
                                          "title": titles.get(status, f"Error {status}"),
                                          "message": message, "back_url": back_url},
                  user=user, status_code=status)


def _detail(err: HTTPException) -> str:
    return err.detail if isinstance(err.detail, str) else str(err.detail)


# -- login -----------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    """The login form (posts to ``POST /login`` of :mod:`cloud.web.auth`); shows ``error``."""
    nxt = safe_next(request.query_params.get("next"))
    error = request.query_params.get("error")
    return render(request, "login.html", {
        "error": error[:200] if error else None, "next_url": nxt, "login_action": "/login",
        "username": request.query_params.get("username", "")[:128],
    }, user=None, status_code=401 if error else 200)


# -- devices ---------------------------------------------------------------------------


def _local_midnight(tz_offset_min: int) -> datetime:
    zone = local_tz(tz_offset_min)
    now = datetime.now(zone)
    return now.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(timezone.utc)


def _allowed_list(user: Account) -> list[str] | None:
    allowed = user.allowed
    return None if allowed is None else sorted(allowed)


def _device_ids(ctx: WebContext, user: Account) -> list[str]:
    """The ids of every device ``user`` may see that the index knows."""
    allowed = _allowed_list(user)
    if allowed == []:
        return []
    try:
        return [d.device_id for d in ctx.index.devices(allowed, today_start=_local_midnight(0))]
    except CaptionIndexError as err:
        logger.error("listing devices failed: %s", err)
        return list(allowed or [])


@router.get("/", response_class=HTMLResponse)
@router.get("/devices", response_class=HTMLResponse)
def devices_page(request: Request, user: UserDep) -> Response:
    """Every device the user may see: status badge, last seen, latest frame, frames today."""
    ctx = get_ctx(request)
    try:
        tz = viewer_tz(request)
        allowed = _allowed_list(user)
        try:
            devices = [] if allowed == [] else ctx.index.devices(
                allowed, today_start=_local_midnight(tz))
        except CaptionIndexError as err:
            raise PageError(503, f"the caption index is unavailable: {err}") from err
    except PageError as err:
        return render_error(request, err.status, err.message, user=user)
    return render(request, "devices.html", {"devices": devices}, user=user, nav="devices",
                  tz_offset_min=tz)


# -- timeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class _DayCell:
    day: int
    iso: str
    in_month: bool
    count: int
    selected: bool
    url: str


@dataclass(frozen=True)
class _HourCell:
    hour: int
    count: int
    selected: bool
    url: str


def _month_shift(first: date, months: int) -> date:
    index = first.year * 12 + first.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _int_param(request: Request, name: str, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise PageError(422, f"{name}: {raw!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise PageError(422, f"{name}: {value} is out of range {lo}..{hi}")
    return value


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def timeline_page(device_id: str, request: Request,
                  user: UserDep) -> Response:
    """A device's timeline: a month of days with counts, the chosen day's 24 hours with counts
    and the chosen hour's frames (``?day=YYYY-MM-DD&hour=HH``, local time; ``month=YYYY-MM``
    browses the calendar). Without ``day``: the day of the newest frame; without ``hour``: the
    day's last hour with frames."""
    ctx = get_ctx(request)
    try:
        check_device(user, device_id, ctx)
        tz = viewer_tz(request)
        context = _timeline_context(request, ctx, device_id, tz)
    except HTTPException as err:
        return render_error(request, err.status_code, _detail(err), user=user, back_url="/devices")
    except PageError as err:
        return render_error(request, err.status, err.message, user=user, back_url="/devices")
    except CaptionIndexError as err:
        return render_error(request, 503, f"the caption index is unavailable: {err}", user=user)
    return render(request, "timeline.html", context, user=user, nav="devices", tz_offset_min=tz)


def _timeline_context(request: Request, ctx: WebContext, device_id: str, tz: int) -> dict[str, Any]:
    zone = local_tz(tz)
    found = ctx.index.devices([device_id], today_start=_local_midnight(tz))
    summary = found[0] if found else None
    day_text = request.query_params.get("day")
    if (day_text is None or not day_text.strip()) and summary and summary.last_seen:
        day_text = summary.last_seen.astimezone(zone).strftime("%Y-%m-%d")
    day_start, day_end, day = parse_day(day_text, tz)
    month_text = request.query_params.get("month") or day.strftime("%Y-%m")
    month_start, month_end, first = parse_month(month_text, tz)
    hour = _int_param(request, "hour", 0, 23)
    offset = _int_param(request, "offset", 0, 10_000_000) or 0

    base = f"/devices/{_q(device_id)}"
    by_day = ctx.index.counts_by_day(device_id, month_start, month_end, tz)
    weeks = []
    for week in calendar.Calendar(firstweekday=0).monthdatescalendar(first.year, first.month):
        row = []
        for d in week:
            iso = d.isoformat()
            row.append(_DayCell(day=d.day, iso=iso, in_month=d.month == first.month,
                                count=by_day.get(iso, 0), selected=d == day,
                                url=_link(request, base, {"day": iso})))
        weeks.append(row)
    by_hour = ctx.index.counts_by_hour(device_id, day_start, day_end, tz)
    if hour is None and by_hour:
        hour = max(by_hour)
    hours = [_HourCell(hour=h, count=by_hour.get(h, 0), selected=h == hour,
                       url=_link(request, base, {"day": day.isoformat(), "hour": f"{h:02d}"}))
             for h in range(24)]
    docs: list[CaptionDoc] = []
    prev_page_url = next_page_url = None
    if hour is not None:
        # a local hour is one UTC hour (offsets are whole minutes; no DST inside a fixed offset)
        h_start = day_start + timedelta(hours=hour)
        docs = ctx.index.timeline(device_id, h_start, h_start + timedelta(hours=1),
                                  limit=HOUR_PAGE_SIZE + 1, offset=offset)
        params = {"day": day.isoformat(), "hour": f"{hour:02d}"}
        if len(docs) > HOUR_PAGE_SIZE:
            docs = docs[:HOUR_PAGE_SIZE]
            next_page_url = _link(request, base, {**params, "offset": offset + HOUR_PAGE_SIZE})
        if offset > 0:
            prev_page_url = _link(request, base, {**params, "offset": max(0, offset - HOUR_PAGE_SIZE) or None})
    today = datetime.now(zone).date()
    return {
        "device_id": device_id, "summary": summary, "weeks": weeks, "hours": hours,
        "hour": hour, "docs": docs, "truncated": next_page_url is not None,
        "day_label": day.strftime("%a %Y-%m-%d"), "day_total": sum(by_hour.values()),
        "month_label": first.strftime("%B %Y"),
        "month_prev_url": _link(request, base, {"day": day.isoformat(),
                                                "month": _month_shift(first, -1).strftime("%Y-%m")}),
        "month_next_url": _link(request, base, {"day": day.isoformat(),
                                                "month": _month_shift(first, 1).strftime("%Y-%m")}),
        "today_url": _link(request, base, {"day": today.isoformat()}),
        "prev_page_url": prev_page_url, "next_page_url": next_page_url,
    }


# -- frame -----------------------------------------------------------------------------


def _neighbour(ctx: WebContext, doc: CaptionDoc, *, newer: bool) -> CaptionDoc | None:
    """The device's frame just before (or after) ``doc`` in capture time, or None."""
    eps = timedelta(microseconds=1)
    filters = (SearchFilters(devices=(doc.device_id,), start=doc.captured_at + eps) if newer
               else SearchFilters(devices=(doc.device_id,), end=doc.captured_at))
    try:
        page = ctx.index.search(SearchRequest(query="", filters=filters,
                                              order="time_asc" if newer else "time", limit=1))
    except (CaptionIndexError, QueryError) as err:
        logger.warning("no neighbour of frame %s/%s: %s", doc.device_id, doc.frame_id, err)
        return None
    return page.hits[0].doc if page.hits else None


def _frame_metadata(ctx: WebContext, user: Account, doc: CaptionDoc) -> tuple[dict[str, str] | None, str | None]:
    """The frame's S3 object metadata as the API's frame JSON has it, or None and why not
    (S3 down or not configured: the page still shows the indexed caption)."""
    try:
        out = api_frame(ctx, user, doc.device_id, doc.frame_id)
    except HTTPException as err:
        return None, _detail(err)
    meta = out.get("metadata")
    return (dict(meta) if meta is not None else None), out.get("metadata_error")


@router.get("/frames/{device_id}/{frame_id}", response_class=HTMLResponse)
def frame_page(device_id: str, frame_id: str, request: Request,
               user: UserDep) -> Response:
    """One frame: the full JPEG (through the API), caption, score, model, capture time (local
    and UTC), object keys; each caption word a button showing its attention over the frame;
    links to the previous/next frame of the device and to its timeline at that moment."""
    ctx = get_ctx(request)
    try:
        doc = get_doc(ctx, user, device_id, frame_id)
        tz = viewer_tz(request)
    except HTTPException as err:
        return render_error(request, err.status_code, _detail(err), user=user)
    except PageError as err:
        return render_error(request, err.status, err.message, user=user)
    words = doc.caption.split() if doc.caption and not doc.error else []
    prob = per_word = None
    if doc.score is not None:
        prob = math.exp(doc.score)
        if words:
            per_word = math.exp(doc.score / len(words))
    metadata, metadata_error = _frame_metadata(ctx, user, doc)
    prev_doc = _neighbour(ctx, doc, newer=False)
    next_doc = _neighbour(ctx, doc, newer=True)
    d, f = _q(doc.device_id), _q(doc.frame_id)
    first_words = " ".join(words[:3])
    context = {
        "doc": doc,
        "words": words,
        "prob": prob,
        "metadata": metadata,
        "metadata_error": metadata_error,
        "per_word": per_word,
        "image_url": f"/api/v1/frames/{d}/{f}.jpg",
        "attention_url": f"/api/v1/frames/{d}/{f}/attention",
        "prev_url": frame_url(request, prev_doc) if prev_doc else None,
        "next_url": frame_url(request, next_doc) if next_doc else None,
        "timeline_url": timeline_url(request, doc, tz),
        "search_url": _link(request, "/search", {"q": first_words, "device": doc.device_id}),
    }
    return render(request, "frame.html", context, user=user, nav="devices", tz_offset_min=tz)


# -- search ----------------------------------------------------------------------------

_TRUE = {"1", "true", "on", "yes"}


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return float(raw)
    except ValueError:
        raise PageError(422, f"{name}: {raw!r} is not a number (a log-probability such as -8)") from None


def search_params_from(request: Request, tz: int) -> SearchParams:
    """The page's query string as :class:`SearchParams` (the API's names and rules).

    Raises:
        PageError: 422 for a value that is not a number, an unknown order, a limit or offset
            out of range.
    """
    qp = request.query_params
    order = qp.get("order") or "relevance"
    if order not in ORDERS:
        raise PageError(422, f"order: {order!r} is not one of {', '.join(ORDERS)}")
    q = qp.get("q", "")
    if len(q) > 500:
        raise PageError(422, f"q: the query is {len(q)} characters long, the limit is 500")
    return SearchParams(
        q=q,
        device=tuple(v for v in qp.getlist("device") if v.strip()),
        start=qp.get("start") or None,
        end=qp.get("end") or None,
        time=qp.get("time") or None,
        tz=tz,
        min_score=_float_param(request, "min_score"),
        errors_only=(qp.get("errors_only") or "").lower() in _TRUE,
        order=order,  # type: ignore[arg-type]  # checked against ORDERS above
        limit=_int_param(request, "limit", 1, MAX_PAGE_SIZE) or SEARCH_PAGE_SIZE,
        offset=_int_param(request, "offset", 0, 1_000_000) or 0,
    )


@dataclass(frozen=True)
class _Result:
    hit: Any
    timeline_url: str


def _search_form(request: Request) -> dict[str, Any]:
    """What the form shows: the query string as typed (even when it is invalid)."""
    qp = request.query_params
    return {
        "q": qp.get("q", ""), "devices": set(qp.getlist("device")),
        "start": qp.get("start", ""), "end": qp.get("end", ""), "time": qp.get("time", ""),
        "min_score": qp.get("min_score", ""),
        "errors_only": (qp.get("errors_only") or "").lower() in _TRUE,
        "order": qp.get("order") or "relevance", "limit": qp.get("limit", ""),
    }


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, user: UserDep) -> Response:
    """Search captions: the query box, filters applied before ranking, results with their
    highlighted words, the words the query was widened with, paging and export links. A bad
    query or filter answers 400/422/404 with the message above the form."""
    ctx = get_ctx(request)
    form = _search_form(request)
    context: dict[str, Any] = {"form": form, "device_ids": _device_ids(ctx, user), "page": None,
                               "error": None}
    tz = 0
    status = 200
    try:
        tz = viewer_tz(request)
        params = search_params_from(request, tz)
        search = params.to_request(user, ctx)
        page = run_search(ctx, search, "page")
    except PageError as err:
        context["error"], status = err.message, err.status
    except HTTPException as err:
        context["error"], status = _detail(err), err.status_code
    else:
        context.update(_search_results(request, page, params, tz))
    return render(request, "search.html", context, user=user, nav="search",
                  status_code=status, tz_offset_min=tz)


def _search_results(request: Request, page: Any, params: SearchParams, tz: int) -> dict[str, Any]:
    qp = [(k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "tz")]

    def page_url(offset: int) -> str:
        return _link(request, "/search", qp + ([("offset", offset)] if offset else []))

    prev_url = page_url(max(0, page.offset - page.limit)) if page.offset > 0 else None
    next_url = (page_url(page.offset + page.limit)
                if page.offset + len(page.hits) < page.total else None)
    export_q = [(k, v) for k, v in qp if k not in ("limit", "format")] + [("tz", str(tz))]
    exports = {fmt: "/api/v1/export?" + urlencode([*export_q, ("format", fmt)])
               for fmt in ("jsonl", "csv", "zip")}
    return {
        "page": page,
        "results": [_Result(hit, timeline_url(request, hit.doc, tz)) for hit in page.hits],
        "prev_url": prev_url, "next_url": next_url, "export_urls": exports,
    }


# -- live ------------------------------------------------------------------------------


@router.get("/live", response_class=HTMLResponse)
def live_page(request: Request, user: UserDep) -> Response:
    """New captions as they arrive (``EventSource`` on ``/api/v1/live``), per device or all."""
    ctx = get_ctx(request)
    device = request.query_params.get("device") or ""
    try:
        tz = viewer_tz(request)
        if device:
            check_device(user, device, ctx)
    except HTTPException as err:
        return render_error(request, err.status_code, _detail(err), user=user, back_url="/live")
    except PageError as err:
        return render_error(request, err.status, err.message, user=user, back_url="/live")
    return render(request, "live.html", {"device": device, "device_ids": _device_ids(ctx, user)},
                  user=user, nav="live", tz_offset_min=tz)


# -- alerts ----------------------------------------------------------------------------

def _alerts(request: Request, user: Account, *, error: str | None = None,
            notice: str | None = None, form: Mapping[str, Any] | None = None,
            status: int = 200) -> Response:
    ctx = get_ctx(request)
    try:
        rules = rules_for(ctx, user)
    except HTTPException as err:
        return render_error(request, err.status_code, _detail(err), user=user)
    shown = {"name": "", "query": "", "devices": set(), "min_score": "", "cooldown_s": "300",
             "webhook_url": ""}
    shown.update(form or {})
    return render(request, "alerts.html", {
        "rules": rules, "error": error, "notice": notice, "form": shown,
        "device_ids": _device_ids(ctx, user), "recent": _recent_alerts(ctx, user, rules),
    }, user=user, nav="alerts", status_code=status)


def _recent_alerts(ctx: WebContext, user: Account, rules: Sequence[AlertRule]) -> list[AlertEvent] | None:
    """The newest alerts of the rules this user sees, on the devices it may see (None when
    the index cannot say)."""
    by_id = {rule.rule_id: rule for rule in rules}
    try:
        allowed = allowed_devices(user)
        fired = ctx.index.recent_alerts(sorted(allowed) if allowed is not None else None, limit=20)
    except CaptionIndexError:
        logger.exception("recent alerts could not be read")
        return None
    events = []
    for rule_id, doc in fired:
        rule = by_id.get(rule_id)
        if rule is None:
            continue
        try:
            parsed = ql.parse_query(rule.query)
        except QueryError:
            parsed = None
        words = (ql.match_caption(parsed, doc.caption) or []) if parsed is not None else []
        events.append(AlertEvent(rule=rule, doc=doc, matched_words=words, fired_at=doc.captured_at))
    return events


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(request: Request, user: UserDep) -> Response:
    """The alert rules (with delete) and a form to create one."""
    notice = request.query_params.get("notice")
    return _alerts(request, user, notice=notice[:200] if notice else None)


def _login_redirect(request: Request) -> Response | Account:
    try:
        user = optional_user(request)
    except HTTPException as err:
        return render_error(request, err.status_code, _detail(err))
    if user is None:
        return RedirectResponse("/login?next=/alerts", 303)
    return user


def rule_from_form(form: Mapping[str, Any], devices: Sequence[str]) -> RuleIn:
    """The page's form as the API's :class:`~cloud.web.api.RuleIn` (empty fields are unset).

    Raises:
        PageError: 422 naming each field that is wrong and why.
    """
    fields: dict[str, Any] = {"name": str(form.get("name") or "").strip(),
                              "query": str(form.get("query") or "").strip(),
                              "devices": list(devices) or None}
    for name in ("min_score", "cooldown_s", "webhook_url"):
        value = str(form.get(name) or "").strip()
        if value:
            fields[name] = value
    try:
        return RuleIn.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rule'}: {e['msg']}"
                             for e in err.errors())
        raise PageError(422, problems) from None


@router.post("/alerts", response_class=HTMLResponse)
async def create_rule_form(request: Request) -> Response:
    """Create a rule from the page's form; redirects back to ``/alerts`` (303), or renders the
    page with the message (4xx) and the form as typed."""
    user = _login_redirect(request)
    if not isinstance(user, Account):
        return user
    ctx = get_ctx(request)
    try:
        form = await request.form()
    except Exception as err:  # noqa: BLE001 - a malformed body is the client's error
        return render_error(request, 400, f"the form could not be read: {err}", user=user)
    devices = [str(v) for v in form.getlist("device") if str(v).strip()]
    shown = {k: str(form.get(k) or "") for k in ("name", "query", "min_score", "cooldown_s",
                                                  "webhook_url")}
    shown["devices"] = set(devices)  # type: ignore[assignment]
    try:
        rule = make_rule(ctx, user, rule_from_form(form, devices))
    except PageError as err:
        return _alerts(request, user, error=err.message, form=shown, status=err.status)
    except HTTPException as err:
        return _alerts(request, user, error=_detail(err), form=shown, status=err.status_code)
    return RedirectResponse("/alerts?" + urlencode({"notice": f"rule {rule.name!r} created"}), 303)


@router.post("/alerts/{rule_id}/delete", response_class=HTMLResponse)
def delete_rule_form(rule_id: str, request: Request) -> Response:
    """Delete a rule (an admin: any; a viewer: its own), then back to ``/alerts``."""
    user = _login_redirect(request)
    if not isinstance(user, Account):
        return user
    ctx = get_ctx(request)
    try:
        remove_rule(ctx, user, rule_id)
    except HTTPException as err:
        return _alerts(request, user, error=_detail(err), status=err.status_code)
    return RedirectResponse("/alerts?" + urlencode({"notice": f"rule {rule_id!r} deleted"}), 303)
