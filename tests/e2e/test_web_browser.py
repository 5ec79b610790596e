"""framecap web as a person uses it, in a real headless Chromium, on the real pipeline.

Real servers throughout: mosquitto and SeaweedFS (the session's local stack), the ingest and
the caption worker with the committed default model, the edge daemon on real videos, and
``framecap web`` as its own process (the CLI a user runs). Then, in the browser: log in, see
the devices, search, filter, open a frame and one word's attention map, watch a caption arrive
live, create an alert rule and receive its alert on MQTT (as the device) and at a local
webhook receiver (signature checked); and a viewer of one camera cannot reach the other's.

Every wait is on an event (a page element, a counter, a log line), never a fixed sleep.
``FRAMECAP_SCREENSHOTS=docs/screenshots`` saves a screenshot of each page.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.ingest import IngestService
from cloud.web.alerts import verify_signature
from cloud.web.auth import add_user
from cloud.worker import CaptionWorker
from common.config import EdgeConfig, IngestConfig, SamplingConfig, SpoolConfig, WorkerConfig
from common.messages import CaptionRecord
from common.mqtt import MqttClient
from edge.daemon import EdgeDaemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "e2e-webhook-secret"
STOP_WORDS = {"a", "an", "the", "is", "are", "in", "on", "of", "with", "and", "at", "to", "his",
              "her", "their", "its", "while", "down", "up", "by", "for", "from", "into", "two"}


# -- the pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioner() -> Any:
    from cloud.captioning.inference import Captioner

    return Captioner.load(None, device="cpu", beam_size=3)


class Namespace:
    """This module's share of the session's stack: its own topic prefix, bucket and devices."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        token = uuid.uuid4().hex[:10]
        self.prefix, self.bucket = f"t{token}", f"t-{token}"
        stack.storage(self.bucket).ensure_bucket()
        stack.grant_bucket(self.bucket)  # the services' least-privilege identities may use it

    def device(self, name: str) -> str:
        device_id = f"{name}-{uuid.uuid4().hex[:6]}"
        self.stack.add_device(device_id)
        return device_id

    def client_id(self, role: str) -> str:
        return f"{role}-{self.prefix}-{uuid.uuid4().hex[:6]}"

    def mqtt_config(self, user: str, **fields: Any) -> Any:
        return self.stack.mqtt_config(user, topic_prefix=self.prefix, **fields)

    def s3_config(self, role: str = "admin") -> Any:
        return self.stack.s3_config(self.bucket, role=role)


@pytest.fixture(scope="module")
def ns(local_stack: Any) -> Namespace:
    return Namespace(local_stack)


@pytest.fixture(scope="module")
def pipeline(ns: Any, captioner: Any) -> Iterator[dict[str, str]]:
    """Ingest + worker running; devices ``street-*`` and ``desk-*``."""
    devices = {"street": ns.device("street"), "desk": ns.device("desk")}
    ingest = IngestService(IngestConfig(mqtt=ns.mqtt_config("ingest"), s3=ns.s3_config("ingest")),
                           client_id=ns.client_id("ingest"))
    worker = CaptionWorker(WorkerConfig(mqtt=ns.mqtt_config("worker"), s3=ns.s3_config("worker"), batch_size=8,
                                        max_wait_s=0.1, list_interval_s=5.0),
                           captioner=captioner, client_id=ns.client_id("worker"))
    ingest.start()
    worker.start()
    assert ingest.wait_connected(10) and worker.wait_connected(10)
    try:
        yield devices
    finally:
        worker.stop()
        ingest.stop()


def run_edge(ns: Any, device_id: str, video: Path, spool: Path, frames: int, interval_s: float = 2.0) -> list[CaptionRecord]:
    """Run the edge daemon over ``video`` until ``frames`` are captioned; returns the captions
    in capture order (frame_ids start with the capture time)."""
    captions: list[CaptionRecord] = []
    config = EdgeConfig(
        device_id=device_id, source=str(video), mqtt=ns.mqtt_config(device_id, client_id=ns.client_id(device_id)),
        spool=SpoolConfig(directory=spool), max_frames=frames,
        sampling=SamplingConfig(interval_s=interval_s, scene_change=False),
        drain_timeout_s=120, wait_for_captions_s=120,
    )
    summary = EdgeDaemon(config, on_caption=captions.append, print_captions=False).run()
    assert summary.frames_sampled == frames
    assert len(captions) == frames, f"{device_id}: {len(captions)} captions of {frames} frames"
    return sorted(captions, key=lambda r: r.frame_id)  # arrival order is not capture order


# -- framecap web, as its own process ----------------------------------------------------
class WebProcess:
    """``framecap web`` run as a user runs it; the URL read from its 'serving on' line."""

    def __init__(self, ns: Any, state: Path, env: dict[str, str]) -> None:
        self.log = state / "web.log"
        cmd = [sys.executable, "-m", "common.cli", "web", "serve", "--state-dir", str(state),
               "--port", "0", "--topic-prefix", ns.prefix, "--bucket", ns.bucket,
               "--client-id", ns.client_id("web")]
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._out, text=True)
        self.url = self._wait_url(120)

    def _wait_url(self, timeout_s: float) -> str:
        found: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.search(r"serving on (http://\S+)", line)
                if m:
                    found.put(m.group(1))

        threading.Thread(target=read, daemon=True).start()
        try:
            return found.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"framecap web did not start:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._out.close()


class WebhookReceiver:
    """A local HTTP server (127.0.0.1, free port) that records every POST."""

    def __init__(self) -> None:
        self.posts: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                posts.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def site(ns: Any, pipeline: dict[str, str], shared_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Frames of two devices captioned, then ``framecap web`` on them; accounts admin and
    viewer (street only)."""
    tmp = tmp_path_factory.mktemp("web-e2e")
    street, desk = pipeline["street"], pipeline["desk"]
    street_caps = run_edge(ns, street, shared_dir / "videos" / "vtest.avi", tmp / "spool-street", 3)
    desk_caps = run_edge(ns, desk, shared_dir / "videos" / "box.mp4", tmp / "spool-desk", 2, interval_s=1.0)
    state = tmp / "web"
    state.mkdir()
    add_user(state / "accounts.yaml", "alice", "alice-password", "admin")
    add_user(state / "accounts.yaml", "victor", "victor-password", "viewer", [street])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMECAP_")}
    env.update(ns.stack.env("web", bucket=ns.bucket))
    env["FRAMECAP_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    env["PYTHONUNBUFFERED"] = "1"
    web = WebProcess(ns, state, env)
    receiver = WebhookReceiver()
    try:
        with httpx.Client(base_url=web.url, auth=("alice", "alice-password"), timeout=30) as api:
            deadline = time.monotonic() + 120
            while api.get("/api/v1/search", params={"limit": 1}).json()["total"] < 5:
                assert time.monotonic() < deadline, "the reindex never brought in the 5 captions"
                time.sleep(0.2)
            yield {"url": web.url, "street": street, "desk": desk, "street_caps": street_caps,
                   "desk_caps": desk_caps, "api": api, "receiver": receiver, "web": web, "tmp": tmp}
    finally:
        receiver.close()
        web.stop()


def content_word(caption: str, avoid: str = "") -> str:
    """A word of ``caption`` worth searching (not a stop word), absent from ``avoid``."""
    avoid_words = set(avoid.split())
    words = [w for w in caption.split() if w not in STOP_WORDS and len(w) > 2]
    for w in words:
        if w not in avoid_words:
            return w
    return words[0]


def login(browser: Any, base: str, user: str, password: str) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Europe/Berlin")
    page = context.new_page()
    page.goto(f"{base}/search")
    page.wait_for_selector("#login-form")
    page.fill("#login-username", user)
    page.fill("#login-password", password)
    page.click("#login-submit")
    page.wait_for_url(re.compile(r".*/search.*"))
    return page


def shot(page: Any, screenshot_dir: Path | None, name: str) -> None:
    if screenshot_dir is not None:
        page.screenshot(path=str(screenshot_dir / f"{name}.png"), full_page=True, animations="disabled")


# -- the tests -------------------------------------------------------------------------
def test_login_devices_search_filter_frame_attention(browser: Any, site: dict[str, Any],
                                                     screenshot_dir: Path | None) -> None:
    base = site["url"]
    page = browser.new_context().new_page()
    page.goto(f"{base}/devices")
    page.wait_for_selector("#login-form")  # logged out: the login page, not data
    page.fill("#login-username", "alice")
    page.fill("#login-password", "wrong")
    page.click("#login-submit")
    page.wait_for_selector("#login-error")
    page.context.close()

    page = login(browser, base, "alice", "alice-password")
    page.goto(f"{base}/devices")
    cards = page.locator(".device-card")
    cards.first.wait_for()
    text = page.inner_text("main") if page.locator("main").count() else page.content()
    assert site["street"] in text and site["desk"] in text
    shot(page, screenshot_dir, "devices")

    street_caption = site["street_caps"][0].caption
    word = content_word(street_caption, avoid=" ".join(c.caption for c in site["desk_caps"]))
    page.goto(f"{base}/search")
    page.fill("#search-q", word)
    page.locator("#search-form").evaluate("f => f.requestSubmit ? f.requestSubmit() : f.submit()")
    page.wait_for_selector(".result")
    results = page.locator(".result")
    assert results.count() >= 1
    assert page.locator(".result mark").first.inner_text().lower() == word
    assert f"q={word}" in page.url  # the URL holds the search's state
    shot(page, screenshot_dir, "search")

    # filtered to the other device, the same word finds nothing of the street camera
    page.goto(f"{base}/search?q={word}&device={site['desk']}")
    page.wait_for_selector("#total")
    assert site["street"] not in " ".join(page.locator(".result").all_inner_texts())

    # open a frame: the JPEG loads, a word's attention map is drawn over it
    frame = site["street_caps"][0]
    page.goto(f"{base}/frames/{frame.device_id}/{frame.frame_id}")
    page.wait_for_function("() => { const i = document.querySelector('#frame-img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert frame.caption in page.inner_text("body")
    noun = content_word(frame.caption)
    page.locator(".attn-word", has_text=noun).first.click()  # e.g. "skateboard": where it looked
    page.wait_for_function(
        "() => { const c = document.querySelector('#attn-canvas'); if (!c || !c.width) return false;"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " for (let i = 3; i < d.length; i += 4) { if (d[i] > 0) return true; } return false; }",
        timeout=60_000)
    page.wait_for_selector("#attn-canvas.on")  # shown over the frame
    shot(page, screenshot_dir, "frame-attention")
    page.goto(f"{base}/devices/{frame.device_id}")
    page.wait_for_selector("body")
    shot(page, screenshot_dir, "timeline")
    page.context.close()


def test_live_caption_and_alert_rule(browser: Any, site: dict[str, Any], ns: Any, shared_dir: Path,
                                     screenshot_dir: Path | None) -> None:
    base, street = site["url"], site["street"]
    receiver: WebhookReceiver = site["receiver"]
    first = site["street_caps"][0]
    word = content_word(first.caption)

    # the device listens on its alerts topic, as a Jetson would
    alerts: queue.Queue[bytes] = queue.Queue()
    device = MqttClient(ns.mqtt_config(street), ns.client_id(f"{street}-alerts"), clean_start=True)
    subscribed = threading.Event()
    device.on_connected(lambda _present: subscribed.set())
    device.subscribe(f"{ns.prefix}/{street}/alerts", lambda m: alerts.put(bytes(m.payload)))
    device.start()
    assert device.wait_connected(10) and subscribed.wait(10)

    page = login(browser, base, "alice", "alice-password")
    page.goto(f"{base}/alerts")
    page.wait_for_selector("#rule-form")
    page.fill("#rule-name", "e2e rule")
    page.fill("#rule-query", word)
    page.select_option("#rule-devices", [street])
    page.fill("#rule-cooldown", "0")
    page.fill("#rule-webhook", receiver.url)
    page.click("#rule-submit")
    page.wait_for_selector(".rule")
    assert word in page.inner_text("#rules")
    shot(page, screenshot_dir, "alerts")

    live = page.context.new_page()
    live.goto(f"{base}/live")
    live.wait_for_selector("#live-list", state="attached")
    live.wait_for_selector("#live-conn[data-state=open]")  # the EventSource is connected
    try:
        # the same first frame of the street video again: the same caption, a new frame_id
        again = run_edge(ns, street, shared_dir / "videos" / "vtest.avi", site["tmp"] / "spool-again", 1)[0]
        assert again.caption == first.caption
        live.wait_for_selector(f".live-item:has-text('{again.caption}')", timeout=60_000)
        shot(live, screenshot_dir, "live")

        payload = json.loads(alerts.get(timeout=60))
        assert payload["frame_id"] == again.frame_id and payload["device_id"] == street
        assert word in payload["matched_words"]
        headers, body = receiver.posts.get(timeout=60)
        assert json.loads(body)["frame_id"] == again.frame_id
        signature = headers.get("x-framecap-signature")
        assert verify_signature(body, signature, WEBHOOK_SECRET)
        assert not verify_signature(body, signature, "another secret")
    finally:
        device.stop()
        page.context.close()


def test_viewer_sees_only_its_device(browser: Any, site: dict[str, Any]) -> None:
    base, street, desk = site["url"], site["street"], site["desk"]
    page = login(browser, base, "victor", "victor-password")
    page.goto(f"{base}/devices")
    page.locator(".device-card").first.wait_for()
    text = page.inner_text("body")
    assert street in text and desk not in text
    other = site["desk_caps"][0]
    for path in (f"/frames/{desk}/{other.frame_id}", f"/api/v1/frames/{desk}/{other.frame_id}.jpg",
                 f"/devices/{desk}", f"/api/v1/search?device={desk}"):
        response = page.request.get(base + path)
        assert response.status in (403, 404), (path, response.status)
    page.goto(f"{base}/search?q={content_word(other.caption)}")
    page.wait_for_selector("#total")
    assert desk not in " ".join(page.locator(".result").all_inner_texts())
    page.context.close()
