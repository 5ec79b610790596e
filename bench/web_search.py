"""Search at scale: index N synthetic captions and time searches, raw and through the API.

It measures and prints; it asserts nothing. Every ratio compares two things measured in this
run on this machine:

- indexing rate: captions/s of :meth:`SqliteIndex.upsert` in batches;
- search p50/p95 through the HTTP API (``GET /api/v1/search``, uvicorn on 127.0.0.1, HTTP Basic,
  JSON) against the same FTS5 ``MATCH`` with BM25 ordering run on the raw database file
  (API overhead ratio);
- a filtered search (one device, one week, night hours 22:00-06:00) against unfiltered;
- a device timeline page (HTML, one local day and hour);
- live delay: a caption published to the hub -> its ``event: caption`` at an SSE client of
  ``/api/v1/live`` (through uvicorn and HTTP, as a browser's EventSource gets it).

Captions are built from the default model's word map: a bigram model of the Flickr8k training
captions restricted to the word map when ``--karpathy-json`` exists, else words drawn with
Zipf weights. Targets (issue 7): search p95 < 100 ms at 1M captions through the API, indexing
> 2,000 captions/s, live delay < 100 ms.

    .venv/bin/python bench/web_search.py --captions 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sqlite3
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from cloud.web import query as ql
from cloud.web.app import create_app
from cloud.web.auth import Accounts
from cloud.web.deps import WebContext
from cloud.web.index_sqlite import SqliteIndex
from cloud.web.model import CaptionDoc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "cloud" / "models" / "default.pt"
DEFAULT_KARPATHY = REPO.parent / "shared" / "data" / "flickr8k" / "dataset_flickr8k.json"
SPECIAL = {"<start>", "<end>", "<pad>", "<unk>"}
QUERIES = [
    "man", "dog", "a dog", "two people", "street", "\"red shirt\"", "bike OR bicycle",
    "woman NOT beach", "girl swing", "black dog running", "snow", "skateboard ramp",
    "boy water", "\"a man\"", "crowd", "car", "ball grass", "child", "mountain", "baby",
]


def word_map_words(model: Path) -> list[str]:
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    return [w for w in ckpt["word_map"] if w not in SPECIAL]


def caption_sampler(words: list[str], karpathy: Path | None, rng: random.Random) -> Callable[[], str]:
    """A function returning one synthetic caption of word-map words."""
    vocab = set(words)
    if karpathy is not None and karpathy.is_file():
        data = json.loads(karpathy.read_text())
        nexts: dict[str, list[str]] = defaultdict(list)
        for image in data["images"]:
            if image.get("split") != "train":
                continue
            for sentence in image["sentences"]:
                tokens = ["<s>"] + [t for t in sentence["tokens"] if t in vocab] + ["</s>"]
                for a, b in zip(tokens, tokens[1:], strict=False):
                    nexts[a].append(b)

        def bigram() -> str:
            out: list[str] = []
            word = "<s>"
            while len(out) < 20:
                word = rng.choice(nexts[word])
                if word == "</s>":
                    break
                out.append(word)
            return " ".join(out) or "a man"

        return bigram
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(words))]
    shuffled = words[:]
    rng.shuffle(shuffled)

    def zipf() -> str:
        return " ".join(rng.choices(shuffled, weights, k=rng.randint(6, 14)))

    return zipf


def synthetic_docs(n: int, devices: int, days: int, sample: Callable[[], str],
                   rng: random.Random) -> Iterator[CaptionDoc]:
    end = datetime(2026, 11, 30, tzinfo=timezone.utc)
    span_s = days * 86400
    for i in range(n):
        device = f"cam{rng.randrange(devices):02d}"
        at = end - timedelta(seconds=rng.random() * span_s)
        frame = f"{at:%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}Z-{i:07d}"
        day = f"{at:%Y/%m/%d}"
        error = "image does not decode" if rng.random() < 0.002 else None
        yield CaptionDoc(
            device_id=device, frame_id=frame, captured_at=at,
            caption="" if error else sample(), score=None if error else -rng.uniform(2, 15),
            model="bench", frame_key=f"frames/{device}/{day}/{frame}.jpg",
            caption_key=f"captions/{device}/{day}/{frame}.json", error=error)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2),
            "n": len(ordered)}


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """The app under uvicorn on a thread (127.0.0.1, a free port)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def live_delays(ctx: WebContext, base: str, auth: tuple[str, str], n: int) -> list[float]:
    """ms from ``ctx.live.publish(doc)`` to the SSE client reading its event."""
    sent: dict[str, float] = {}
    delays: list[float] = []
    ready = threading.Event()
    done = threading.Event()

    def reader() -> None:
        with httpx.Client(auth=auth, timeout=30) as client, \
                client.stream("GET", f"{base}/api/v1/live", headers={"Accept": "text/event-stream"}) as r:
            ready.set()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    payload = json.loads(line[5:])
                    t = sent.get(payload.get("frame_id", ""))
                    if t is not None:
                        delays.append((time.perf_counter() - t) * 1000)
                        if len(delays) >= n:
                            done.set()
                            return

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(10)
    deadline = time.monotonic() + 10
    while ctx.live.clients == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    now = datetime.now(timezone.utc)
    for i in range(n):
        frame = f"live-{i:05d}"
        doc = CaptionDoc(device_id="cam00", frame_id=frame, captured_at=now, caption="a dog runs",
                         score=-3.0, model="bench", frame_key=f"frames/cam00/x/{frame}.jpg",
                         caption_key=f"captions/cam00/x/{frame}.json")
        sent[frame] = time.perf_counter()
        ctx.live.publish(doc)
        time.sleep(0.02)  # paces the publisher like a camera; not a wait for a result
    done.wait(30)
    return delays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--captions", type=int, default=1_000_000, help="captions to index")
    p.add_argument("--devices", type=int, default=20, help="devices the captions spread over")
    p.add_argument("--days", type=int, default=60, help="days the captions spread over")
    p.add_argument("--batch", type=int, default=5000, help="captions per upsert")
    p.add_argument("--repeat", type=int, default=5, help="runs of each query")
    p.add_argument("--live-events", type=int, default=50, help="captions sent to measure live delay")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model whose word map builds captions")
    p.add_argument("--karpathy-json", type=Path, default=DEFAULT_KARPATHY,
                   help="captions for a bigram model (Zipf word draws when missing)")
    p.add_argument("--db", type=Path, default=None, help="reuse/keep the index here (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="framecap-bench-"))
    db = args.db or tmp / "index.db"
    index = SqliteIndex(db)
    results: dict[str, Any] = {"captions": args.captions}
    have = index.count()
    if have < args.captions:
        sample = caption_sampler(word_map_words(args.model), args.karpathy_json, rng)
        batch: list[CaptionDoc] = []
        t0 = time.perf_counter()
        done = 0
        for doc in synthetic_docs(args.captions - have, args.devices, args.days, sample, rng):
            batch.append(doc)
            if len(batch) >= args.batch:
                index.upsert(batch)
                done += len(batch)
                batch.clear()
                if done % 100_000 == 0:
                    print(f"indexed {done:,} ({done / (time.perf_counter() - t0):,.0f}/s)", flush=True)
        if batch:
            index.upsert(batch)
            done += len(batch)
        seconds = time.perf_counter() - t0
        results["indexing"] = {"captions_per_s": round(done / seconds), "seconds": round(seconds, 1),
                               "target_per_s": 2000, "ratio_to_target": round(done / seconds / 2000, 2)}
        print(json.dumps({"indexing": results["indexing"]}), flush=True)

    accounts = Accounts.from_users({"bench": ("bench-password", "admin", [])})
    ctx = WebContext(index=index, accounts=accounts, session_secret="bench-secret")
    server = Server(create_app(ctx))
    auth = ("bench", "bench-password")
    raw = sqlite3.connect(str(db), check_same_thread=False)
    try:
        with httpx.Client(base_url=server.url, auth=auth, timeout=30) as client:
            def api(params: dict[str, Any]) -> Callable[[], Any]:
                def call() -> Any:
                    r = client.get("/api/v1/search", params=params)
                    r.raise_for_status()
                    return r.json()
                return call

            def raw_fts(q: str) -> Callable[[], Any]:
                parsed = ql.parse_query(q)
                assert parsed is not None
                match = ql.to_fts5(parsed)

                def call() -> Any:
                    rows = raw.execute("SELECT rowid, bm25(captions_fts) FROM captions_fts WHERE captions_fts "
                                       "MATCH ? ORDER BY bm25(captions_fts) LIMIT 50", (match,)).fetchall()
                    total = raw.execute("SELECT count(*) FROM captions_fts WHERE captions_fts MATCH ?",
                                        (match,)).fetchone()
                    return rows, total
                return call

            positive = [q for q in QUERIES if "NOT" not in q]
            api(params={"q": "warmup"})()
            api_ms = [t for q in QUERIES for t in timed(api({"q": q, "limit": 50}), args.repeat)]
            raw_ms = [t for q in positive for t in timed(raw_fts(q), args.repeat)]
            results["search_api"] = percentiles(api_ms)
            results["search_raw_fts5"] = percentiles(raw_ms)
            results["api_overhead_ratio_p95"] = round(results["search_api"]["p95_ms"]
                                                      / max(results["search_raw_fts5"]["p95_ms"], 1e-3), 2)
            week_end = datetime(2026, 11, 30, tzinfo=timezone.utc)
            filtered = {"device": "cam03", "start": (week_end - timedelta(days=7)).date().isoformat(),
                        "end": week_end.date().isoformat(), "time": "22:00-06:00", "limit": 50}
            filt_ms = [t for q in QUERIES for t in timed(api({**filtered, "q": q}), args.repeat)]
            results["search_api_filtered"] = percentiles(filt_ms)
            results["filtered_vs_unfiltered_p95"] = round(results["search_api_filtered"]["p95_ms"]
                                                          / max(results["search_api"]["p95_ms"], 1e-3), 2)
            by_time = [t for q in QUERIES for t in timed(api({"q": q, "order": "time"}), args.repeat)]
            results["search_api_by_time"] = percentiles(by_time)
            day = (week_end - timedelta(days=1)).date().isoformat()

            def timeline() -> Any:
                r = client.get("/devices/cam03", params={"day": day, "hour": "12"})
                r.raise_for_status()
                return r.text

            results["timeline_page"] = percentiles(timed(timeline, args.repeat * 4))
            results["search_target_p95_ms"] = 100
            results["search_p95_ratio_to_target"] = round(
                max(results["search_api"]["p95_ms"], results["search_api_filtered"]["p95_ms"]) / 100, 2)
        delays = live_delays(ctx, server.url, auth, args.live_events)
        if delays:
            results["live_delay"] = percentiles(delays)
            results["live_delay"]["target_ms"] = 100
    finally:
        server.stop()
        raw.close()
        index.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
