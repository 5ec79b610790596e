"""The JSON API of ``framecap web`` under ``/api/v1`` (an :class:`~fastapi.APIRouter`).

Every route needs a login (session cookie or HTTP Basic) and answers only about the devices
the user may see: a device or frame outside them is a 404 exactly like one that does not exist.
Frames are read from S3 through this API (never a public bucket). See ``docs/openapi.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import secrets
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from cloud.web.auth import Account
from cloud.web.deps import (
    MAX_TZ_OFFSET_MIN,
    CtxDep,
    SearchParams,
    UserDep,
    WebContext,
    allowed_devices,
    bad_param,
    check_device,
    doc_json,
    filter_params,
    get_doc,
    parse_day,
    parse_month,
    run_search,
    search_params,
    valid_id,
    widen_query,
)
from cloud.web.index import CaptionIndexError, QueryError
from cloud.web.model import AlertRule, CaptionDoc, Order, SearchHit, SearchPage, SearchRequest
from cloud.web.thumbnails import ThumbnailError, make_thumbnail

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["api"])

SSE_HEARTBEAT_S = 15.0
"""Seconds between heartbeat comments on a quiet live stream (set ``app.state.sse_heartbeat_s``)."""


# -- response models (for the OpenAPI schema) ----------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionOut(_Out):
    """A caption with its links."""

    device_id: str = Field(description="The device that captured the frame.")
    frame_id: str = Field(description="The frame.")
    captured_at: str = Field(description="Capture time, ISO 8601 UTC (``...Z``).")
    caption: str = Field(description="The caption; empty on an error record.")
    score: float | None = Field(description="Log-probability of the caption (<= 0); null on error.")
    model: str = Field(description="The model that wrote the caption.")
    frame_key: str = Field(description="S3 key of the frame.")
    caption_key: str = Field(description="S3 key of the caption record.")
    error: str | None = Field(description="Why the frame has no caption, if so.")
    url: str = Field(description="The frame's page.")
    image_url: str = Field(description="The frame's JPEG (through this API).")
    thumbnail_url: str = Field(description="A ~320 px wide JPEG of the frame.")
    timeline_url: str = Field(description="The device's timeline page at that day (UTC).")


class SearchResult(CaptionOut):
    """A search hit."""

    highlighted: str = Field(description="The caption, HTML-escaped, matched words in <mark>.")
    rank: float = Field(description="Relevance, higher is better; 0 when ordered by time.")


class SearchOut(_Out):
    results: list[SearchResult] = Field(description="This page of results.")
    total: int = Field(description="Matches under the filters (all pages), counted up to 10,000.")
    total_exact: bool = Field(description="False when more than 10,000 match: total is then a lower bound.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Results skipped.")
    widened: dict[str, list[str]] = Field(
        description="Query words outside the model's word map -> the words added for each.")


class DeviceOut(_Out):
    device_id: str = Field(description="The device.")
    status: str | None = Field(description="online / offline (retained status), null if never heard.")
    status_at: str | None = Field(description="When that status was received, ISO UTC.")
    last_seen: str | None = Field(description="Newest caption's capture time, ISO UTC.")
    latest: CaptionOut | None = Field(description="Newest caption.")
    frames_today: int = Field(description="Captions since midnight in the viewer's `tz`.")


class DevicesOut(_Out):
    devices: list[DeviceOut]


class TimelineOut(_Out):
    device_id: str
    day: str = Field(description="The local day YYYY-MM-DD.")
    tz: int = Field(description="The viewer's UTC offset in minutes.")
    start: str = Field(description="The day's start, ISO UTC.")
    end: str = Field(description="The day's end (exclusive), ISO UTC.")
    hours: dict[str, int] = Field(description="Local hour (0..23) -> captions; absent hours are 0.")
    total: int = Field(description="Captions of the day.")
    captions: list[CaptionOut] = Field(description="Captions of the day (or one hour), oldest first.")
    limit: int
    offset: int


class DaysOut(_Out):
    device_id: str
    month: str = Field(description="YYYY-MM.")
    tz: int
    days: dict[str, int] = Field(description="Local day YYYY-MM-DD -> captions; absent days are 0.")


class FrameOut(CaptionOut):
    metadata: dict[str, str] | None = Field(description="The frame's S3 object metadata; null if S3 failed.")
    metadata_error: str | None = Field(description="Why the metadata could not be read, if so.")
    attention_url: str = Field(description="Per-word attention maps of this frame.")


class RuleIn(BaseModel):
    """A new alert rule."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Shown on pages and in alerts.")
    query: str = Field(min_length=1, max_length=500, description="Search syntax (words, \"phrases\", OR, NOT).")
    devices: list[str] | None = Field(default=None, max_length=1000,
                                      description="Devices it watches; null: every device you may see.")
    min_score: float | None = Field(default=None, allow_inf_nan=False, le=0,
                                    description="Only captions with at least this log-probability.")
    cooldown_s: float = Field(default=300.0, ge=0, le=7 * 86400, allow_inf_nan=False,
                              description="Matches of one device within this many seconds fold into one alert.")
    webhook_url: str | None = Field(default=None, max_length=2000,
                                    description="http(s) URL to POST each alert to (HMAC-SHA256 signed).")
    rule_id: str | None = Field(default=None, description="Id to create or replace; default: made from the name.")

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not re.match(r"^https?://[^\s/?#@]+(:\d+)?([/?#]\S*)?$", v):
            raise ValueError("must be an http:// or https:// URL with a host")
        return v


class RuleOut(_Out):
    rule_id: str
    name: str
    query: str
    devices: list[str] | None
    min_score: float | None
    cooldown_s: float
    webhook_url: str | None
    owner: str
    created_at: str | None


class RulesOut(_Out):
    rules: list[RuleOut]


class StatusOut(_Out):
    feed: dict[str, Any] = Field(description="mqtt_connected, s3_ok, last_caption_at, behind (a sentence or null).")
    captions: int | None = Field(description="Captions in the index (null if it failed).")
    devices: int | None = Field(description="Devices you may see.")
    index: str = Field(description="Index backend.")
    live_clients: int = Field(description="Live streams open.")
    user: str
    role: str


# -- helpers ---------------------------------------------------------------------------


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def hit_json(ctx: WebContext, hit: SearchHit) -> dict[str, Any]:
    """A search hit as the API returns it."""
    out = doc_json(ctx, hit.doc)
    out["highlighted"] = hit.highlighted
    out["rank"] = hit.rank
    return out


def page_json(ctx: WebContext, page: SearchPage) -> dict[str, Any]:
    """A search page as the API returns it."""
    return {"results": [hit_json(ctx, h) for h in page.hits], "total": page.total,
            "total_exact": page.total_exact, "limit": page.limit, "offset": page.offset, "widened": page.widened}


def rule_json(rule: AlertRule) -> dict[str, Any]:
    return {"rule_id": rule.rule_id, "name": rule.name, "query": rule.query,
            "devices": list(rule.devices) if rule.devices is not None else None,
            "min_score": rule.min_score, "cooldown_s": rule.cooldown_s,
            "webhook_url": rule.webhook_url, "owner": rule.owner,
            "created_at": _iso(rule.created_at)}


def _index_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except CaptionIndexError as err:
        logger.error("index %s failed: %s", what, err)
        raise HTTPException(503, f"the caption index is unavailable: {err}") from err


def read_frame(ctx: WebContext, doc: CaptionDoc) -> Any:
    """The frame's S3 object (``.body``, ``.metadata``...).

    Raises:
        HTTPException: 404 when S3 does not have it, 503 when S3 is not configured or fails.
    """
    from common.storage import ObjectNotFoundError, StorageError

    if ctx.store is None:
        raise HTTPException(503, "frames cannot be shown: S3 is not configured for this server")
    try:
        return ctx.store.get_object(doc.frame_key)
    except ObjectNotFoundError as err:
        raise HTTPException(404, f"the image of frame {doc.device_id}/{doc.frame_id} is not in S3") from err
    except StorageError as err:
        logger.warning("S3 read of %s failed: %s", doc.frame_key, err)
        raise HTTPException(503, f"S3 is unavailable, the frame cannot be shown now: {err.reason}") from err
    except Exception as err:  # noqa: BLE001 - any transport failure is "S3 down" for the user
        logger.warning("S3 read of %s failed: %s", doc.frame_key, err)
        raise HTTPException(503, f"S3 is unavailable, the frame cannot be shown now: {err}") from err


# -- rules (shared with the pages) -----------------------------------------------------------


def rules_for(ctx: WebContext, user: Account) -> list[AlertRule]:
    """The rules ``user`` may see: every rule for an admin, its own for a viewer."""
    rules = _index_call("rules", ctx.index.rules)
    return [r for r in rules if user.is_admin or r.owner == user.name]


def make_rule(ctx: WebContext, user: Account, spec: RuleIn) -> AlertRule:
    """Validate ``spec`` for ``user``, save it and tell the alert engine.

    A viewer's rule always names its devices (its own list when ``devices`` is null), so it
    can never watch another device, even if the viewer's list changes later.

    Only an admin may set a webhook: a webhook makes this server POST to an address of the
    rule's choosing, which a viewer must not be able to aim at hosts inside the network.

    Raises:
        HTTPException: 400 bad query; 404 a device the user may not see; 403 replacing another
            user's rule as a viewer, or a viewer's webhook; 422 a bad rule id.
    """
    from cloud.web.query import parse_query

    if spec.webhook_url and not user.is_admin:
        raise HTTPException(403, "only an admin may set a webhook URL (the server would POST there); "
                                 "leave it empty to get this rule's alerts on MQTT and the Alerts page")
    try:
        if parse_query(spec.query) is None:
            raise HTTPException(400, "bad query: a rule needs at least one word to match")
    except QueryError as err:
        raise HTTPException(400, f"bad query: {err}") from err
    devices: tuple[str, ...] | None = None
    if spec.devices:
        devices = tuple(sorted({check_device(user, d) for d in spec.devices}))
    elif not user.is_admin:
        devices = tuple(sorted(user.devices))
        if not devices:
            raise HTTPException(403, "your account may see no device, so it cannot watch one")
    if spec.rule_id:
        rule_id = valid_id(spec.rule_id, "rule_id")
    else:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name).strip("-._")[:40].lower() or "rule"
        rule_id = f"{slug}-{secrets.token_hex(3)}"
    existing = {r.rule_id: r for r in _index_call("rules", ctx.index.rules)}
    old = existing.get(rule_id)
    if old is not None and not user.is_admin and old.owner != user.name:
        raise HTTPException(403, "that rule_id is taken by another user; choose another")
    rule = AlertRule(rule_id=rule_id, name=spec.name.strip() or rule_id, query=spec.query,
                     devices=devices, min_score=spec.min_score, cooldown_s=spec.cooldown_s,
                     webhook_url=spec.webhook_url,
                     owner=old.owner if old is not None else user.name,
                     created_at=datetime.now(timezone.utc))
    _index_call("save_rule", ctx.index.save_rule, rule)
    logger.info("user %s saved rule %s (%r on %s)", user.name, rule.rule_id, rule.query,
                ",".join(devices) if devices else "every device")
    _rules_changed(ctx)
    return rule


def remove_rule(ctx: WebContext, user: Account, rule_id: str) -> None:
    """Delete a rule the user may see (a viewer: its own).

    Raises:
        HTTPException: 404 for a rule that does not exist or that the user may not see.
    """
    valid_id(rule_id, "rule_id")
    if not any(r.rule_id == rule_id for r in rules_for(ctx, user)):
        raise HTTPException(404, f"unknown rule {rule_id!r}")
    _index_call("delete_rule", ctx.index.delete_rule, rule_id)
    logger.info("user %s deleted rule %s", user.name, rule_id)
    _rules_changed(ctx)


def _rules_changed(ctx: WebContext) -> None:
    if ctx.alert_rules_changed is None:
        return
    try:
        ctx.alert_rules_changed()
    except Exception:  # noqa: BLE001 - the rule is saved; the engine reloads on its own later
        logger.exception("telling the alert engine that rules changed failed")


# -- search ----------------------------------------------------------------------------


SearchParamsQ = Annotated[SearchParams, Depends(search_params)]
FilterParamsQ = Annotated[SearchParams, Depends(filter_params)]
TzQ = Annotated[int, Query(ge=-MAX_TZ_OFFSET_MIN, le=MAX_TZ_OFFSET_MIN,
                           description="Your UTC offset in minutes (UTC+2 is 120).")]


@router.get("/search", response_model=SearchOut, summary="Search captions",
            responses={400: {"description": "The query cannot be parsed"},
                       404: {"description": "A device that does not exist or you may not see"},
                       422: {"description": "A bad parameter (date, time of day, limit...)"}})
def search(ctx: CtxDep, user: UserDep, params: SearchParamsQ) -> dict[str, Any]:
    """Captions matching the query under the filters, ranked, one page. Filters (devices,
    dates, time of day, score, errors) apply before ranking. Query words outside the model's
    word map are widened to their nearest words (listed in ``widened``)."""
    request = params.to_request(user, ctx)
    return page_json(ctx, run_search(ctx, request, "api"))


# -- devices ---------------------------------------------------------------------------


def _device_json(ctx: WebContext, d: Any) -> dict[str, Any]:
    return {"device_id": d.device_id, "status": d.status, "status_at": _iso(d.status_at),
            "last_seen": _iso(d.last_seen),
            "latest": doc_json(ctx, d.latest) if d.latest is not None else None,
            "frames_today": d.frames_today}


@router.get("/devices", response_model=DevicesOut, summary="Devices you may see")
def devices(ctx: CtxDep, user: UserDep, tz: TzQ = 0) -> dict[str, Any]:
    """Every device you may see with its status, last caption and frames since local midnight."""
    today_start, _, _ = parse_day(None, tz)
    allowed = allowed_devices(user)
    found = _index_call("devices", ctx.index.devices, None if allowed is None else sorted(allowed),
                        today_start=today_start)
    return {"devices": [_device_json(ctx, d) for d in found if user.may_see(d.device_id)]}


@router.get("/devices/{device_id}/timeline", response_model=TimelineOut, summary="A device's day",
            responses={404: {"description": "Unknown device (or one you may not see)"}})
def timeline(ctx: CtxDep, user: UserDep, device_id: str,
             day: Annotated[str | None, Query(description="Local day YYYY-MM-DD (default: today).")] = None,
             tz: TzQ = 0,
             hour: Annotated[int | None, Query(ge=0, le=23, description="Only captions of this local hour.")] = None,
             limit: Annotated[int, Query(ge=1, le=500, description="Captions per page.")] = 500,
             offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> dict[str, Any]:
    """Caption counts per local hour of one day and the captions of that day (or hour), oldest
    first, in the viewer's time zone ``tz`` (stored in UTC)."""
    check_device(user, device_id, ctx)
    start, end, the_day = parse_day(day, tz)
    hours = _index_call("counts_by_hour", ctx.index.counts_by_hour, device_id, start, end, tz)
    c_start, c_end = start, end
    if hour is not None:
        from datetime import timedelta

        c_start = start + timedelta(hours=hour)
        c_end = c_start + timedelta(hours=1)
    docs = _index_call("timeline", ctx.index.timeline, device_id, c_start, c_end, limit=limit, offset=offset)
    return {"device_id": device_id, "day": the_day.isoformat(), "tz": tz, "start": _iso(start),
            "end": _iso(end), "hours": {str(h): n for h, n in sorted(hours.items())},
            "total": sum(hours.values()), "captions": [doc_json(ctx, d) for d in docs],
            "limit": limit, "offset": offset}


@router.get("/devices/{device_id}/days", response_model=DaysOut, summary="A device's month",
            responses={404: {"description": "Unknown device (or one you may not see)"}})
def days(ctx: CtxDep, user: UserDep, device_id: str,
         month: Annotated[str | None, Query(description="Local month YYYY-MM (default: this month).")] = None,
         tz: TzQ = 0) -> dict[str, Any]:
    """Caption counts per local day of one month (the timeline's calendar)."""
    check_device(user, device_id, ctx)
    start, end, first = parse_month(month, tz)
    counts = _index_call("counts_by_day", ctx.index.counts_by_day, device_id, start, end, tz)
    return {"device_id": device_id, "month": f"{first:%Y-%m}", "tz": tz, "days": dict(sorted(counts.items()))}


# -- frames ----------------------------------------------------------------------------

_FRAME_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown frame (or one you may not see), or its image is not in S3"},
    422: {"description": "An unsafe device or frame id"},
    503: {"description": "S3 (or the index) is unavailable"},
}
_JPEG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}, "description": "The JPEG."}}


@router.get("/frames/{device_id}/{frame_id}.jpg", response_class=Response, summary="A frame's JPEG",
            responses={**_JPEG, **_FRAME_RESPONSES})
def frame_jpeg(ctx: CtxDep, user: UserDep, device_id: str, frame_id: str) -> Response:
    """The full frame as captured, read from S3."""
    doc = get_doc(ctx, user, device_id, frame_id)
    obj = read_frame(ctx, doc)
    return Response(obj.body, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400"})


@router.get("/frames/{device_id}/{frame_id}/thumbnail.jpg", response_class=Response,
            summary="A frame's thumbnail", responses={**_JPEG, **_FRAME_RESPONSES})
def frame_thumbnail(ctx: CtxDep, user: UserDep, device_id: str, frame_id: str) -> Response:
    """The frame resized to about 320 px wide (cached)."""
    doc = get_doc(ctx, user, device_id, frame_id)
    data = ctx.thumbnails.get(doc.frame_key)
    if data is None:
        obj = read_frame(ctx, doc)
        try:
            data = make_thumbnail(obj.body)
        except ThumbnailError as err:
            raise HTTPException(422, f"frame {device_id}/{frame_id}: {err}") from err
        ctx.thumbnails.put(doc.frame_key, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/frames/{device_id}/{frame_id}/attention", summary="Per-word attention maps",
            responses={**_FRAME_RESPONSES, 200: {"description": "{words, alphas (per word, grid h*w), grid [h, w], model, ...}"}})
async def frame_attention(ctx: CtxDep, user: UserDep, device_id: str, frame_id: str) -> Any:
    """The attention of each caption word over the frame (Show, Attend and Tell, Xu et al.
    2015, Fig. 2), computed on demand with the captioning model."""
    doc = await run_in_threadpool(get_doc, ctx, user, device_id, frame_id)
    if ctx.attention is None:
        raise HTTPException(503, "attention maps are unavailable: no captioning model is loaded on this server")
    if doc.error or not doc.caption:
        raise HTTPException(422, f"frame {device_id}/{frame_id} has no caption, so no attention"
                                 f"{': ' + doc.error if doc.error else ''}")
    obj = await run_in_threadpool(read_frame, ctx, doc)
    try:
        return await run_in_threadpool(ctx.attention.attention, doc, obj.body)
    except HTTPException:
        raise
    except ValueError as err:  # the stored JPEG does not decode: bad input, not an outage
        raise HTTPException(422, f"attention could not be computed: {err}") from err
    except Exception as err:  # noqa: BLE001 - a model failure is reported, never a traceback
        logger.exception("attention of %s/%s failed", device_id, frame_id)
        raise HTTPException(503, f"attention could not be computed: {err}") from err


@router.get("/frames/{device_id}/{frame_id}", response_model=FrameOut, summary="A frame's caption and metadata",
            responses=_FRAME_RESPONSES)
def frame(ctx: CtxDep, user: UserDep, device_id: str, frame_id: str) -> dict[str, Any]:
    """The frame's caption record and its S3 object metadata (null with ``metadata_error``
    when S3 cannot be read: the indexed caption is still served)."""
    doc = get_doc(ctx, user, device_id, frame_id)
    out = doc_json(ctx, doc)
    meta: dict[str, str] | None = None
    error: str | None = None
    head = getattr(ctx.store, "head_metadata", None)
    try:
        if ctx.store is None:
            error = "S3 is not configured for this server"
        elif head is not None:
            meta = dict(head(doc.frame_key))
        else:
            meta = dict(read_frame(ctx, doc).metadata)
    except HTTPException as err:
        error = str(err.detail)
    except Exception as err:  # noqa: BLE001 - S3 down: the caption is still shown
        logger.warning("S3 metadata of %s failed: %s", doc.frame_key, err)
        error = f"S3 is unavailable: {getattr(err, 'reason', err)}"
    d, f = quote(doc.device_id, safe=""), quote(doc.frame_id, safe="")
    out.update(metadata=meta, metadata_error=error,
               attention_url=ctx.link(f"/api/v1/frames/{d}/{f}/attention"))
    return out


# -- export ----------------------------------------------------------------------------

EXPORT_PAGE = 500
CSV_COLUMNS = ("device_id", "frame_id", "captured_at", "caption", "score", "model", "frame_key",
               "caption_key", "error", "url")


def export_hits(ctx: WebContext, first: SearchPage, request: SearchRequest, count: int) -> Iterator[SearchHit]:
    """The first ``count`` hits of ``request``, page by page (``first`` is its first page)."""
    page, sent = first, 0
    while True:
        for hit in page.hits:
            if sent >= count:
                return
            yield hit
            sent += 1
        if sent >= count or len(page.hits) < request.limit:
            return
        request = replace(request, offset=request.offset + request.limit)
        page = run_search(ctx, request, "export", widen=False)


class _ChunkSink(io.RawIOBase):
    """A write-only, unseekable file whose written bytes are collected for streaming."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.chunks.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def _zip_stream(ctx: WebContext, hits: Iterator[SearchHit], summary: dict[str, Any]) -> Iterator[bytes]:
    sink = _ChunkSink()
    captions: list[str] = []
    missing: list[str] = []
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:  # JPEGs do not compress
        for hit in hits:
            item = doc_json(ctx, hit.doc)
            name = f"frames/{hit.doc.device_id}/{hit.doc.frame_id}.jpg"
            try:
                body = read_frame(ctx, hit.doc).body
            except HTTPException as err:
                missing.append(f"{hit.doc.device_id}/{hit.doc.frame_id}: {err.detail}")
                item["file"] = None
            else:
                zf.writestr(name, body)
                item["file"] = name
            captions.append(json.dumps(item, ensure_ascii=False))
            chunk = sink.take()
            if chunk:
                yield chunk
        summary["exported"] = len(captions)
        summary["missing_frames"] = missing
        zf.writestr("captions.jsonl", "\n".join(captions) + ("\n" if captions else ""),
                    compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("export.json", json.dumps(summary, indent=2), compress_type=zipfile.ZIP_DEFLATED)
    yield sink.take()


def _jsonl_stream(ctx: WebContext, hits: Iterator[SearchHit]) -> Iterator[bytes]:
    for hit in hits:
        yield (json.dumps(hit_json(ctx, hit), ensure_ascii=False) + "\n").encode()


def _csv_stream(ctx: WebContext, hits: Iterator[SearchHit]) -> Iterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for hit in hits:
        item = doc_json(ctx, hit.doc)
        writer.writerow(["" if item[c] is None else item[c] for c in CSV_COLUMNS])
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue().encode()


@router.get("/export", summary="Export a result set (JSONL, CSV, or a zip with the frames)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}, "application/zip": {}},
                             "description": "The results, streamed; headers X-Total-Count, X-Export-Count, "
                                            "X-Export-Truncated say how many matched and how many are in it."},
                       400: {"description": "The query cannot be parsed"},
                       404: {"description": "A device that does not exist or you may not see"},
                       422: {"description": "A bad parameter"}})
def export(ctx: CtxDep, user: UserDep, params: FilterParamsQ,
           format: Annotated[Literal["jsonl", "csv", "zip"], Query(description="jsonl, csv, or zip (frames + captions.jsonl + export.json).")] = "jsonl",
           order: Annotated[Order, Query(description="relevance, time or time_asc.")] = "time",
           max: Annotated[int | None, Query(ge=1, description="Most results (default and cap: the server's export limit, 10,000).")] = None,
           ) -> StreamingResponse:
    """Every result of a search (the same parameters), up to the export cap (10,000 by
    default; ``X-Export-Truncated: true`` and ``export.json`` in a zip say when it was hit)."""
    cap = ctx.export_max
    if max is not None and max > cap:
        raise bad_param("max", f"{max} is over this server's export limit of {cap} results")
    count = min(max or cap, cap)
    request = replace(params, order=order, limit=min(EXPORT_PAGE, count), offset=0).to_request(user, ctx)
    request = replace(request, widenings=widen_query(ctx, request.query) if request.query.strip() else {})
    first = run_search(ctx, request, "export", widen=False)
    exported = min(first.total, count)
    truncated = first.total > count or (not first.total_exact and first.total >= count)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = {"X-Total-Count": f"{first.total}{'' if first.total_exact else '+'}", "X-Export-Count": str(exported),
               "X-Export-Truncated": "true" if truncated else "false",
               "Content-Disposition": f'attachment; filename="framecap-export-{stamp}.{format}"'}
    hits = export_hits(ctx, first, request, count)
    logger.info("user %s exports %d of %d results as %s", user.name, exported, first.total, format)
    if format == "jsonl":
        return StreamingResponse(_jsonl_stream(ctx, hits), media_type="application/x-ndjson", headers=headers)
    if format == "csv":
        return StreamingResponse(_csv_stream(ctx, hits), media_type="text/csv; charset=utf-8", headers=headers)
    summary = {"query": request.query, "widened": request.widenings, "total": first.total,
               "cap": count, "truncated": truncated,
               "note": (f"only the first {count} of {first.total} results are in this export"
                        if truncated else None),
               "exported_at": _iso(datetime.now(timezone.utc)), "user": user.name}
    return StreamingResponse(_zip_stream(ctx, hits, summary), media_type="application/zip", headers=headers)


# -- live ------------------------------------------------------------------------------


def sse_event(event: str, data: Any, event_id: str | None = None) -> str:
    """One server-sent event (WHATWG HTML, "Server-sent events"): ``event:``, ``id:``, one
    ``data:`` line of compact JSON (JSON never holds a raw newline)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head + "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@router.get("/live", response_class=StreamingResponse, summary="New captions as server-sent events",
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`event: caption` with the caption JSON per new caption; "
                                            "`: heartbeat` comments while quiet."},
                       404: {"description": "A device that does not exist or you may not see"}})
def live(request: Request, ctx: CtxDep, user: UserDep,
         device: Annotated[str | None, Query(description="Only this device (default: every device you may see).")] = None,
         ) -> StreamingResponse:
    """Each new caption of the devices you may see (or of ``device``) as ``event: caption``,
    data the caption JSON (as in search results). The stream starts with ``: connected`` once
    it is subscribed, and sends ``: heartbeat`` comments while quiet."""
    if device:
        check_device(user, device, ctx)
    allowed = allowed_devices(user)
    heartbeat_s = float(getattr(request.app.state, "sse_heartbeat_s", SSE_HEARTBEAT_S))

    async def stream() -> AsyncIterator[str]:
        sub = ctx.live.subscribe(allowed, device or None)
        ctx.metrics.live_clients.inc()
        try:
            yield "retry: 3000\n: connected\n\n"
            while True:
                try:
                    doc = await sub.get(heartbeat_s)
                except StopAsyncIteration:
                    return
                if doc is None:
                    if await request.is_disconnected():
                        return
                    yield ": heartbeat\n\n"
                    continue
                yield sse_event("caption", doc_json(ctx, doc), f"{doc.device_id}/{doc.frame_id}")
        finally:
            sub.close()
            ctx.metrics.live_clients.dec()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- rules -----------------------------------------------------------------------------


@router.get("/rules", response_model=RulesOut, summary="Alert rules")
def list_rules(ctx: CtxDep, user: UserDep) -> dict[str, Any]:
    """Every rule (an admin) or your own rules (a viewer)."""
    return {"rules": [rule_json(r) for r in rules_for(ctx, user)]}


@router.post("/rules", response_model=RuleOut, status_code=201, summary="Create or replace an alert rule",
             responses={400: {"description": "The query cannot be parsed"},
                        403: {"description": "Another user's rule"},
                        404: {"description": "A device that does not exist or you may not see"},
                        422: {"description": "A bad field"}})
def create_rule(ctx: CtxDep, user: UserDep, spec: Annotated[RuleIn, Body()]) -> dict[str, Any]:
    """Save a rule; each new caption matching it raises an alert (MQTT and the webhook)."""
    return rule_json(make_rule(ctx, user, spec))


@router.delete("/rules/{rule_id}", status_code=204, response_class=Response, summary="Delete an alert rule",
               responses={404: {"description": "Unknown rule (or one you may not see)"}})
def delete_rule(ctx: CtxDep, user: UserDep, rule_id: str) -> Response:
    """Delete a rule (a viewer: only its own)."""
    remove_rule(ctx, user, rule_id)
    return Response(status_code=204)


# -- status ----------------------------------------------------------------------------


@router.get("/status", response_model=StatusOut, summary="Feed and index status")
def status(ctx: CtxDep, user: UserDep) -> dict[str, Any]:
    """Whether the feed (MQTT, S3) is current, and how much the index holds."""
    captions: int | None
    n_devices: int | None
    try:
        captions = ctx.index.count()
        allowed = allowed_devices(user)
        n_devices = len(ctx.index.devices(None if allowed is None else sorted(allowed),
                                          today_start=datetime.now(timezone.utc)))
    except CaptionIndexError as err:
        logger.error("index status failed: %s", err)
        captions = n_devices = None
    feed = ctx.feed()
    if isinstance(feed.get("last_caption_at"), datetime):
        feed["last_caption_at"] = _iso(feed["last_caption_at"])
    return {"feed": feed, "captions": captions, "devices": n_devices, "index": ctx.index.backend,
            "live_clients": ctx.live.clients, "user": user.name, "role": user.role}
