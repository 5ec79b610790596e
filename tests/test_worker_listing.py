"""The caption worker's listings cost what is new, not what exists (issue 8 item 11).

Unit tests with an in-memory store that records every LIST request, and integration tests on
the real local SeaweedFS (``stack_ns``): a periodic pass lists only the recent days from the
cursors, a full pass (at start, SIGHUP) lists everything by a merge join, and a frame without a
caption is never passed by a cursor.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.worker import (
    CaptionWorker,
    caption_key_for,
    caption_start_after,
    get_args_parser,
    install_full_listing_signal,
    join_captions,
)
from common.config import WorkerConfig
from common.storage import ListedObject, ObjectStore

OLD = datetime(2026, 1, 1, tzinfo=timezone.utc)  # stored long ago: settled


def _day(days_ago: int) -> str:
    return f"{datetime.now(timezone.utc) - timedelta(days=days_ago):%Y/%m/%d}"


def frame(device: str, day: str, frame_id: str) -> str:
    return f"frames/{device}/{day}/{frame_id}.jpg"


def caption(device: str, day: str, frame_id: str) -> str:
    return f"captions/{device}/{day}/{frame_id}.json"


class StubCaptioner:
    """Captions every image alike (the model is not under test here)."""

    name = "stub"

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        return [("a picture", -1.0) for _ in images]


class ListingStore:
    """An in-memory store with what a listing pass needs; records each LIST request
    (``requests``: prefix and StartAfter) and counts the keys they return."""

    def __init__(self) -> None:
        self.objects: dict[str, datetime] = {}  # key -> LastModified
        self.requests: list[tuple[str, str | None]] = []
        self.keys_returned = 0

    def add(self, *keys: str, at: datetime = OLD) -> None:
        for key in keys:
            self.objects[key] = at

    def list_pages(self, prefix: str = "", *, start_after: str | None = None,
                   page_size: int = 1000) -> Iterator[list[ListedObject]]:
        keys = sorted(k for k in self.objects
                      if k.startswith(prefix) and (start_after is None or k > start_after))
        for i in range(0, max(len(keys), 1), page_size):
            self.requests.append((prefix, start_after))
            page = [ListedObject(k, self.objects[k], 1) for k in keys[i:i + page_size]]
            self.keys_returned += len(page)
            yield page

    def list_keys(self, prefix: str = "", **_: Any) -> Iterator[str]:
        for page in self.list_pages(prefix):
            yield from (item.key for item in page)

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> Iterator[str]:
        self.requests.append((prefix, None))
        rests = [k[len(prefix):] for k in self.objects if k.startswith(prefix)]
        found = sorted({prefix + r.split(delimiter, 1)[0] + delimiter for r in rests if delimiter in r})
        self.keys_returned += len(found)
        return iter(found)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def make_worker(store: Any, **config: Any) -> CaptionWorker:
    config.setdefault("listing_settle_s", 0.0)
    return CaptionWorker(WorkerConfig(**config), StubCaptioner(), store=store, client_id="t-worker")


def queued(worker: CaptionWorker) -> set[str]:
    with worker._lock:
        return set(worker._pending)


# -- the merge join -------------------------------------------------------------------------
# ids where one is another plus a dot and more (a, a.jps) sort differently with .jpg and .json
IDS = st.one_of(
    st.builds(lambda base, tail: base + tail, st.sampled_from(["a", "ab", "a.j", "b0"]),
              st.sampled_from(["", ".jps", ".jpa", ".js", ".json", ".jpg", ".j", "-1", "_x", "0"])),
    st.text(alphabet="a.jpsgon-_0", min_size=1, max_size=6).filter(
        lambda s: s[0] not in "._-" and ".." not in s),
)


@settings(max_examples=300, deadline=None)
@given(frame_ids=st.sets(IDS, max_size=30), captioned=st.sets(IDS, max_size=30),
       days=st.lists(st.sampled_from(["cam1/2026/12/01", "cam1/2026/12/02", "cam1.x/2026/12/02",
                                      "cam1-y/2026/12/02"]), min_size=1, max_size=3))
def test_the_merge_join_equals_a_set_difference(
    frame_ids: set[str], captioned: set[str], days: list[str]
) -> None:
    """Ids that are prefixes of others plus a dot (``a``, ``a.jpz``) sort differently as
    ``.jpg`` and ``.json``: the join must still answer exactly."""
    frames = sorted({f"frames/{day}/{i}.jpg" for day in days for i in frame_ids}
                    | {"frames/loose.jpg", f"frames/{days[0]}/x.png"})
    captions = sorted({f"captions/{day}/{i}.json" for day in days for i in captioned}
                      | {"captions/orphan.json", "captions/not-json.txt"})
    joined = list(join_captions((ListedObject(k, OLD, 1) for k in frames), iter(captions)))
    expected = [(k, caption_key_for(k) in set(captions)) for k in frames]
    assert [(item.key, has) for item, has in joined] == expected


@settings(max_examples=300, deadline=None)
@given(cursor_id=IDS, others=st.sets(IDS, max_size=30))
def test_a_caption_listing_from_the_cursor_misses_no_caption_of_a_later_frame(
    cursor_id: str, others: set[str]
) -> None:
    day = "cam1/2026/12/02/"
    cursor = f"frames/{day}{cursor_id}.jpg"
    start = caption_start_after(day, cursor)
    for other in others:
        if f"frames/{day}{other}.jpg" > cursor:
            assert f"captions/{day}{other}.json" > start


def test_the_join_asks_for_no_captions_when_no_frame_is_listed() -> None:
    def captions() -> Iterator[str]:
        raise AssertionError("listed captions for no frames")
        yield ""  # pragma: no cover

    assert list(join_captions(iter([]), captions())) == []


# -- periodic passes (fake store) -------------------------------------------------------------
def test_a_periodic_pass_lists_only_the_recent_days_from_the_cursors() -> None:
    store = ListingStore()
    today, yesterday, old = _day(0), _day(1), _day(5)
    for i in range(20):
        store.add(frame("cam1", old, f"o{i:03d}"), caption("cam1", old, f"o{i:03d}"))
    store.add(frame("cam1", today, "t001"), caption("cam1", today, "t001"))
    worker = make_worker(store)
    assert worker.scan() == 0 and worker.last_pass is not None and worker.last_pass.kind == "full"
    store.add(frame("cam1", old, "late"))  # an old day: only a full pass sees it
    store.add(frame("cam1", yesterday, "y001"), frame("cam2", today, "t001"))
    store.requests.clear()
    assert worker.scan() == 2 and worker.last_pass.kind == "recent"
    assert queued(worker) == {frame("cam1", yesterday, "y001"), frame("cam2", today, "t001")}
    listed = [prefix for prefix, _ in store.requests]
    assert not any(old in prefix for prefix in listed)
    # today's frames of cam1 are listed after the cursor the full pass left
    assert (f"frames/cam1/{today}/", frame("cam1", today, "t001")) in store.requests
    assert worker.scan(full=True) == 1 and frame("cam1", old, "late") in queued(worker)


def test_a_periodic_pass_costs_devices_times_days_not_the_bucket() -> None:
    store = ListingStore()
    today = _day(0)
    worker = make_worker(store)
    for device in ("cam1", "cam2"):
        store.add(frame(device, today, "f1"), caption(device, today, "f1"))
    worker.scan()
    store.requests.clear()
    store.keys_returned = 0
    worker.scan()
    # outbox/, the devices, and frames of 2 devices x (tomorrow, today, yesterday): no caption
    # listing when no frame is listed after a cursor
    assert len(store.requests) == 1 + 1 + 2 * 3 and store.keys_returned == 2
    for i in range(500):
        store.add(frame("cam1", _day(3), f"o{i}"), caption("cam1", _day(3), f"o{i}"))
    store.requests.clear()
    store.keys_returned = 0
    worker.scan()
    assert len(store.requests) == 8 and store.keys_returned == 2
    assert worker.last_pass is not None and worker.last_pass.list_calls == 8


def test_listing_passes_are_exported_to_prometheus_by_kind() -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, kind: str) -> float:
        return REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0

    store = ListingStore()
    store.add(frame("cam1", _day(0), "f1"), caption("cam1", _day(0), "f1"))
    worker = make_worker(store)
    full, recent = (sample("framecap_worker_listing_seconds_count", k) for k in ("full", "recent"))
    requests = sample("framecap_worker_listing_requests_total", "recent")
    worker.scan()  # the first pass is full
    worker.scan()
    assert sample("framecap_worker_listing_seconds_count", "full") == full + 1
    assert sample("framecap_worker_listing_seconds_count", "recent") == recent + 1
    assert worker.last_pass is not None and worker.last_pass.kind == "recent"
    assert sample("framecap_worker_listing_requests_total", "recent") == requests + worker.last_pass.list_calls


def test_the_cursor_never_passes_a_frame_without_a_caption() -> None:
    store = ListingStore()
    today = _day(0)
    ids = ["f1", "f2", "f3", "f4", "f5"]
    store.add(*(frame("cam1", today, i) for i in ids))
    store.add(*(caption("cam1", today, i) for i in ids if i != "f3"))
    worker = make_worker(store)
    worker.scan(full=False)
    missing = frame("cam1", today, "f3")
    assert queued(worker) == {missing}
    assert worker._cursors == {f"cam1/{today}/": frame("cam1", today, "f2")}
    # its caption fails (the writer lets the key go): the next periodic pass queues it again
    with worker._lock:
        worker._pending.discard(missing)
    store.requests.clear()
    assert worker.scan(full=False) == 1 and queued(worker) == {missing}
    assert (f"frames/cam1/{today}/", frame("cam1", today, "f2")) in store.requests
    store.add(caption("cam1", today, "f3"))  # captioned at last: the cursor moves past
    worker.scan(full=False)
    assert worker._cursors == {f"cam1/{today}/": frame("cam1", today, "f5")}


def test_a_frame_stored_late_under_an_earlier_key_is_found_within_the_settle_time() -> None:
    """A resent frame can land after later frames were captioned: the cursor stays behind
    frames stored less than listing_settle_s ago, so the frame is still listed."""
    store = ListingStore()
    today = _day(0)
    now = datetime.now(timezone.utc)
    store.add(frame("cam1", today, "f1"), caption("cam1", today, "f1"))
    store.add(frame("cam1", today, "f3"), caption("cam1", today, "f3"), at=now)
    worker = make_worker(store, listing_settle_s=600)
    worker.scan()
    assert worker._cursors == {f"cam1/{today}/": frame("cam1", today, "f1")}
    store.add(frame("cam1", today, "f2"), at=now)  # the late one, under an earlier key
    assert worker.scan() == 1 and queued(worker) == {frame("cam1", today, "f2")}


def test_after_a_reconnect_the_recent_days_are_listed_without_cursors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ListingStore()
    today = _day(0)
    store.add(frame("cam1", today, "f1"), caption("cam1", today, "f1"))
    worker = make_worker(store)
    worker._on_connected(False)  # the first connect
    worker.scan()
    worker.scan()
    assert worker.last_pass is not None and worker.last_pass.kind == "recent"
    with caplog.at_level(logging.INFO, logger="cloud.worker"):
        worker._on_connected(False)
    assert "without cursors" in caplog.text
    store.requests.clear()
    worker.scan()
    assert worker.last_pass.kind == "recent-uncursored"
    assert (f"frames/cam1/{today}/", None) in store.requests
    worker.scan()
    assert worker.last_pass.kind == "recent"


def test_full_passes_come_at_start_on_request_and_every_full_list_interval() -> None:
    store = ListingStore()
    worker = make_worker(store, full_list_interval_s=3600)
    kinds = []

    def scan() -> None:
        worker.scan()
        assert worker.last_pass is not None
        kinds.append(worker.last_pass.kind)

    scan()
    scan()
    worker.request_full_listing("test")
    scan()
    scan()
    assert worker._last_full_end is not None
    worker._last_full_end -= 3600  # an hour later
    scan()
    assert kinds == ["full", "recent", "full", "recent", "full"]
    assert worker.counters["full_passes"] == 3 and worker.counters["recent_passes"] == 2


def test_a_frame_of_an_old_day_whose_fetch_failed_is_queued_again_by_a_periodic_pass() -> None:
    store = ListingStore()
    key = frame("cam1", _day(30), "f1")
    store.add(key)
    worker = make_worker(store)
    assert worker.scan() == 1 and worker._queue.get_nowait() == key

    def broken(_key: str) -> None:
        raise RuntimeError("a bug")

    worker._prepare = broken  # type: ignore[assignment,method-assign]
    with worker._lock:
        worker._fetching += 1
    worker._fetch(key)  # logged; the key is let go
    assert worker.backlog == 0
    assert worker.scan() == 1 and worker.last_pass is not None
    assert worker.last_pass.kind == "recent" and queued(worker) == {key}
    assert worker.scan() == 0


def test_cursors_of_days_that_left_the_window_are_dropped() -> None:
    store = ListingStore()
    store.add(frame("cam1", _day(0), "f1"), caption("cam1", _day(0), "f1"))
    worker = make_worker(store)
    worker.scan()
    worker._cursors[f"cam1/{_day(9)}/"] = frame("cam1", _day(9), "f1")
    worker.scan()
    assert set(worker._cursors) == {f"cam1/{_day(0)}/"}


def test_the_listing_options_show_their_defaults() -> None:
    text = get_args_parser().format_help()
    for option in ("--recent-days", "--full-list-interval", "--listing-settle"):
        assert option in text
    assert "(default: 2)" in text and "(default: 0)" in text and "(default: 600)" in text


# -- the real SeaweedFS -----------------------------------------------------------------------
def _jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    return buf.tobytes()


def _put_all(store: ObjectStore, keys: Sequence[str], body: bytes = b"x") -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, body), keys))


class SpyStore(ObjectStore):
    """An ObjectStore that counts the keys every listing returns (the old scan() included)."""

    keys_listed = 0

    def list_pages(self, prefix: str = "", **kwargs: Any) -> Iterator[list[ListedObject]]:
        for page in super().list_pages(prefix, **kwargs):
            self.keys_listed += len(page)
            yield page

    def list_keys(self, prefix: str = "", **kwargs: Any) -> Iterator[str]:
        for key in super().list_keys(prefix, **kwargs):
            self.keys_listed += 1
            yield key

    def list_prefixes(self, prefix: str = "", delimiter: str = "/") -> Iterator[str]:
        for found in super().list_prefixes(prefix, delimiter):
            self.keys_listed += 1
            yield found


def _worker_config(stack_ns: Any, **fields: Any) -> WorkerConfig:
    return WorkerConfig(mqtt=stack_ns.mqtt_config("worker"), s3=stack_ns.s3_config(role="worker"),
                        max_wait_s=0.05, listing_settle_s=0.0, **fields)


def test_a_periodic_pass_does_not_list_old_days(stack_ns: Any) -> None:
    """The count of keys a periodic pass lists stays the same when 500 captioned keys are added
    to an old day (the old scan() listed them all, every pass)."""
    admin = stack_ns.storage()
    device, old, today = "cam1", _day(40), _day(0)
    _put_all(admin, [k for i in range(25) for k in (frame(device, old, f"o{i:04d}"),
                                                    caption(device, old, f"o{i:04d}"))])
    _put_all(admin, [k for i in range(3) for k in (frame(device, today, f"t{i}"),
                                                   caption(device, today, f"t{i}"))])
    admin.put(frame(device, today, "t9-new"), b"x")  # no ack, no caption
    spy = SpyStore(stack_ns.s3_config(role="worker"))
    worker = CaptionWorker(_worker_config(stack_ns), StubCaptioner(), store=spy,
                           client_id=stack_ns.client_id("worker"))
    assert worker.scan(full=True) == 1 and queued(worker) == {frame(device, today, "t9-new")}

    def periodic() -> int:
        spy.keys_listed = 0
        worker.scan(full=False)
        assert worker.last_pass is not None and worker.last_pass.kind == "recent"
        return spy.keys_listed

    before = periodic()
    # the device, the uncaptioned frame after the cursor and the cursor's own caption
    assert before <= 4
    _put_all(admin, [k for i in range(250) for k in (frame(device, old, f"p{i:04d}"),
                                                     caption(device, old, f"p{i:04d}"))])
    assert periodic() == before
    spy.keys_listed = 0
    worker.scan(full=True)
    assert spy.keys_listed >= 557  # a full pass lists them all


def test_a_frame_without_an_ack_in_todays_prefix_is_captioned_by_a_periodic_pass(
    stack_ns: Any, wait_until: Any
) -> None:
    admin = stack_ns.storage()
    worker = CaptionWorker(_worker_config(stack_ns, list_interval_s=0.3), StubCaptioner(),
                           client_id=stack_ns.client_id("worker"))
    worker.start(mqtt_enabled=False)  # no acks at all: listings alone
    try:
        assert wait_until(lambda: worker.counters.get("full_passes", 0) >= 1, 10)
        admin.put(frame("cam1", _day(0), "f-new"), _jpeg())
        assert wait_until(lambda: admin.exists(caption("cam1", _day(0), "f-new")), 15)
        assert worker.counters["full_passes"] == 1 and worker.counters["recent_passes"] >= 1
    finally:
        worker.stop(timeout=5)


def test_a_frame_in_an_old_day_is_found_by_a_full_pass_on_sighup_not_by_periodic_ones(
    stack_ns: Any, wait_until: Any, caplog: pytest.LogCaptureFixture
) -> None:
    admin = stack_ns.storage()
    key, record = frame("cam1", _day(30), "f-old"), caption("cam1", _day(30), "f-old")
    worker = CaptionWorker(_worker_config(stack_ns, list_interval_s=0.2), StubCaptioner(),
                           client_id=stack_ns.client_id("worker"))
    previous = install_full_listing_signal(worker)
    worker.start(mqtt_enabled=False)
    try:
        assert wait_until(lambda: worker.counters.get("full_passes", 0) >= 1, 10)
        admin.put(key, _jpeg())
        seen = worker.counters.get("recent_passes", 0)
        assert wait_until(lambda: worker.counters.get("recent_passes", 0) >= seen + 3, 10)
        assert not admin.exists(record) and worker.backlog == 0
        with caplog.at_level(logging.INFO, logger="cloud.worker"):
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_until(lambda: admin.exists(record), 15)
        assert worker.counters["full_passes"] == 2
        assert "worker: full listing pass requested (SIGHUP)" in caplog.text
    finally:
        worker.stop(timeout=5)
        signal.signal(signal.SIGHUP, previous)
