"""The caption worker's listing passes as the bucket grows (issue 8 item 11), on a private stack.

Starts its own local stack (mosquitto + SeaweedFS on free ports, thrown away at the end) and
fills one bucket the way a fleet fills it: ``--devices`` devices, days of frames each with its
caption in days older than the worker's window, and in today's prefix a few captioned frames and
``--new-today`` frames per device without a caption (no ack came). Then, at ``--small`` objects
and again after growing the SAME bucket to ``--large`` objects (more old days):

* ``periodic``: the worker's periodic pass (``scan(full=False)``: the recent days, from the
  cursors a full pass left), median of ``--passes`` passes;
* ``full``: the worker's full pass (``scan(full=True)``: both prefixes streamed and merge-joined);
* ``old scan``: the scan every pass made before (the set of every caption key, then every frame
  key), the baseline, measured in the same run.

For each: seconds, LIST calls (counted on the S3 client), keys listed, and the peak Python memory
of one more pass under tracemalloc. The periodic pass should stay flat as the bucket grows
(ratio large/small ~1.0) while full passes and the old scan grow with it (~10). The worker runs
with ``WorkerConfig`` defaults (``recent_days`` 2) but ``listing_settle_s`` = ``--settle``
(default 0: the cursors stand at the newest captioned frame at both sizes; with the config's
600 s, every periodic pass also lists the frames stored in the last ten minutes, here all of
today's at the first size and none at the second). Prints JSON lines, then a markdown table.
``make bench-listing``::

    .venv/bin/python bench/worker_listing.py [--small 20000 --large 200000 --threads 24]

Populating 200,000 objects takes minutes (tiny bodies, ``--threads`` concurrent puts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from botocore.config import Config
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.worker import CaptionWorker  # noqa: E402
from common.config import S3Config, WorkerConfig  # noqa: E402
from common.stack import LocalStack  # noqa: E402
from common.storage import ObjectStore  # noqa: E402
from common.topics import InvalidIdError, parse_frame_key  # noqa: E402

logger = logging.getLogger("bench.worker_listing")
OLD_GAP_DAYS = 4  # old days start this many days ago: outside tomorrow, today and yesterday


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (floats rounded)."""
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
    print(json.dumps(out), flush=True)


class StubCaptioner:
    """The worker is never started here: no frame is captioned."""

    name = "none"

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        raise AssertionError("the bench only lists")


def client_for(config: S3Config, pool: int) -> Any:
    """A boto3 client for ``config`` with ``pool`` connections (the puts run that many at once)."""
    assert config.access_key_id is not None and config.secret_access_key is not None
    return boto3.session.Session().client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        aws_access_key_id=config.access_key_id.get_secret_value(),
        aws_secret_access_key=config.secret_access_key.get_secret_value(),
        config=Config(max_pool_connections=pool, s3={"addressing_style": "path"},
                      retries={"max_attempts": 6, "mode": "standard"}))


class ListCounter:
    """Counts the ListObjectsV2 requests a boto3 client sends."""

    def __init__(self, client: Any) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        client.meta.events.register("before-call.s3.ListObjectsV2", self._count)

    def _count(self, **_: Any) -> None:
        with self._lock:
            self.calls += 1


def frame_id(day: datetime, i: int) -> str:
    """An edge-like frame id: capture time, then a sequence number."""
    at = day + timedelta(seconds=2 * i)
    return f"{at:%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}Z-{i:06d}"


def pair(device: str, day: datetime, i: int, captioned: bool = True) -> list[str]:
    fid = frame_id(day, i)
    keys = [f"frames/{device}/{day:%Y/%m/%d}/{fid}.jpg"]
    if captioned:
        keys.append(f"captions/{device}/{day:%Y/%m/%d}/{fid}.json")
    return keys


def put_all(store: ObjectStore, keys: Sequence[str], threads: int, label: str) -> float:
    """Put a tiny body under every key, ``threads`` at once; returns objects per second."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(keys), desc=label, unit="obj",
                                                   mininterval=2.0, file=sys.stderr) as bar:
        for _ in pool.map(lambda key: store.put(key, b"x"), keys, chunksize=64):
            bar.update()
    return len(keys) / (time.perf_counter() - started)


class Fleet:
    """The keys of the bench: today's (fixed) and old days' (grown on demand)."""

    def __init__(self, devices: int, per_day: int, today_captioned: int, new_today: int) -> None:
        self.devices = [f"cam{d:02d}" for d in range(devices)]
        self.per_day = per_day
        now = datetime.now(timezone.utc)
        self.today = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
        self.today_keys = [k for dev in self.devices for i in range(today_captioned + new_today)
                           for k in pair(dev, self.today, i, captioned=i < today_captioned)]
        self.old_days = 0  # per device, from OLD_GAP_DAYS ago back

    def grow(self, objects: int) -> list[str]:
        """Keys of more old days (every frame captioned but one per device-day) so that the
        bucket holds at least ``objects``; the keys already put are not repeated."""
        keys: list[str] = []
        have = len(self.today_keys) + self.old_objects()
        while have + len(keys) < objects:
            day = self.today - timedelta(days=OLD_GAP_DAYS + self.old_days)
            for dev in self.devices:
                for i in range(self.per_day):
                    keys.extend(pair(dev, day, i, captioned=i != self.per_day // 2))
            self.old_days += 1
        return keys

    def old_objects(self) -> int:
        return self.old_days * len(self.devices) * (2 * self.per_day - 1)


def old_scan(store: ObjectStore) -> tuple[int, int]:
    """The listing every pass made before issue 8 item 11: every caption key in a set, then
    every frame key against it. Returns how many frames have no caption, and the keys listed."""
    captions = set(store.list_keys("captions/"))
    missing, listed = 0, len(captions)
    for key in store.list_keys("frames/"):
        listed += 1
        if key.endswith("/"):
            continue
        try:
            frame = parse_frame_key(key, check_date=False)
        except InvalidIdError:
            continue
        if frame.caption_key not in captions:
            missing += 1
    return missing, listed


def measure(name: str, run: Callable[[], Any], counter: ListCounter, times: int,
            keys_seen: Callable[[], int] | None = None) -> dict[str, Any]:
    """``run`` ``times`` times: median seconds, LIST calls and keys of the last run; then once
    more under tracemalloc for the peak Python memory."""
    seconds, calls = [], 0
    for _ in range(times):
        before = counter.calls
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
        calls = counter.calls - before
    keys = keys_seen() if keys_seen is not None else None
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"pass": name, "seconds": statistics.median(seconds), "seconds_all": seconds,
            "list_calls": calls, "keys_listed": keys, "peak_mib": peak / 2**20}


def measure_size(worker: CaptionWorker, store: ObjectStore, counter: ListCounter, objects: int,
                 passes: int, full_passes: int) -> list[dict[str, Any]]:
    """The three passes on the bucket as it is (``objects`` keys in it)."""
    def last_keys() -> int:
        assert worker.last_pass is not None
        return worker.last_pass.keys_seen

    results = []
    full = measure("full", lambda: worker.scan(full=True), counter, full_passes, last_keys)
    results.append(full)
    # periodic passes from the cursors the full pass (just run, under tracemalloc) left
    results.append(measure("periodic", lambda: worker.scan(full=False), counter, passes, last_keys))
    listed = [0]

    def baseline() -> None:
        listed[0] = old_scan(store)[1]

    results.append(measure("old scan", baseline, counter, full_passes, lambda: listed[0]))
    for result in results:
        result["objects"] = objects
        emit({"mode": "pass", **result})
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| objects | pass | seconds (median) | LIST calls | keys listed | peak Python MiB |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['objects']:,} | {r['pass']} | {r['seconds']:.3f} | {r['list_calls']:,} "
                     f"| {r['keys_listed']:,} | {r['peak_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The caption worker's periodic and full listing "
                                "passes at two bucket sizes, against the old all-keys scan.")
    p.add_argument("--devices", type=int, default=10, help="devices (default: 10)")
    p.add_argument("--per-day", type=int, default=500,
                   help="frames per device in each old day (default: 500)")
    p.add_argument("--today-captioned", type=int, default=20,
                   help="captioned frames per device in today's prefix (default: 20)")
    p.add_argument("--new-today", type=int, default=3,
                   help="frames per device in today's prefix without a caption (default: 3)")
    p.add_argument("--small", type=int, default=20_000, help="objects first (default: 20000)")
    p.add_argument("--large", type=int, default=200_000,
                   help="objects after growing the same bucket (default: 200000)")
    p.add_argument("--passes", type=int, default=5,
                   help="periodic passes per size, the median is reported (default: 5)")
    p.add_argument("--full-passes", type=int, default=3,
                   help="full passes and old scans per size, median (default: 3)")
    p.add_argument("--settle", type=float, default=0.0,
                   help="the worker's listing_settle_s, seconds (default: 0; the config's: 600)")
    p.add_argument("--threads", type=int, default=24,
                   help="concurrent puts while populating (default: 24)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emit({"mode": "machine", "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
          "argv": sys.argv[1:]})
    fleet = Fleet(args.devices, args.per_day, args.today_captioned, args.new_today)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="framecap-listing-bench-") as tmp:
        stack = LocalStack(Path(tmp) / "stack")
        stack.up(timeout_s=120.0)
        try:
            bucket = f"listing-{uuid.uuid4().hex[:8]}"
            stack.storage(bucket).ensure_bucket()
            admin_config = stack.s3_config(bucket)
            admin = ObjectStore(admin_config, client=client_for(admin_config, args.threads))
            worker_config = stack.s3_config(bucket, role="worker")
            worker_client = client_for(worker_config, 4)
            counter = ListCounter(worker_client)
            store = ObjectStore(worker_config, client=worker_client)
            worker = CaptionWorker(WorkerConfig(s3=worker_config, listing_settle_s=args.settle),
                                   StubCaptioner(), store=store, client_id="bench-listing")
            rate = put_all(admin, fleet.today_keys, args.threads, "today")
            for size in (args.small, args.large):
                keys = fleet.grow(size)
                rate = put_all(admin, keys, args.threads, f"to {size:,}")
                objects = len(fleet.today_keys) + fleet.old_objects()
                emit({"mode": "populated", "objects": objects, "old_days_per_device": fleet.old_days,
                      "puts_per_s": rate, "loadavg": list(os.getloadavg())})
                rows.extend(measure_size(worker, store, counter, objects, args.passes,
                                         args.full_passes))
        finally:
            stack.down(timeout_s=5.0)

    def ratio(name: str) -> float:
        small, large = (r for r in rows if r["pass"] == name)
        return float(large["seconds"] / small["seconds"])

    sizes = sorted({r["objects"] for r in rows})
    periodic_large = next(r for r in rows if r["pass"] == "periodic" and r["objects"] == sizes[-1])
    old_large = next(r for r in rows if r["pass"] == "old scan" and r["objects"] == sizes[-1])
    summary = {"mode": "summary", "objects": sizes,
               "periodic_large_over_small": ratio("periodic"),
               "full_large_over_small": ratio("full"),
               "old_scan_large_over_small": ratio("old scan"),
               "old_scan_over_periodic_at_large": old_large["seconds"] / periodic_large["seconds"],
               "loadavg": list(os.getloadavg())}
    emit(summary)
    print()
    print(table(rows))
    print()
    print(f"periodic {sizes[-1]:,}/{sizes[0]:,}: {summary['periodic_large_over_small']:.2f}x; "
          f"full: {summary['full_large_over_small']:.2f}x; old scan: "
          f"{summary['old_scan_large_over_small']:.2f}x; at {sizes[-1]:,} the old scan takes "
          f"{summary['old_scan_over_periodic_at_large']:.0f}x the periodic pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
