"""The HTML pages of ``framecap web`` (:mod:`cloud.web.pages`) through FastAPI's TestClient.

A real :class:`~cloud.web.index_sqlite.SqliteIndex` in ``tmp_path`` holds a few captions of two
devices (one an error record), accounts come from :mod:`cloud.web.auth` (an admin and a viewer
of cam1), S3 is a dict. Each page is checked for what a person would see: the caption text, the
highlighted word, the widened words, the error card; logged out it redirects to the login page;
the viewer of cam1 never sees cam2; bad input answers a 4xx page with the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from cloud.web.auth import Accounts
from cloud.web.deps import WebContext
from cloud.web.index_sqlite import SqliteIndex
from cloud.web.model import CaptionDoc
from common.storage import ObjectNotFoundError, StoredObject

UTC = timezone.utc
DAY = "2026-01-10"


def _doc(device: str, frame: str, hhmm: str, caption: str, score: float | None = -6.0,
         error: str | None = None) -> CaptionDoc:
    hh, mm = (int(x) for x in hhmm.split(":"))
    return CaptionDoc(
        device_id=device, frame_id=frame,
        captured_at=datetime(2026, 1, 10, hh, mm, 0, tzinfo=UTC),
        caption=caption, score=None if error else score, model="sat-test",
        frame_key=f"frames/{device}/2026/01/10/{frame}.jpg",
        caption_key=f"captions/{device}/2026/01/10/{frame}.json", error=error)


DOCS = [
    _doc("cam1", "f-0001", "10:15", "a man riding a bike down a street", -5.0),
    _doc("cam1", "f-0002", "10:20", "a red truck parked on the side of a street", -7.5),
    _doc("cam1", "f-0003", "10:25", "", error="decoder failed: frame is not a JPEG"),
    _doc("cam1", "f-0004", "10:30", "a <script>alert(1)</script> sign & a bus", -9.0),
    _doc("cam2", "g-0001", "11:00", "a dog sitting on a couch", -4.0),
]


@dataclass
class FakeStore:
    """S3 as a dict of JPEGs with metadata (``get_object`` / ``head_metadata``)."""

    objects: dict[str, StoredObject] = field(default_factory=dict)

    def put_frame(self, key: str) -> None:
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, 32:] = (0, 0, 255)
        ok, data = cv2.imencode(".jpg", image)
        assert ok
        self.objects[key] = StoredObject(body=data.tobytes(), metadata={"camera": "lobby"},
                                         content_type="image/jpeg", etag="x")

    def get_object(self, key: str) -> StoredObject:
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFoundError("get_object", "framecap", key, "NoSuchKey") from None

    def head_metadata(self, key: str) -> dict[str, str]:
        return dict(self.get_object(key).metadata)


class FakeWidener:
    """``sedan`` -> car, truck (the real one maps words outside the word map)."""

    def widen(self, words: list[str]) -> dict[str, list[str]]:
        return {w: ["car", "truck"] for w in words if w == "sedan"}


class Elements(HTMLParser):
    """Collects, per element with an id or classes, its attributes and its text."""

    VOID = {"input", "img", "br", "meta", "link", "hr", "source"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[dict[str, Any]] = []
        self._stack: list[dict[str, Any]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el: dict[str, Any] = {"tag": tag, "attrs": {k: v or "" for k, v in attrs}, "text": ""}
        el["classes"] = set(el["attrs"].get("class", "").split())
        self.found.append(el)
        if tag not in self.VOID:
            self._stack.append(el)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i]["tag"] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        for el in self._stack:
            el["text"] += data

    def by_class(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.found if name in e["classes"]]

    def by_id(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.found if e["attrs"].get("id") == name), None)


def text_of(el: dict[str, Any] | None) -> str:
    assert el is not None
    return " ".join(el["text"].split())


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WebContext]:
    index = SqliteIndex(tmp_path / "index.db")
    index.upsert(DOCS)
    index.set_status("cam1", "online", datetime(2026, 1, 10, 9, 0, tzinfo=UTC))
    index.set_status("cam2", "offline", datetime(2026, 1, 10, 9, 0, tzinfo=UTC))
    store = FakeStore()
    for d in DOCS:
        store.put_frame(d.frame_key)
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    accounts = Accounts.from_users({"root": ("root-pw", "admin", []),
                                    "ann": ("ann-pw", "viewer", ["cam1"])}, hasher=cheap)
    context = WebContext(index=index, accounts=accounts, session_secret="test-secret-" + "x" * 32,
                         store=store, widener=FakeWidener(),
                         feed_status=lambda: {"mqtt_connected": True, "s3_ok": True,
                                              "last_caption_at": None, "behind": None})
    yield context
    index.close()


def _client(ctx: WebContext) -> TestClient:
    from cloud.web.app import create_app

    return TestClient(create_app(ctx), follow_redirects=False)


def _login(client: TestClient, user: str, password: str) -> TestClient:
    answer = client.post("/login", data={"username": user, "password": password, "next": "/"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/"
    return client


@pytest.fixture
def admin(ctx: WebContext) -> Iterator[TestClient]:
    with _client(ctx) as client:
        yield _login(client, "root", "root-pw")


@pytest.fixture
def viewer(ctx: WebContext) -> Iterator[TestClient]:
    with _client(ctx) as client:
        yield _login(client, "ann", "ann-pw")


def page(client: TestClient, url: str, status: int = 200) -> Elements:
    answer = client.get(url)
    assert answer.status_code == status, (url, answer.status_code, answer.text[:2000])
    assert answer.headers["content-type"].startswith("text/html")
    assert "Traceback" not in answer.text
    return Elements(answer.text)


# -- login and layout ------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/devices", "/devices/cam1", "/frames/cam1/f-0001",
                                 "/search?q=truck", "/live", "/alerts"])
def test_logged_out_pages_redirect_to_login(ctx: WebContext, url: str) -> None:
    with _client(ctx) as client:
        answer = client.get(url)
    assert answer.status_code in (302, 303, 307), answer.text[:500]
    location = urlsplit(answer.headers["location"])
    assert location.path == "/login"
    assert parse_qs(location.query)["next"] == [url]


def test_login_page_and_bad_credentials(ctx: WebContext) -> None:
    with _client(ctx) as client:
        els = page(client, "/login?next=/search")
        form = els.by_id("login-form")
        assert form is not None and form["attrs"]["action"] == "/login"
        assert any(e["attrs"].get("name") == "next" and e["attrs"].get("value") == "/search"
                   for e in els.found)
        answer = client.post("/login", data={"username": "root", "password": "wrong", "next": "/search"})
        assert answer.status_code == 303
        els = page(client, answer.headers["location"], status=401)
        assert "wrong user name or password" in text_of(els.by_id("login-error"))
        assert els.by_id("user-name") is None  # not logged in: no nav user
        # a good login lands where it was going, with the nav and the user's name
        answer = client.post("/login", data={"username": "root", "password": "root-pw", "next": "/search"})
        assert answer.headers["location"] == "/search"
        els = page(client, "/search")
        assert text_of(els.by_id("user-name")) == "root"


def test_feed_behind_banner(ctx: WebContext) -> None:
    with _client(ctx) as client:
        _login(client, "root", "root-pw")
        assert page(client, "/devices").by_id("feed-behind") is None
        ctx.feed_status = lambda: {"behind": "the broker is unreachable since 10:00"}
        els = page(client, "/devices")
        assert "the broker is unreachable since 10:00" in text_of(els.by_id("feed-behind"))
        assert len(els.by_class("device-card")) == 2  # still serving what is indexed


# -- devices and timeline --------------------------------------------------------------------


def test_devices_page_admin_sees_both(admin: TestClient) -> None:
    els = page(admin, "/devices?tz=0")
    cards = {c["attrs"]["data-device"]: c for c in els.by_class("device-card")}
    assert set(cards) == {"cam1", "cam2"}
    assert cards["cam1"]["attrs"]["data-status"] == "online"
    assert cards["cam2"]["attrs"]["data-status"] == "offline"
    assert "a dog sitting on a couch" in text_of(cards["cam2"])
    assert "2026-01-10 11:00:00" in text_of(cards["cam2"])  # last seen, UTC here
    # the latest cam1 caption holds markup: shown as text, never as a tag
    answer = admin.get("/devices")
    assert "<script>alert(1)</script>" not in answer.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in answer.text
    assert page(admin, "/").by_class("device-card")  # "/" is the devices page too


def test_devices_page_in_local_time(admin: TestClient) -> None:
    admin.cookies.set("tz", "120")
    els = page(admin, "/devices")
    cards = {c["attrs"]["data-device"]: c for c in els.by_class("device-card")}
    assert "2026-01-10 13:00:00" in text_of(cards["cam2"])  # 11:00 UTC at UTC+2
    # tz.js learns at which offset the page was rendered (it reloads once when the browser's differs)
    script = next(e for e in els.found if e["tag"] == "script" and "tz.js" in e["attrs"].get("src", ""))
    assert script["attrs"]["data-tz"] == "120"
    # the query parameter overrides the cookie
    cards = {c["attrs"]["data-device"]: c for c in page(admin, "/devices?tz=-60").by_class("device-card")}
    assert "2026-01-10 10:00:00" in text_of(cards["cam2"])


def test_timeline_hour_grid_with_error_card(admin: TestClient) -> None:
    els = page(admin, f"/devices/cam1?day={DAY}&hour=10&tz=0")
    captions = [text_of(c) for c in els.by_class("card")]
    assert any("a man riding a bike down a street" in c for c in captions)
    errors = els.by_class("error-card")
    assert len(errors) == 1 and "decoder failed: frame is not a JPEG" in text_of(errors[0])
    day = next(e for e in els.found if e["attrs"].get("data-day") == DAY)
    assert "4" in text_of(day)  # four frames that day on the calendar
    hours = {e["attrs"]["data-hour"]: text_of(e) for e in els.found if "data-hour" in e["attrs"]}
    assert hours["10"].endswith("4") and hours["11"].endswith("0")


def test_timeline_follows_viewer_zone(admin: TestClient) -> None:
    # at UTC+2 the 10:xx UTC frames are in the 12:00 hour; at 10 there is nothing
    els = page(admin, f"/devices/cam1?day={DAY}&hour=12&tz=120")
    assert len(els.by_class("frame-card")) == 4 and len(els.by_class("error-card")) == 1
    els = page(admin, f"/devices/cam1?day={DAY}&hour=10&tz=120")
    assert not els.by_class("frame-card")
    # without a day: the day of the newest frame, its last hour with frames
    els = page(admin, "/devices/cam1?tz=0")
    assert any("a red truck parked" in text_of(c) for c in els.by_class("frame-card"))


@pytest.mark.parametrize("url, status, message", [
    ("/devices/cam1?day=2026-13-45", 422, "is not a day"),
    ("/devices/cam1?day=2026-01-10&hour=25", 422, "hour"),
    ("/devices/cam1?tz=abc", 422, "tz"),
    ("/devices/nosuchcam", 404, "unknown device"),
    ("/devices/..%2Fetc", 404, ""),
    ("/frames/cam1/nosuchframe", 404, "unknown frame"),
    ("/frames/cam1/..", 404, ""),
    ("/live?device=nosuchcam", 404, "unknown device"),
])
def test_bad_inputs_render_4xx_pages(admin: TestClient, url: str, status: int, message: str) -> None:
    answer = admin.get(url)
    assert 400 <= answer.status_code < 500, (url, answer.status_code)
    assert "Traceback" not in answer.text
    if message:
        assert answer.status_code == status
        assert answer.headers["content-type"].startswith("text/html")
        assert message in text_of(Elements(answer.text).by_id("error-message"))


# -- frame ----------------------------------------------------------------------------------


def test_frame_page(admin: TestClient) -> None:
    els = page(admin, "/frames/cam1/f-0002?tz=60")
    img = els.by_id("frame-img")
    assert img is not None and img["attrs"]["src"] == "/api/v1/frames/cam1/f-0002.jpg"
    canvas = els.by_id("attn-canvas")
    assert canvas is not None and canvas["attrs"]["data-src"] == "/api/v1/frames/cam1/f-0002/attention"
    words = [text_of(b) for b in els.by_class("attn-word")]
    assert words == ["a", "red", "truck", "parked", "on", "the", "side", "of", "a", "street"]
    assert [b["attrs"]["data-index"] for b in els.by_class("attn-word")] == [str(i) for i in range(10)]
    assert text_of(els.by_id("frame-caption")) == "a red truck parked on the side of a street"
    assert "2026-01-10 11:20:00" in text_of(els.by_id("captured-local"))  # UTC+1
    assert text_of(els.by_id("captured-utc")) == "2026-01-10 10:20:00.000 UTC"
    assert "-7.500" in text_of(els.by_id("frame-score"))
    assert "lobby" in text_of(els.by_id("frame-metadata"))  # the S3 object's metadata
    prev_link, next_link = els.by_id("prev-frame"), els.by_id("next-frame")
    assert prev_link is not None and prev_link["attrs"]["href"].startswith("/frames/cam1/f-0001")
    assert next_link is not None and next_link["attrs"]["href"].startswith("/frames/cam1/f-0003")
    timeline = els.by_id("timeline-link")
    assert timeline is not None
    query = parse_qs(urlsplit(timeline["attrs"]["href"]).query)
    assert query["day"] == [DAY] and query["hour"] == ["11"] and query["tz"] == ["60"]
    # the images and the attention it links to answer (through the API, with the session)
    assert admin.get(img["attrs"]["src"]).headers["content-type"] == "image/jpeg"


def test_frame_page_of_an_error_record(admin: TestClient) -> None:
    els = page(admin, "/frames/cam1/f-0003")
    assert "decoder failed: frame is not a JPEG" in text_of(els.by_id("frame-error"))
    assert not els.by_class("attn-word")


# -- search ---------------------------------------------------------------------------------


def test_search_highlights_and_links(admin: TestClient) -> None:
    answer = admin.get("/search?q=truck&tz=0")
    assert answer.status_code == 200
    assert "<mark>truck</mark>" in answer.text
    els = Elements(answer.text)
    assert text_of(els.by_id("total")) == "1"
    results = els.by_class("result")
    assert len(results) == 1 and results[0]["attrs"]["data-frame"] == "f-0002"
    assert "a red truck parked" in text_of(els.by_class("result-caption")[0])
    hrefs = [e["attrs"].get("href", "") for e in els.found if e["tag"] == "a"]
    assert "/frames/cam1/f-0002?tz=0" in hrefs
    assert any(h.startswith("/devices/cam1?") and "day=2026-01-10" in h and "hour=10" in h for h in hrefs)
    export = els.by_id("export-csv")
    assert export is not None
    q = parse_qs(urlsplit(export["attrs"]["href"]).query)
    assert urlsplit(export["attrs"]["href"]).path == "/api/v1/export"
    assert q["q"] == ["truck"] and q["format"] == ["csv"] and q["tz"] == ["0"]
    search_q = els.by_id("search-q")
    assert search_q is not None and search_q["attrs"]["value"] == "truck"


def test_search_caption_markup_is_escaped(admin: TestClient) -> None:
    answer = admin.get("/search?q=bus")
    assert "<mark>bus</mark>" in answer.text
    assert "<script>alert(1)</script>" not in answer.text


def test_search_widened_words(admin: TestClient) -> None:
    els = page(admin, "/search?q=sedan")
    widened = text_of(els.by_id("widened"))
    assert "sedan" in widened and "also searched car, truck" in widened
    assert {r["attrs"]["data-frame"] for r in els.by_class("result")} == {"f-0002"}


def test_search_filters_and_paging(admin: TestClient) -> None:
    els = page(admin, "/search?errors_only=1")
    assert [r["attrs"]["data-frame"] for r in els.by_class("result")] == ["f-0003"]
    assert els.by_class("error-card")
    # time of day in local time across midnight: 22:00-06:00 at UTC+14 is 08:00-16:00 UTC
    els = page(admin, "/search?time=22:00-06:00&tz=840")
    assert text_of(els.by_id("total")) == "5"
    els = page(admin, "/search?time=22:00-06:00&tz=0")
    assert text_of(els.by_id("total")) == "0"
    # one device, oldest first, two per page
    els = page(admin, "/search?device=cam1&order=time_asc&limit=2")
    assert text_of(els.by_id("total")) == "4"
    assert [r["attrs"]["data-frame"] for r in els.by_class("result")] == ["f-0001", "f-0002"]
    nxt = els.by_id("page-next")
    assert nxt is not None
    els = page(admin, nxt["attrs"]["href"])
    assert [r["attrs"]["data-frame"] for r in els.by_class("result")] == ["f-0003", "f-0004"]
    assert els.by_id("page-next") is None and els.by_id("page-prev") is not None
    els = page(admin, "/search?min_score=-6")
    assert {r["attrs"]["data-frame"] for r in els.by_class("result")} == {"f-0001", "g-0001"}


@pytest.mark.parametrize("url, status, message", [
    ('/search?q="unbalanced', 400, "bad query"),
    ("/search?q=truck&start=2026-02-30", 422, "start"),
    ("/search?time=25:00-06:00", 422, "time"),
    ("/search?min_score=abc", 422, "min_score"),
    ("/search?order=random", 422, "order"),
    ("/search?limit=100000", 422, "limit"),
    ("/search?device=nosuchcam", 404, "unknown device"),
])
def test_search_bad_input_shown_in_page(admin: TestClient, url: str, status: int, message: str) -> None:
    els = page(admin, url, status=status)
    assert message in text_of(els.by_id("search-error"))
    assert els.by_id("search-form") is not None  # the form is still there to fix it


# -- a viewer of cam1 -----------------------------------------------------------------------


def test_viewer_sees_only_cam1(viewer: TestClient) -> None:
    els = page(viewer, "/devices")
    assert [c["attrs"]["data-device"] for c in els.by_class("device-card")] == ["cam1"]
    els = page(viewer, "/search?q=dog")
    assert text_of(els.by_id("total")) == "0" and not els.by_class("result")
    els = page(viewer, "/search")
    assert {r["attrs"]["data-device"] for r in els.by_class("result")} == {"cam1"}
    options = [e["attrs"]["value"] for e in els.found if e["tag"] == "option"
               and e["attrs"].get("value", "").startswith("cam")]
    assert options == ["cam1"]
    assert "unknown device" in text_of(page(viewer, "/search?device=cam2", 404).by_id("search-error"))
    assert "unknown device" in text_of(page(viewer, "/devices/cam2", 404).by_id("error-message"))
    assert "unknown device" in text_of(page(viewer, "/frames/cam2/g-0001", 404).by_id("error-message"))
    assert "unknown device" in text_of(page(viewer, "/live?device=cam2", 404).by_id("error-message"))
    els = page(viewer, "/live")
    assert [e["attrs"]["value"] for e in els.found if e["tag"] == "option"] == ["", "cam1"]
    # the cam2 frame is reachable by no URL, through the pages or the API they link to
    for url in ("/api/v1/frames/cam2/g-0001.jpg", "/api/v1/frames/cam2/g-0001/thumbnail.jpg"):
        assert viewer.get(url).status_code == 404


# -- live and alerts ------------------------------------------------------------------------


def test_live_page(admin: TestClient) -> None:
    els = page(admin, "/live?device=cam2")
    assert els.by_id("live-list") is not None and els.by_id("live-conn") is not None
    selected = [e["attrs"]["value"] for e in els.found if e["tag"] == "option" and "selected" in e["attrs"]]
    assert selected == ["cam2"]
    assert any(e["tag"] == "script" and "live.js" in e["attrs"].get("src", "") for e in els.found)


def test_alert_rules_create_list_delete(admin: TestClient, ctx: WebContext) -> None:
    els = page(admin, "/alerts")
    assert els.by_id("rule-form") is not None and not els.by_class("rule")
    assert els.by_id("rule-webhook") is not None
    answer = admin.post("/alerts", data={"name": "Trucks at night", "query": "truck OR lorry",
                                         "device": ["cam1"], "min_score": "-8", "cooldown_s": "60",
                                         "webhook_url": "http://127.0.0.1:9/hook"})
    assert answer.status_code == 303, answer.text[:1000]
    (rule,) = ctx.index.rules()
    assert (rule.name, rule.query, rule.devices, rule.min_score, rule.cooldown_s, rule.owner) == (
        "Trucks at night", "truck OR lorry", ("cam1",), -8.0, 60.0, "root")
    els = page(admin, answer.headers["location"])
    (row,) = els.by_class("rule")
    assert "Trucks at night" in text_of(row) and "truck OR lorry" in text_of(row)
    assert "http://127.0.0.1:9/hook" in text_of(row)
    delete = next(e for e in els.found if e["tag"] == "form" and "rule-delete" in e["classes"])
    answer = admin.post(delete["attrs"]["action"])
    assert answer.status_code == 303
    assert ctx.index.rules() == []
    assert not page(admin, "/alerts").by_class("rule")


@pytest.mark.parametrize("form, status, message", [
    ({"name": "x", "query": '"unbalanced'}, 400, "bad query"),
    ({"name": "x", "query": "truck", "min_score": "abc"}, 422, "min_score"),
    ({"name": "x", "query": "truck", "webhook_url": "ftp://x"}, 422, "webhook_url"),
    ({"name": "", "query": "truck"}, 422, "name"),
])
def test_alert_rule_bad_form(admin: TestClient, ctx: WebContext, form: dict[str, str],
                             status: int, message: str) -> None:
    answer = admin.post("/alerts", data=form)
    assert answer.status_code == status, answer.text[:1000]
    els = Elements(answer.text)
    assert message in text_of(els.by_id("rule-error"))
    query = next(e for e in els.found if e["attrs"].get("id") == "rule-query")
    assert query["attrs"]["value"] == form["query"]  # kept as typed
    assert ctx.index.rules() == []


def test_viewer_rules_bounded_to_its_devices(viewer: TestClient, ctx: WebContext) -> None:
    answer = viewer.post("/alerts", data={"name": "dogs", "query": "dog", "device": ["cam2"]})
    assert answer.status_code == 404 and "unknown device" in answer.text
    answer = viewer.post("/alerts", data={"name": "bikes", "query": "bike"})
    assert answer.status_code == 303
    (rule,) = ctx.index.rules()
    assert rule.devices == ("cam1",) and rule.owner == "ann"
    assert page(viewer, "/alerts").by_id("rule-webhook") is None  # webhooks are the admin's


def test_recent_alerts_listed_for_the_rules_and_devices_one_may_see(admin: TestClient, viewer: TestClient,
                                                                   ctx: WebContext) -> None:
    from cloud.web.model import AlertRule

    ctx.index.save_rule(AlertRule(rule_id="vehicles", name="Vehicles", query="truck OR dog", owner="root"))
    ctx.index.save_rule(AlertRule(rule_id="bikes", name="Bikes", query="bike", owner="ann"))
    by_frame = {d.frame_id: d for d in DOCS}
    for rule_id, frame in (("vehicles", "f-0002"), ("vehicles", "g-0001"), ("bikes", "f-0001")):
        assert ctx.index.claim_alert(rule_id, by_frame[frame], 0)
    rows = [text_of(e) for e in page(admin, "/alerts").by_class("alert-event")]
    assert len(rows) == 3
    assert "cam2" in rows[0] and "a dog sitting on a couch" in rows[0] and "dog" in rows[0]
    assert "Vehicles" in rows[1] and "truck" in rows[1]
    # ann (cam1 only) sees the alert of her own rule, not the admin's rules nor cam2
    rows = [text_of(e) for e in page(viewer, "/alerts").by_class("alert-event")]
    assert len(rows) == 1 and "Bikes" in rows[0] and "a man riding a bike" in rows[0]


def test_alert_form_needs_login(ctx: WebContext) -> None:
    with _client(ctx) as client:
        answer = client.post("/alerts", data={"name": "x", "query": "truck"})
        assert answer.status_code in (303, 401)
        assert ctx.index.rules() == []


def test_no_development_paths_in_pages(admin: TestClient) -> None:
    for url in ("/devices", f"/devices/cam1?day={DAY}&hour=10", "/frames/cam1/f-0001",
                "/search?q=truck", "/live", "/alerts", "/devices/nosuchcam"):
        text = admin.get(url).text
        assert not re.search(r"\.\./shared|/work/|site-packages|\.venv", text), url
