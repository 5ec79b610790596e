"""Fixtures of the browser tests: a real headless Chromium driven by Playwright.

Playwright drives the system browser (Debian ``chromium``, ``executable_path``); it never
downloads one (``playwright install`` fails offline). Without the browser or Playwright the
tests are skipped, unless ``FRAMECAP_REQUIRE_BROWSER=1`` (CI sets it), which fails them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _unavailable(reason: str) -> None:
    if os.environ.get("FRAMECAP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a browser is required (FRAMECAP_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


def find_chromium() -> str | None:
    for candidate in (shutil.which("chromium"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright sync API), one per test module.

    Not per session: Playwright's sync API runs an asyncio loop on the main thread while it is
    open, and later tests that call ``asyncio.run`` (the live-stream tests) would fail."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install 'framecap[dev]')")
    executable = find_chromium()
    if executable is None:
        _unavailable("Chromium is not installed (apt-get install chromium; make setup does it as root)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path | None:
    """Where the tests save page screenshots (``FRAMECAP_SCREENSHOTS``), or None."""
    target = os.environ.get("FRAMECAP_SCREENSHOTS")
    if not target:
        return None
    path = Path(target)
    path.mkdir(parents=True, exist_ok=True)
    return path
