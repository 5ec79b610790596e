"""Accounts, login, HTTP Basic, and access: no route answers without a login (but /healthz and
/metrics), and a viewer of cam1 reaches no cam2 data by any URL. Routes are enumerated from
``app.routes``, so a new route that is not covered here fails these tests."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from cloud.web.app import route_table
from cloud.web.auth import Account, Accounts, AccountsError, add_user, safe_next

from .test_api import ADMIN, FAST_HASHER, NOBODY, VIEWER, World, make_world

PUBLIC = {("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/login"), ("POST", "/login"),
          ("POST", "/logout")}
"""Routes that answer without a login."""
PARAMS = {"device_id": "cam1", "frame_id": "c1-truck", "rule_id": "some-rule"}
CAM2_MARKERS = ("c2-truck", "c2-cat", "secret building", "secret couch", "secret-rule")
"""Strings only cam2's data (and the admin's cam2 rule) contain."""


def api_routes(world: World) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves, static files aside."""
    out = []
    for path, method in route_table(world.app):
        if method is None:
            assert path == "/static", f"unexpected mount {path}: cover it in these tests"
            continue
        out.append((method, path))
    assert ("GET", "/api/v1/search") in out and ("GET", "/healthz") in out
    return out


def fill(path: str, **values: str) -> str:
    params = {**PARAMS, **values}
    for name, value in params.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no test value for a parameter of {path}: add it to PARAMS"
    return path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.index.close()


# -- accounts --------------------------------------------------------------------------


def test_accounts_file_roundtrip_with_argon2_and_0600(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "accounts.yaml"
    add_user(path, "alice", "correct horse", "admin")
    add_user(path, "bob", "battery staple", "viewer", ["cam1", "cam3"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = yaml.safe_load(path.read_text())
    assert raw["users"]["alice"]["password_hash"].startswith("$argon2id$")
    assert "correct horse" not in path.read_text()
    accounts = Accounts.load(path)
    assert accounts.names() == ["alice", "bob"]
    bob = accounts.verify("bob", "battery staple")
    assert bob == Account("bob", "viewer", ("cam1", "cam3"))
    assert bob is not None and bob.allowed == {"cam1", "cam3"} and not bob.may_see("cam2")
    alice = accounts.verify("alice", "correct horse")
    assert alice is not None and alice.allowed is None and alice.may_see("anything")
    assert accounts.verify("bob", "wrong") is None
    assert accounts.verify("carol", "battery staple") is None
    assert accounts.verify("bob", "") is None


def test_add_user_replaces_a_password(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    add_user(path, "bob", "old", "viewer", ["cam1"])
    add_user(path, "bob", "new", "viewer", ["cam1"])
    accounts = Accounts.load(path)
    assert accounts.verify("bob", "old") is None and accounts.verify("bob", "new") is not None


@pytest.mark.parametrize(("content", "words"), [
    ("users: [1, 2]", "mapping"),
    ("users:\n  bob: {password_hash: plain, role: viewer}", "argon2"),
    ("users:\n  bob: {password_hash: $argon2id$x, role: boss}", "role"),
    ("users:\n  bob: {password_hash: $argon2id$x, devices: ['../x']}", "device_id"),
    ("users:\n  bob: {password_hash: $argon2id$x, colour: red}", "unknown keys"),
    ("users:\n  ../x: {password_hash: $argon2id$x}", "user name"),
    ("users: {bob: [", "YAML"),
])
def test_a_bad_accounts_file_says_what_is_wrong(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text(content)
    with pytest.raises(AccountsError, match=words):
        Accounts.load(path)


def test_add_user_refuses_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    with pytest.raises(AccountsError, match="role"):
        add_user(path, "bob", "pw", "boss")  # type: ignore[arg-type]
    with pytest.raises(AccountsError, match="empty"):
        add_user(path, "bob", "", "viewer")
    with pytest.raises(AccountsError, match="device_id"):
        add_user(path, "bob", "pw", "viewer", ["cam/1"])
    assert not path.exists()


def test_accounts_reload_when_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "accounts.yaml"
    add_user(path, "bob", "pw", "viewer", ["cam1"])
    accounts = Accounts.load(path)
    assert accounts.get("bob") is not None
    add_user(path, "carol", "pw2", "admin")
    os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
    accounts._checked_at -= 2  # the file is checked at most once a second
    assert accounts.get("carol") == Account("carol", "admin", ())


def test_safe_next_keeps_only_local_paths() -> None:
    assert safe_next("/search?q=truck") == "/search?q=truck"
    for bad in ("//evil.example/x", "https://evil.example", "javascript:alert(1)", "/\\evil", None, ""):
        assert safe_next(bad) == "/"


# -- login -----------------------------------------------------------------------------


def test_every_route_needs_a_login_but_healthz_and_metrics(world: World) -> None:
    anon = world.client()
    checked = 0
    for method, template in api_routes(world):
        if (method, template) in PUBLIC:
            continue
        url = fill(template)
        r = anon.request(method, url)
        checked += 1
        if url.startswith("/api/"):
            assert r.status_code == 401, (method, url, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"].startswith("Basic"), url
            assert "c1-truck" not in r.text and "red truck" not in r.text
        elif method == "GET":
            assert r.status_code == 303, (method, url, r.status_code)
            assert r.headers["location"].startswith("/login?next="), r.headers["location"]
        else:
            assert r.status_code in (303, 401), (method, url, r.status_code)
            if r.status_code == 303:
                assert r.headers["location"].startswith("/login")
    assert checked >= 14
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/metrics").status_code == 200


def test_a_page_redirects_to_login_and_back(world: World) -> None:
    if ("/search", "GET") not in route_table(world.app):
        pytest.skip("the pages are not part of this build")
    c = world.client()
    r = c.get("/search?q=truck", headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/search%3Fq%3Dtruck"
    r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "next": "/search?q=truck"})
    assert r.status_code == 303 and r.headers["location"] == "/search?q=truck"
    assert c.get("/search?q=truck").status_code == 200


def test_session_login_and_logout(world: World) -> None:
    c = world.client()
    assert c.get("/api/v1/status").status_code == 401
    r = c.post("/login", data={"username": VIEWER[0], "password": VIEWER[1], "next": "//evil.example"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "samesite=strict" in cookie and "httponly" in cookie
    assert c.get("/api/v1/status").json()["user"] == "viewer1"
    assert c.post("/logout").status_code == 303
    assert c.get("/api/v1/status").status_code == 401


def test_a_removed_account_loses_its_session(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    add_user(path, "bob", "pw", "admin")
    world = make_world(tmp_path)
    try:
        world.ctx.accounts = Accounts.load(path, hasher=FAST_HASHER)
        c = world.client()
        c.post("/login", data={"username": "bob", "password": "pw"})
        assert c.get("/api/v1/status").status_code == 200
        path.write_text("users: {}\n")
        os.utime(path, (1, 1))
        world.ctx.accounts._checked_at -= 2
        assert c.get("/api/v1/status").status_code == 401
    finally:
        world.index.close()


def test_a_forged_session_cookie_is_refused(world: World) -> None:
    c = world.client()
    c.cookies.set("framecap_session", "eyJ1c2VyIjogImFkbWluIn0=.forged.sig")
    assert c.get("/api/v1/status").status_code == 401


def test_wrong_password_redirects_back_with_a_message_or_401_json(world: World) -> None:
    c = world.client()
    r = c.post("/login", data={"username": "admin", "password": "nope", "next": "/search"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login?error=wrong")
    assert "next=/search" in r.headers["location"]
    r = c.post("/login", data={"username": "admin", "password": "nope"}, headers={"accept": "application/json"})
    assert r.status_code == 401 and r.json()["detail"] == "wrong user name or password"
    assert c.get("/api/v1/status").status_code == 401


def test_failed_logins_are_rate_limited_per_address(world: World) -> None:
    c = world.client()
    for _ in range(10):
        c.post("/login", data={"username": "admin", "password": "nope"}, headers={"accept": "application/json"})
    r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]}, headers={"accept": "application/json"})
    assert r.status_code == 429 and "too many failed logins" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 0


def test_http_basic_for_scripts(world: World) -> None:
    c = world.client()
    r = c.get("/api/v1/search", params={"q": "truck"}, auth=ADMIN)
    assert r.status_code == 200 and r.json()["total"] == 2
    r = c.get("/api/v1/search", auth=(ADMIN[0], "wrong"))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    r = c.get("/api/v1/search", headers={"authorization": "Basic !!!notbase64"})
    assert r.status_code == 401 and "Basic" in r.json()["detail"]
    r = c.get("/api/v1/search", auth=("ghost", "x"))
    assert r.status_code == 401


# -- a viewer of cam1 reaches no cam2 data ---------------------------------------------


def _no_cam2(r: Any, echo: str = "") -> None:
    """No cam2 data in the answer (``echo``: what the request itself named, e.g. ``cam2``, is
    removed from the text first: an error may repeat what was asked)."""
    assert r.status_code < 500, (r.request.url, r.status_code, r.text[:300])
    text = r.text if r.headers.get("content-type", "").startswith(("text", "application/json", "application/x-ndjson")) else ""
    if echo:
        text = text.replace(echo, "")
    for marker in (*CAM2_MARKERS, "cam2"):
        assert marker not in text, (r.request.url, marker, text[:500])


def _content_of_zip(r: Any) -> str:
    import io
    import zipfile

    zf = zipfile.ZipFile(io.BytesIO(r.content))
    return " ".join(zf.namelist()) + " " + zf.read("captions.jsonl").decode()


def test_a_viewer_of_cam1_cannot_reach_cam2_by_any_url(world: World) -> None:
    admin = world.client(ADMIN)
    r = admin.post("/api/v1/rules", json={"name": "secret-rule", "query": "cat", "devices": ["cam2"],
                                          "rule_id": "secret-rule"})
    assert r.status_code == 201
    viewer = world.client(VIEWER)
    # every route with a device in its path, asked about cam2 (frames that exist): 404 as if absent
    device_routes = [(m, p) for m, p in api_routes(world) if "{device_id}" in p]
    assert len(device_routes) >= 6
    for method, template in device_routes:
        for frame_id in ("c2-truck", "c2-cat", "no-such-frame"):
            url = fill(template, device_id="cam2", frame_id=frame_id)
            r = viewer.request(method, url)
            assert r.status_code == 404, (url, r.status_code, r.text[:300])
            _no_cam2(r, echo="cam2")
            r_missing = viewer.request(method, fill(template, device_id="cam7", frame_id=frame_id))
            assert r_missing.status_code == 404
            if url.startswith("/api/"):  # the same answer as a device that does not exist
                assert r.json()["detail"].replace("cam2", "X") == r_missing.json()["detail"].replace("cam7", "X")
    # every other route, with the requests that could leak cam2
    other: dict[tuple[str, str], Callable[[], object]] = {
        ("GET", "/api/v1/search"): lambda: (
            _expect(viewer.get("/api/v1/search", params={"device": "cam2"}), 404, "cam2"),
            _expect(viewer.get("/api/v1/search", params={"device": ["cam1", "cam2"]}), 404, "cam2"),
            _expect(viewer.get("/api/v1/search", params={"q": "truck OR cat OR building", "limit": 500}), 200),
            _expect(viewer.get("/api/v1/search", params={"order": "time", "errors_only": "false"}), 200),
        ),
        ("GET", "/api/v1/devices"): lambda: _expect(viewer.get("/api/v1/devices"), 200),
        ("GET", "/api/v1/export"): lambda: (
            _expect(viewer.get("/api/v1/export", params={"device": "cam2"}), 404, "cam2"),
            _expect(viewer.get("/api/v1/export", params={"format": "csv"}), 200),
            _expect(viewer.get("/api/v1/export", params={"format": "jsonl", "q": "truck OR cat"}), 200),
            _check_zip(viewer),
        ),
        ("GET", "/api/v1/live"): lambda: _expect(viewer.get("/api/v1/live", params={"device": "cam2"}), 404, "cam2"),
        ("GET", "/api/v1/rules"): lambda: _expect(viewer.get("/api/v1/rules"), 200),
        ("POST", "/api/v1/rules"): lambda: (
            _expect(viewer.post("/api/v1/rules", json={"name": "x", "query": "cat", "devices": ["cam2"]}), 404, "cam2"),
            _expect(viewer.post("/api/v1/rules", json={"name": "x", "query": "cat", "rule_id": "secret-rule"}), 403),
        ),
        ("DELETE", "/api/v1/rules/{rule_id}"): lambda: _expect(viewer.delete("/api/v1/rules/secret-rule"), 404, "secret-rule"),
        ("GET", "/api/v1/status"): lambda: _expect(viewer.get("/api/v1/status"), 200),
        ("GET", "/api/v1/openapi.json"): lambda: _expect(viewer.get("/api/v1/openapi.json"), 200),
        ("GET", "/healthz"): lambda: _expect(viewer.get("/healthz"), 200),
        ("GET", "/metrics"): lambda: _expect(viewer.get("/metrics"), 200),
        ("GET", "/login"): lambda: _expect(viewer.get("/login"), 200),
        ("POST", "/login"): lambda: None,
        ("POST", "/logout"): lambda: None,
        # pages (when present): the same data, as HTML
        ("GET", "/"): lambda: _expect(viewer.get("/"), 200),
        ("GET", "/devices"): lambda: _expect(viewer.get("/devices"), 200),
        ("GET", "/search"): lambda: (
            _expect(viewer.get("/search", params={"q": "truck OR cat OR building"}), 200),
            _expect(viewer.get("/search", params={"device": "cam2"}), 404, "cam2"),
        ),
        ("GET", "/live"): lambda: (_expect(viewer.get("/live"), 200),
                                   _expect(viewer.get("/live", params={"device": "cam2"}), 404, "cam2")),
        ("GET", "/alerts"): lambda: _expect(viewer.get("/alerts"), 200),
        ("POST", "/alerts"): lambda: _expect(
            viewer.post("/alerts", data={"name": "x", "query": "cat", "device": "cam2"}), 404, "cam2"),
        ("POST", "/alerts/{rule_id}/delete"): lambda: _expect(viewer.post("/alerts/secret-rule/delete"), 404, "secret-rule"),
    }
    uncovered = [r for r in api_routes(world) if "{device_id}" not in r[1] and r not in other]
    assert not uncovered, f"routes without a viewer-isolation check: {uncovered}"
    for route in api_routes(world):
        if route in other:
            other[route]()
    assert any(r.rule_id == "secret-rule" for r in world.index.rules())  # never deleted by the viewer
    assert not any("cam2" in (r.devices or ()) and r.owner == "viewer1" for r in world.index.rules())


def _expect(r: Any, status: int, echo: str = "") -> Any:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text[:300])
    _no_cam2(r, echo)
    return r


def _check_zip(viewer: TestClient) -> Any:
    r = viewer.get("/api/v1/export", params={"format": "zip"})
    assert r.status_code == 200
    content = _content_of_zip(r)
    assert "c1-truck" in content
    for marker in CAM2_MARKERS + ("cam2",):
        assert marker not in content
    return r


def test_a_viewer_without_devices_reaches_nothing(world: World) -> None:
    c = world.client(NOBODY)
    assert c.get("/api/v1/frames/cam1/c1-truck.jpg").status_code == 404
    assert c.get("/api/v1/export").text == ""
    assert c.get("/api/v1/devices/cam1/timeline").status_code == 404
