"""The JSON API of ``framecap web`` through FastAPI's TestClient on a real SQLite index.

Also holds the small world the other web API tests import (``make_world``): a SQLite index in
``tmp_path`` with a few captions of cam1 and cam2, a fake S3 store, fake attention and widener,
and accounts admin / viewer1 (cam1 only) / nobody (no device).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud.web.app import create_app
from cloud.web.auth import Accounts
from cloud.web.deps import WebContext
from cloud.web.index import CaptionIndex, open_index
from cloud.web.model import CaptionDoc
from common.storage import ObjectNotFoundError, StorageError, StoredObject

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ADMIN = ("admin", "admin-pw")
VIEWER = ("viewer1", "viewer1-pw")
NOBODY = ("nobody", "nobody-pw")
DAY = datetime(2026, 1, 15, tzinfo=timezone.utc)


def jpeg(width: int = 640, height: int = 480, value: int = 128) -> bytes:
    """A real JPEG of a flat grey frame with a white square."""
    image = np.full((height, width, 3), value, dtype=np.uint8)  # (H, W, 3)
    image[10:60, 10:60] = 255
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def doc(device_id: str, frame_id: str, at: datetime, caption: str, score: float | None = -5.0,
        error: str | None = None) -> CaptionDoc:
    day = at.strftime("%Y/%m/%d")
    return CaptionDoc(device_id=device_id, frame_id=frame_id, captured_at=at, caption=caption,
                      score=score, model="sat-test", frame_key=f"frames/{device_id}/{day}/{frame_id}.jpg",
                      caption_key=f"captions/{device_id}/{day}/{frame_id}.json", error=error)


DOCS = [
    doc("cam1", "c1-truck", DAY + timedelta(hours=23, minutes=30), "a red truck parked on a street", -4.0),
    doc("cam1", "c1-dog", DAY + timedelta(hours=12), "a dog running in a park", -6.0),
    doc("cam1", "c1-bike", DAY + timedelta(days=1, hours=3), "a man riding a bike at night", -9.0),
    doc("cam1", "c1-error", DAY + timedelta(hours=13), "", None, error="image does not decode"),
    doc("cam2", "c2-truck", DAY + timedelta(hours=10), "a truck on a road next to a secret building", -3.0),
    doc("cam2", "c2-cat", DAY + timedelta(hours=11), "a cat sitting on a secret couch", -5.0),
]


class FakeStore:
    """S3 as a dict: ``get_object``/``get``/``head_metadata``; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False
        self.reads = 0

    def _check(self, key: str) -> bytes:
        self.reads += 1
        if self.down:
            raise StorageError("get_object", "framecap", key, "Could not connect to the endpoint URL")
        if key not in self.objects:
            raise ObjectNotFoundError("get_object", "framecap", key, "NoSuchKey")
        return self.objects[key]

    def get_object(self, key: str) -> StoredObject:
        body = self._check(key)
        return StoredObject(body=body, metadata={"frame-id": key.rsplit("/", 1)[-1][:-4], "quality": "85"},
                            content_type="image/jpeg", etag='"x"')

    def get(self, key: str) -> bytes:
        return self.get_object(key).body

    def head_metadata(self, key: str) -> dict[str, str]:
        return dict(self.get_object(key).metadata)


class FakeAttention:
    """Attention as the real service shapes it, without a model."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def attention(self, d: CaptionDoc, jpeg_bytes: bytes) -> dict[str, Any]:
        self.calls.append((d.device_id, d.frame_id, len(jpeg_bytes)))
        words = d.caption.split()
        return {"words": words, "alphas": [[1 / 4] * 4 for _ in words], "grid": [2, 2], "model": "fake"}


class FakeWidener:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[list[str]] = []

    def widen(self, words: list[str]) -> dict[str, list[str]]:
        self.asked.append(list(words))
        return {w: self.table[w] for w in words if w in self.table}


@dataclass
class World:
    ctx: WebContext
    app: FastAPI
    index: CaptionIndex
    store: FakeStore
    attention: FakeAttention
    widener: FakeWidener
    rules_changed: list[int] = field(default_factory=list)

    def client(self, auth: tuple[str, str] | None = None) -> TestClient:
        """A client of the app (``auth``: HTTP Basic on every request)."""
        c = TestClient(self.app, follow_redirects=False)
        if auth is not None:
            c.auth = auth
        return c


def make_world(tmp_path: Path, docs: list[CaptionDoc] | None = None, **ctx_kwargs: Any) -> World:
    """The app around a SQLite index holding ``docs`` (default :data:`DOCS`) and a fake S3."""
    index = open_index(tmp_path / "index.db")
    index.upsert(DOCS if docs is None else docs)
    store = FakeStore()
    for d in DOCS if docs is None else docs:
        if not d.error:
            store.objects[d.frame_key] = jpeg()
    accounts = Accounts.from_users({ADMIN[0]: (ADMIN[1], "admin", []),
                                    VIEWER[0]: (VIEWER[1], "viewer", ["cam1"]),
                                    NOBODY[0]: (NOBODY[1], "viewer", [])}, hasher=FAST_HASHER)
    attention = FakeAttention()
    widener = FakeWidener({"lorry": ["truck"], "sedan": ["car"]})
    changed: list[int] = []
    ctx = WebContext(index=index, accounts=accounts, session_secret="test-secret", store=store,
                     attention=attention, widener=widener,
                     alert_rules_changed=lambda: changed.append(1), **ctx_kwargs)
    return World(ctx=ctx, app=create_app(ctx), index=index, store=store, attention=attention,
                 widener=widener, rules_changed=changed)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.index.close()


@pytest.fixture
def admin(world: World) -> TestClient:
    return world.client(ADMIN)


@pytest.fixture
def viewer(world: World) -> TestClient:
    return world.client(VIEWER)


def ids(body: dict[str, Any]) -> list[str]:
    return [r["frame_id"] for r in body["results"]]


# -- search ----------------------------------------------------------------------------


def test_search_answers_results_with_the_documented_fields(admin: TestClient) -> None:
    r = admin.get("/api/v1/search", params={"q": "truck"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"results", "total", "limit", "offset", "widened"}
    assert body["total"] == 2 and sorted(ids(body)) == ["c1-truck", "c2-truck"]
    item = next(x for x in body["results"] if x["frame_id"] == "c1-truck")
    for key in ("device_id", "frame_id", "captured_at", "caption", "score", "model", "frame_key",
                "caption_key", "error", "highlighted", "rank", "url", "thumbnail_url"):
        assert key in item
    assert item["device_id"] == "cam1" and item["caption"] == "a red truck parked on a street"
    assert item["captured_at"] == "2026-01-15T23:30:00Z"
    assert "<mark>truck</mark>" in item["highlighted"]
    assert item["thumbnail_url"] == "/api/v1/frames/cam1/c1-truck/thumbnail.jpg"
    assert item["url"] == "/frames/cam1/c1-truck"


def test_search_filters_apply_before_ranking(admin: TestClient) -> None:
    def search(**params: Any) -> list[str]:
        r = admin.get("/api/v1/search", params=params)
        assert r.status_code == 200, r.text
        return ids(r.json())

    assert search(q="truck", device="cam2") == ["c2-truck"]
    assert sorted(search(device=["cam1", "cam2"], q="truck")) == ["c1-truck", "c2-truck"]
    # night 22:00-06:00 in UTC: the truck at 23:30 and the bike at 03:00 (across midnight)
    assert sorted(search(time="22:00-06:00", device="cam1")) == ["c1-bike", "c1-truck"]
    # the same night seen from UTC+2: 23:30Z is 01:30 local (in), 03:00Z is 05:00 (in),
    # 12:00Z is 14:00 (out); 20:30Z would be 22:30
    assert sorted(search(time="22:00-06:00", tz=120, device="cam1")) == ["c1-bike", "c1-truck"]
    assert search(time="00:00-02:00", tz=120, device="cam1") == ["c1-truck"]
    assert search(errors_only="true") == ["c1-error"]
    assert search(min_score=-3.5) == ["c2-truck"]
    assert search(start="2026-01-16", device="cam1") == ["c1-bike"]
    assert sorted(search(end="2026-01-15", device="cam1")) == ["c1-dog", "c1-error", "c1-truck"]
    assert search(order="time", device="cam1", limit=2) == ["c1-bike", "c1-truck"]
    assert search(order="time_asc", device="cam1", limit=1, offset=1) == ["c1-error"]


def test_search_widens_words_outside_the_word_map(world: World, admin: TestClient) -> None:
    r = admin.get("/api/v1/search", params={"q": "lorry"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["widened"] == {"lorry": ["truck"]}
    assert sorted(ids(body)) == ["c1-truck", "c2-truck"]
    assert world.widener.asked[-1] == ["lorry"]


def test_a_failing_widener_does_not_fail_the_search(world: World, admin: TestClient) -> None:
    def broken(words: list[str]) -> dict[str, list[str]]:
        raise RuntimeError("encoder gone")

    world.widener.widen = broken  # type: ignore[method-assign]
    r = admin.get("/api/v1/search", params={"q": "truck"})
    assert r.status_code == 200 and r.json()["total"] == 2


def test_viewer_searches_only_its_devices(viewer: TestClient) -> None:
    r = viewer.get("/api/v1/search", params={"q": "truck"})
    assert r.status_code == 200
    assert ids(r.json()) == ["c1-truck"]
    r = viewer.get("/api/v1/search", params={"q": "secret"})
    assert r.json()["total"] == 0


def test_a_viewer_without_devices_sees_nothing(world: World) -> None:
    r = world.client(NOBODY).get("/api/v1/search")
    assert r.status_code == 200 and r.json()["total"] == 0 and r.json()["results"] == []
    assert world.client(NOBODY).get("/api/v1/devices").json() == {"devices": []}


# -- bad input -------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/api/v1/search?q=%22unbalanced", 400, "quote"),
    ("/api/v1/search?q=NOT", 400, "query"),
    ("/api/v1/search?limit=501", 422, "limit"),
    ("/api/v1/search?limit=0", 422, "limit"),
    ("/api/v1/search?limit=lots", 422, "limit"),
    ("/api/v1/search?offset=-1", 422, "offset"),
    ("/api/v1/search?start=2026-13-01", 422, "start"),
    ("/api/v1/search?end=yesterday", 422, "end"),
    ("/api/v1/search?start=2026-02-01&end=2026-01-01", 422, "end"),
    ("/api/v1/search?time=25:00-01:00", 422, "time"),
    ("/api/v1/search?time=10pm", 422, "time"),
    ("/api/v1/search?tz=2000", 422, "tz"),
    ("/api/v1/search?min_score=nan", 422, "min_score"),
    ("/api/v1/search?order=random", 422, "order"),
    ("/api/v1/search?errors_only=perhaps", 422, "errors_only"),
    ("/api/v1/search?device=..%2Fcam1", 422, "device_id"),
    ("/api/v1/search?device=cam9", 404, "unknown device"),
    ("/api/v1/search?q=" + "a" * 600, 422, "q"),
    ("/api/v1/frames/cam1/%2e%2e", 422, "frame_id"),
    ("/api/v1/frames/cam1/%2e%2e.jpg", 422, "frame_id"),
    ("/api/v1/frames/%2e%2e/c1-truck.jpg", 422, "device_id"),
    ("/api/v1/frames/cam1/..%2F..%2Fetc%2Fpasswd", 404, ""),
    ("/api/v1/frames/cam1/nope.jpg", 404, "unknown frame"),
    ("/api/v1/frames/cam1/c1-dog%00.jpg", 422, "frame_id"),
    ("/api/v1/frames/cam9/x/thumbnail.jpg", 404, "unknown frame"),
    ("/api/v1/devices/cam1/timeline?day=2026-02-30", 422, "day"),
    ("/api/v1/devices/cam1/timeline?hour=24", 422, "hour"),
    ("/api/v1/devices/cam9/timeline", 404, "unknown device"),
    ("/api/v1/devices/cam1/days?month=2026-13", 422, "month"),
    ("/api/v1/export?format=pdf", 422, "format"),
    ("/api/v1/export?max=99999999", 422, "max"),
    ("/api/v1/live?device=cam%2F1", 422, "device_id"),
    ("/api/v1/nothing-here", 404, "no such"),
]


@pytest.mark.parametrize(("url", "status", "words"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_a_message(admin: TestClient, url: str, status: int, words: str) -> None:
    r = admin.get(url)
    assert r.status_code == status, (url, r.status_code, r.text)
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert words.lower() in body["detail"].lower(), body
    assert "Traceback" not in r.text


def test_bad_rule_bodies_are_4xx(admin: TestClient) -> None:
    cases = [
        (b"{not json", 422),
        (json.dumps({"name": "x"}).encode(), 422),
        (json.dumps({"name": "x", "query": "truck", "extra": 1}).encode(), 422),
        (json.dumps({"name": "x", "query": "\"open"}).encode(), 400),
        (json.dumps({"name": "x", "query": "truck", "webhook_url": "ftp://x"}).encode(), 422),
        (json.dumps({"name": "x", "query": "truck", "cooldown_s": -1}).encode(), 422),
        (json.dumps({"name": "x", "query": "truck", "rule_id": "../x"}).encode(), 422),
        (json.dumps({"name": "x", "query": "truck", "devices": ["cam9/.."]}).encode(), 422),
    ]
    for body, status in cases:
        r = admin.post("/api/v1/rules", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["detail"], str)


def test_malformed_login_form_is_a_4xx(world: World) -> None:
    c = world.client()
    r = c.post("/login", content=b"\xff\xfe", headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500
    r = c.post("/login", data={"username": "admin"})
    assert r.status_code == 400 and "password" in r.json()["detail"]


def test_an_unexpected_error_is_a_500_without_traceback(world: World, admin: TestClient) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("secret internals")

    world.index.search = boom  # type: ignore[method-assign]
    client = TestClient(world.app, raise_server_exceptions=False)
    client.auth = ADMIN
    r = client.get("/api/v1/search")
    assert r.status_code == 500
    assert "secret internals" not in r.text and "Traceback" not in r.text
    assert "internal error" in r.json()["detail"]


# -- frames ----------------------------------------------------------------------------


def test_frame_jpeg_comes_from_s3_through_the_api(world: World, admin: TestClient) -> None:
    d = DOCS[0]
    r = admin.get("/api/v1/frames/cam1/c1-truck.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == world.store.objects[d.frame_key]


def test_thumbnail_is_320_wide_and_cached(world: World, admin: TestClient) -> None:
    r = admin.get("/api/v1/frames/cam1/c1-dog/thumbnail.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (240, 320, 3)
    reads = world.store.reads
    assert admin.get("/api/v1/frames/cam1/c1-dog/thumbnail.jpg").content == r.content
    assert world.store.reads == reads  # served from the cache


def test_frame_json_has_the_caption_and_s3_metadata(admin: TestClient) -> None:
    r = admin.get("/api/v1/frames/cam1/c1-truck")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == "a red truck parked on a street" and body["score"] == -4.0
    assert body["metadata"] == {"frame-id": "c1-truck", "quality": "85"}
    assert body["metadata_error"] is None
    assert body["attention_url"] == "/api/v1/frames/cam1/c1-truck/attention"


def test_s3_down_is_a_503_with_a_message_and_the_caption_still_serves(world: World, admin: TestClient) -> None:
    world.store.down = True
    r = admin.get("/api/v1/frames/cam1/c1-truck.jpg")
    assert r.status_code == 503 and "S3 is unavailable" in r.json()["detail"]
    assert admin.get("/api/v1/frames/cam1/c1-bike/thumbnail.jpg").status_code == 503
    r = admin.get("/api/v1/frames/cam1/c1-truck")
    assert r.status_code == 200 and r.json()["metadata"] is None
    assert "S3 is unavailable" in r.json()["metadata_error"]
    assert admin.get("/api/v1/search?q=truck").json()["total"] == 2


def test_a_frame_missing_in_s3_is_a_404(world: World, admin: TestClient) -> None:
    world.store.objects.pop(DOCS[1].frame_key)
    r = admin.get("/api/v1/frames/cam1/c1-dog.jpg")
    assert r.status_code == 404 and "not in S3" in r.json()["detail"]


def test_attention_runs_the_service(world: World, admin: TestClient) -> None:
    r = admin.get("/api/v1/frames/cam1/c1-truck/attention")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["words"] == ["a", "red", "truck", "parked", "on", "a", "street"] and body["grid"] == [2, 2]
    assert world.attention.calls == [("cam1", "c1-truck", len(world.store.objects[DOCS[0].frame_key]))]
    r = admin.get("/api/v1/frames/cam1/c1-error/attention")
    assert r.status_code == 422 and "no caption" in r.json()["detail"]


def test_attention_without_a_model_is_a_503(world: World, admin: TestClient) -> None:
    world.ctx.attention = None
    r = admin.get("/api/v1/frames/cam1/c1-truck/attention")
    assert r.status_code == 503 and "no captioning model" in r.json()["detail"]


# -- devices and timeline --------------------------------------------------------------


def test_devices_lists_latest_caption(admin: TestClient, viewer: TestClient) -> None:
    body = admin.get("/api/v1/devices").json()
    assert [d["device_id"] for d in body["devices"]] == ["cam1", "cam2"]
    cam1 = body["devices"][0]
    assert cam1["latest"]["frame_id"] == "c1-bike" and cam1["last_seen"] == "2026-01-16T03:00:00Z"
    assert [d["device_id"] for d in viewer.get("/api/v1/devices").json()["devices"]] == ["cam1"]


def test_timeline_of_a_local_day(admin: TestClient) -> None:
    r = admin.get("/api/v1/devices/cam1/timeline", params={"day": "2026-01-15"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hours"] == {"12": 1, "13": 1, "23": 1} and body["total"] == 3
    assert [c["frame_id"] for c in body["captions"]] == ["c1-dog", "c1-error", "c1-truck"]
    # at UTC+2 the 23:30Z truck belongs to the 16th (01:30 local), with the 03:00Z bike (05:00)
    body = admin.get("/api/v1/devices/cam1/timeline", params={"day": "2026-01-16", "tz": 120}).json()
    assert body["hours"] == {"1": 1, "5": 1}
    assert [c["frame_id"] for c in body["captions"]] == ["c1-truck", "c1-bike"]
    body = admin.get("/api/v1/devices/cam1/timeline", params={"day": "2026-01-16", "tz": 120, "hour": 5}).json()
    assert [c["frame_id"] for c in body["captions"]] == ["c1-bike"] and body["total"] == 2
    r = admin.get("/api/v1/devices/cam1/days", params={"month": "2026-01"})
    assert r.json()["days"] == {"2026-01-15": 3, "2026-01-16": 1}


# -- export ----------------------------------------------------------------------------


def test_export_jsonl_csv_and_zip(world: World, admin: TestClient) -> None:
    r = admin.get("/api/v1/export", params={"format": "jsonl", "device": "cam1", "order": "time_asc"})
    assert r.status_code == 200 and r.headers["x-total-count"] == "4"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["frame_id"] for x in lines] == ["c1-dog", "c1-error", "c1-truck", "c1-bike"]
    assert "attachment" in r.headers["content-disposition"]

    r = admin.get("/api/v1/export", params={"format": "csv", "q": "truck", "order": "time"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["frame_id"] for row in rows] == ["c1-truck", "c2-truck"]
    assert rows[0]["caption"] == "a red truck parked on a street"

    r = admin.get("/api/v1/export", params={"format": "zip", "device": "cam1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(zf.namelist())
    assert {"captions.jsonl", "export.json", "frames/cam1/c1-truck.jpg", "frames/cam1/c1-dog.jpg"} <= names
    assert zf.read("frames/cam1/c1-truck.jpg") == world.store.objects[DOCS[0].frame_key]
    captions = [json.loads(x) for x in zf.read("captions.jsonl").decode().splitlines()]
    assert len(captions) == 4
    summary = json.loads(zf.read("export.json"))
    assert summary["total"] == 4 and summary["truncated"] is False
    assert any("c1-error" in m for m in summary["missing_frames"])  # no image for an error record


def test_export_is_capped_and_says_so(tmp_path: Path) -> None:
    world = make_world(tmp_path, export_max=2)
    try:
        c = world.client(ADMIN)
        r = c.get("/api/v1/export", params={"format": "jsonl"})
        assert r.headers["x-export-truncated"] == "true" and r.headers["x-total-count"] == "6"
        assert r.headers["x-export-count"] == "2" and len(r.text.splitlines()) == 2
        zf = zipfile.ZipFile(io.BytesIO(c.get("/api/v1/export", params={"format": "zip"}).content))
        summary = json.loads(zf.read("export.json"))
        assert summary["truncated"] is True and "first 2 of 6" in summary["note"]
    finally:
        world.index.close()


def test_export_pages_through_more_than_one_index_page(tmp_path: Path) -> None:
    many = [doc("cam1", f"f{i:04d}", DAY + timedelta(seconds=i), f"a truck number {i}") for i in range(1203)]
    world = make_world(tmp_path, docs=many)
    try:
        r = world.client(ADMIN).get("/api/v1/export", params={"format": "jsonl", "order": "time_asc"})
        frames = [json.loads(x)["frame_id"] for x in r.text.splitlines()]
        assert frames == [f"f{i:04d}" for i in range(1203)]
    finally:
        world.index.close()


# -- rules -----------------------------------------------------------------------------


def test_rules_create_list_delete(world: World, admin: TestClient) -> None:
    r = admin.post("/api/v1/rules", json={"name": "Trucks at night", "query": "truck OR lorry",
                                          "devices": ["cam1"], "min_score": -8, "cooldown_s": 60,
                                          "webhook_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["rule_id"].startswith("trucks-at-night-") and rule["owner"] == "admin"
    assert rule["devices"] == ["cam1"] and world.rules_changed == [1]
    assert [x["rule_id"] for x in admin.get("/api/v1/rules").json()["rules"]] == [rule["rule_id"]]
    stored = world.index.rules()[0]
    assert stored.query == "truck OR lorry" and stored.cooldown_s == 60 and stored.devices == ("cam1",)
    assert admin.delete(f"/api/v1/rules/{rule['rule_id']}").status_code == 204
    assert world.index.rules() == [] and world.rules_changed == [1, 1]
    assert admin.delete(f"/api/v1/rules/{rule['rule_id']}").status_code == 404


def test_a_viewer_rule_is_bound_to_its_devices(world: World, viewer: TestClient, admin: TestClient) -> None:
    r = viewer.post("/api/v1/rules", json={"name": "mine", "query": "dog"})
    assert r.status_code == 201 and r.json()["devices"] == ["cam1"] and r.json()["owner"] == "viewer1"
    r = viewer.post("/api/v1/rules", json={"name": "theirs", "query": "cat", "devices": ["cam2"]})
    assert r.status_code == 404 and "cam2" in r.json()["detail"]
    admin_rule = admin.post("/api/v1/rules", json={"name": "admin", "query": "cat", "rule_id": "adm"}).json()
    assert [x["name"] for x in viewer.get("/api/v1/rules").json()["rules"]] == ["mine"]
    assert viewer.delete(f"/api/v1/rules/{admin_rule['rule_id']}").status_code == 404
    r = viewer.post("/api/v1/rules", json={"name": "x", "query": "dog", "rule_id": "adm"})
    assert r.status_code == 403
    assert {x.rule_id for x in world.index.rules()} >= {"adm"}
    assert world.client(NOBODY).post("/api/v1/rules", json={"name": "x", "query": "dog"}).status_code == 403
    # a viewer may not make the server POST to an address of its choosing
    r = viewer.post("/api/v1/rules", json={"name": "hook", "query": "dog", "webhook_url": "http://10.0.0.1/x"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert "hook" not in {x.name for x in world.index.rules()}


# -- status, health, metrics -----------------------------------------------------------


def test_status_healthz_and_metrics(world: World, admin: TestClient) -> None:
    world.ctx.feed_status = lambda: {"mqtt_connected": True, "s3_ok": False,
                                     "last_caption_at": DAY, "behind": "S3 is down since 10:00"}
    body = admin.get("/api/v1/status").json()
    assert body["captions"] == 6 and body["devices"] == 2 and body["feed"]["behind"].startswith("S3")
    assert body["feed"]["last_caption_at"] == "2026-01-15T00:00:00Z"
    anon = world.client()
    h = anon.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["feed_current"] is False
    admin.get("/api/v1/search", params={"q": "truck"})
    admin.get("/api/v1/search", params={"q": "dog"})
    world.ctx.metrics.observe_indexed(DOCS[:2], now=DAY + timedelta(days=1))
    m = anon.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'framecap_web_searches_total{kind="api"} 2.0' in text
    assert "framecap_web_captions_indexed_total 2.0" in text
    assert "framecap_web_index_lag_seconds 1800.0" in text  # newest of the two is 23:30
    assert 'framecap_web_alerts_sent_total{channel="webhook"} 0.0' in text
    assert 'framecap_web_feed_up{part="mqtt"} 1.0' in text


def test_two_apps_do_not_share_metrics(tmp_path: Path) -> None:
    a = make_world(tmp_path / "a")
    b = make_world(tmp_path / "b")
    try:
        a.client(ADMIN).get("/api/v1/search")
        assert 'framecap_web_searches_total{kind="api"} 1.0' in a.client().get("/metrics").text
        assert 'framecap_web_searches_total{kind="api"}' not in b.client().get("/metrics").text
    finally:
        a.index.close()
        b.index.close()


def test_security_headers(admin: TestClient) -> None:
    r = admin.get("/api/v1/status")
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def test_page_routes_answer_errors_as_html_and_api_routes_as_json(world: World) -> None:
    c = world.client()
    c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]})
    html_accept = {"accept": "text/html,application/xhtml+xml"}
    for url in ("/no-such-page", "/frames/cam1/%2e%2e", "/devices/cam9"):
        r = c.get(url, headers=html_accept)
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert r.headers["content-type"].startswith("text/html"), url
        assert "Traceback" not in r.text
    r = c.get("/api/v1/frames/cam1/%2e%2e", headers=html_accept)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    r = c.get("/no-such-page")  # a script (no text/html): JSON
    assert r.status_code == 404 and "no such page" in r.json()["detail"]
