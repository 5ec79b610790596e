"""``docs/openapi.json`` is the API's current schema (refresh it when this fails)."""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

from cloud.web.openapi import REFRESH_COMMAND, render, schema

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "docs" / "openapi.json"


def test_checked_in_schema_is_current() -> None:
    current = render()
    assert CHECKED_IN.exists(), f"docs/openapi.json is missing; make it with: {REFRESH_COMMAND}"
    stored = CHECKED_IN.read_text(encoding="utf-8")
    if stored != current:
        diff = "".join(list(difflib.unified_diff(stored.splitlines(True), current.splitlines(True),
                                                 "docs/openapi.json", "current"))[:60])
        raise AssertionError(f"docs/openapi.json is stale; refresh it with:\n  {REFRESH_COMMAND}\n{diff}")


def test_schema_documents_every_api_route_and_its_login() -> None:
    doc = schema()
    paths = doc["paths"]
    for path in ("/api/v1/search", "/api/v1/devices", "/api/v1/devices/{device_id}/timeline",
                 "/api/v1/devices/{device_id}/days", "/api/v1/frames/{device_id}/{frame_id}",
                 "/api/v1/frames/{device_id}/{frame_id}.jpg", "/api/v1/frames/{device_id}/{frame_id}/thumbnail.jpg",
                 "/api/v1/frames/{device_id}/{frame_id}/attention", "/api/v1/export", "/api/v1/live",
                 "/api/v1/rules", "/api/v1/rules/{rule_id}", "/api/v1/status", "/healthz", "/metrics"):
        assert path in paths, path
    assert doc["security"] == [{"basic": []}, {"session": []}]
    assert paths["/healthz"]["get"]["security"] == [] and paths["/metrics"]["get"]["security"] == []
    item = doc["components"]["schemas"]["SearchResult"]["properties"]
    assert {"device_id", "frame_id", "captured_at", "caption"} <= set(item)
    params = {p["name"] for p in paths["/api/v1/search"]["get"]["parameters"]}
    assert params == {"q", "device", "start", "end", "time", "tz", "min_score", "errors_only", "order",
                      "limit", "offset"}


def test_module_prints_the_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "cloud.web.openapi"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert json.loads(out)["info"]["title"] == "framecap web"
