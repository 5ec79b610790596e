"""Both caption index backends (SQLite FTS5 and a real PostgreSQL) on the same documents:
search syntax, every filter, paging, idempotent upserts, devices, rules, and claim_alert
(once per frame, folding, and races between threads / connections). Plus an agreement test:
SQLite == PostgreSQL == :func:`cloud.web.query.match_caption` on random captions and queries."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.web.index import CaptionIndex, QueryError
from cloud.web.index_sqlite import SqliteIndex
from cloud.web.model import AlertRule, CaptionDoc, SearchFilters, SearchRequest
from cloud.web.query import match_caption, parse_query

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def doc(device: str, frame: str, at: datetime, caption: str, score: float | None = -5.0,
        error: str | None = None) -> CaptionDoc:
    return CaptionDoc(device_id=device, frame_id=frame, captured_at=at, caption=caption, score=score,
                      model="sat-v2", frame_key=f"frames/{device}/{frame}.jpg",
                      caption_key=f"captions/{device}/{frame}.json", error=error)


def frames(index: CaptionIndex, query: str = "", **kw: object) -> list[str]:
    order = kw.pop("order", "time")
    page = index.search(SearchRequest(query=query, filters=SearchFilters(**kw),  # type: ignore[arg-type]
                                      order=order, limit=500))  # type: ignore[arg-type]
    assert page.total == len(page.hits)
    return [h.doc.frame_id for h in page.hits]


DOCS = [
    doc("cam1", "f1", T0, "a red car parked on a street"),
    doc("cam1", "f2", T0 + timedelta(minutes=1), "a dog sitting next to a red car", score=-2.0),
    doc("cam2", "f3", T0 + timedelta(minutes=2), "a truck driving down a street at night"),
    doc("cam2", "f4", T0 + timedelta(minutes=3), "", score=None, error="cannot decode JPEG"),
    doc("cam3", "f5", T0 + timedelta(minutes=4), "a car that is red and a dog"),
]


def test_upsert_is_idempotent_and_round_trips(caption_index: CaptionIndex) -> None:
    assert caption_index.upsert(DOCS) == 5
    assert caption_index.upsert(DOCS) == 0
    assert caption_index.count() == 5
    for d in DOCS:
        assert caption_index.get(d.device_id, d.frame_id) == d
    assert caption_index.get("cam1", "nope") is None
    # a replaced caption is searched by its new words only, and may move in time
    moved = doc("cam1", "f1", T0 - timedelta(days=1, microseconds=7), "a blue bus")
    assert caption_index.upsert([moved]) == 0
    assert caption_index.get("cam1", "f1") == moved
    assert frames(caption_index, "bus") == ["f1"]
    assert "f1" not in frames(caption_index, "red")
    assert caption_index.count() == 5


def test_search_syntax(caption_index: CaptionIndex) -> None:
    caption_index.upsert(DOCS)
    assert frames(caption_index, "red car") == ["f5", "f2", "f1"]
    assert frames(caption_index, '"red car"') == ["f2", "f1"]
    assert frames(caption_index, "truck OR dog") == ["f5", "f3", "f2"]
    assert frames(caption_index, "car -dog") == ["f1"]
    assert frames(caption_index, 'car NOT "red car"') == ["f5"]
    assert frames(caption_index, "-car") == ["f4", "f3"]  # everything else, the error record too
    assert frames(caption_index, "") == ["f5", "f4", "f3", "f2", "f1"]
    assert frames(caption_index, "", order="time_asc") == ["f1", "f2", "f3", "f4", "f5"]
    assert frames(caption_index, 'col:x NEAR("a" *) ^a') == []  # hostile text is just words
    hit = caption_index.search(SearchRequest(query="red car", order="relevance")).hits[0]
    assert "<mark>red</mark>" in hit.highlighted and "<mark>car</mark>" in hit.highlighted
    with pytest.raises(QueryError):
        caption_index.search(SearchRequest(query='"red car'))
    with pytest.raises(QueryError):
        caption_index.search(SearchRequest(query="car", limit=100_000))


def test_widenings(caption_index: CaptionIndex) -> None:
    caption_index.upsert(DOCS)
    page = caption_index.search(SearchRequest(query="lorry", widenings={"lorry": ["truck"]}, limit=10))
    assert [h.doc.frame_id for h in page.hits] == ["f3"] and page.widened == {"lorry": ["truck"]}
    assert "<mark>truck</mark>" in page.hits[0].highlighted


def test_relevance_prefers_more_occurrences(caption_index: CaptionIndex) -> None:
    caption_index.upsert([doc("c", "once", T0 + timedelta(minutes=5), "a dog on a road"),
                          doc("c", "twice", T0, "a dog and a dog on a road"),
                          doc("c", "none", T0, "a cat on a road")])
    page = caption_index.search(SearchRequest(query="dog", order="relevance"))
    assert [h.doc.frame_id for h in page.hits] == ["twice", "once"]
    assert page.hits[0].rank > page.hits[1].rank


def test_filters_each_exclude(caption_index: CaptionIndex) -> None:
    caption_index.upsert(DOCS)
    assert frames(caption_index, "car", devices=("cam1",)) == ["f2", "f1"]
    assert frames(caption_index, "car", devices=("cam1", "cam3")) == ["f5", "f2", "f1"]
    assert frames(caption_index, "car", devices=()) == []
    assert frames(caption_index, "", start=T0 + timedelta(minutes=1), end=T0 + timedelta(minutes=3)) == ["f3", "f2"]
    assert frames(caption_index, "car", start=T0 + timedelta(seconds=30)) == ["f5", "f2"]
    assert frames(caption_index, "car", min_score=-3.0) == ["f2"]
    assert frames(caption_index, "", min_score=-3.0) == ["f2"]  # error records have no score
    assert frames(caption_index, "", errors_only=True) == ["f4"]
    assert frames(caption_index, "car", errors_only=True) == []
    assert frames(caption_index, "-truck", errors_only=True, devices=("cam2",)) == ["f4"]


def test_time_of_day_across_midnight_with_offset(caption_index: CaptionIndex) -> None:
    # viewer at UTC+2 asks for 22:00-06:00 local = 20:00-04:00 UTC
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    hours = {"u1930": (19, 30), "u2001": (20, 1), "u2359": (23, 59), "u0000": (0, 0), "u0359": (3, 59),
             "u0400": (4, 0), "u1200": (12, 0)}
    caption_index.upsert([doc("cam1", f, day + timedelta(hours=h, minutes=m), "a car at night")
                          for f, (h, m) in hours.items()])
    got = frames(caption_index, "car", time_from_min=22 * 60, time_to_min=6 * 60, tz_offset_min=120)
    assert sorted(got) == ["u0000", "u0359", "u2001", "u2359"]
    got = frames(caption_index, "", time_from_min=22 * 60, time_to_min=6 * 60, tz_offset_min=120)
    assert sorted(got) == ["u0000", "u0359", "u2001", "u2359"]
    # UTC-5 viewer, 09:00-12:00 local = 14:00-17:00 UTC: none of them
    assert frames(caption_index, "car", time_from_min=9 * 60, time_to_min=12 * 60, tz_offset_min=-300) == []


def test_paging_and_total(caption_index: CaptionIndex) -> None:
    caption_index.upsert([doc("cam1", f"f{i:02d}", T0 + timedelta(seconds=i), f"a car number {i}")
                          for i in range(23)])
    seen: list[str] = []
    for offset in (0, 10, 20):
        page = caption_index.search(SearchRequest(query="car", order="time", limit=10, offset=offset))
        assert page.total == 23 and page.offset == offset
        seen += [h.doc.frame_id for h in page.hits]
    assert seen == [f"f{i:02d}" for i in reversed(range(23))]
    rel = caption_index.search(SearchRequest(query="car", order="relevance", limit=5, offset=20))
    assert rel.total == 23 and len(rel.hits) == 3


def test_timeline_counts_devices(caption_index: CaptionIndex) -> None:
    caption_index.upsert(DOCS)
    caption_index.set_status("cam1", "online", T0)
    caption_index.set_status("cam9", "offline", T0)
    tl = caption_index.timeline("cam2", T0, T0 + timedelta(hours=1))
    assert [d.frame_id for d in tl] == ["f3", "f4"] and tl[1].error == "cannot decode JPEG"
    assert [d.frame_id for d in caption_index.timeline("cam2", T0, T0 + timedelta(hours=1), limit=1, offset=1)] == ["f4"]
    assert caption_index.counts_by_hour("cam1", T0 - timedelta(days=1), T0 + timedelta(days=1), 90) == {13: 2}
    late = doc("cam1", "late", datetime(2026, 3, 2, 23, 30, tzinfo=timezone.utc), "a car")
    caption_index.upsert([late])
    assert caption_index.counts_by_day("cam1", T0 - timedelta(days=1), T0 + timedelta(days=2), 60) == {
        "2026-03-02": 2, "2026-03-03": 1}
    devs = caption_index.devices(None, today_start=T0 + timedelta(seconds=30))
    assert [d.device_id for d in devs] == ["cam1", "cam2", "cam3", "cam9"]
    cam1 = devs[0]
    assert cam1.status == "online" and cam1.status_at == T0 and cam1.latest == late
    assert cam1.last_seen == late.captured_at and cam1.frames_today == 2
    assert devs[3].latest is None and devs[3].status == "offline"
    assert [d.device_id for d in caption_index.devices(["cam2", "cam9"], today_start=T0)] == ["cam2", "cam9"]
    assert caption_index.devices([], today_start=T0) == []


def test_rules(caption_index: CaptionIndex) -> None:
    rule = AlertRule(rule_id="trucks", name="Trucks", query="truck -toy", devices=("cam1",), min_score=-8.0,
                     cooldown_s=60, webhook_url="http://127.0.0.1:9/x", owner="alice", created_at=T0)
    caption_index.save_rule(rule)
    caption_index.save_rule(AlertRule(rule_id="a", name="A", query="dog"))
    assert caption_index.rules() == [AlertRule(rule_id="a", name="A", query="dog"), rule]
    caption_index.save_rule(AlertRule(rule_id="a", name="A2", query="cat"))
    assert caption_index.rules()[0].name == "A2"
    assert caption_index.delete_rule("a") is True
    assert caption_index.delete_rule("a") is False
    assert caption_index.rules() == [rule]


def test_claim_alert_once_and_folds(caption_index: CaptionIndex) -> None:
    d = [doc("cam1", f"f{i}", T0 + timedelta(seconds=s), "a truck") for i, s in enumerate([0, 30, 61, 200, 250])]
    other = doc("cam2", "g0", T0 + timedelta(seconds=30), "a truck")
    assert caption_index.claim_alert("r", d[0], 60) is True
    assert caption_index.claim_alert("r", d[0], 60) is False  # once per frame
    assert caption_index.claim_alert("r", d[1], 60) is False  # folded: 30 s after the alert
    assert caption_index.claim_alert("r", d[1], 60) is False  # folded frames are remembered
    assert caption_index.claim_alert("r", other, 60) is True  # another device
    assert caption_index.claim_alert("r2", d[1], 60) is True  # another rule
    assert caption_index.claim_alert("r", d[2], 60) is True  # 61 s after the last alert
    assert caption_index.claim_alert("r", d[3], 60) is True
    assert caption_index.claim_alert("r", d[4], 60) is False


def test_recent_alerts_are_the_fired_ones_newest_first_within_the_allowed_devices(
        caption_index: CaptionIndex) -> None:
    d = [doc("cam1", f"f{i}", T0 + timedelta(seconds=s), "a truck") for i, s in enumerate([0, 30, 61])]
    other = doc("cam2", "g0", T0 + timedelta(seconds=45), "a red truck")
    caption_index.upsert([*d, other])
    for item in (*d, other):
        caption_index.claim_alert("r", item, 60)  # f1 is folded into f0's alert
    fired = caption_index.recent_alerts(None)
    assert [(rule, x.frame_id) for rule, x in fired] == [("r", "f2"), ("r", "g0"), ("r", "f0")]
    assert fired[1][1].caption == "a red truck"
    assert [x.frame_id for _, x in caption_index.recent_alerts(["cam1"])] == ["f2", "f0"]
    assert caption_index.recent_alerts([]) == []
    assert [x.frame_id for _, x in caption_index.recent_alerts(None, limit=1)] == ["f2"]


def _race(claimers: list[Callable[[CaptionDoc], bool]], docs: list[CaptionDoc]) -> list[list[bool]]:
    barrier = threading.Barrier(len(claimers))
    results: list[list[bool]] = [[] for _ in claimers]

    def run(i: int) -> None:
        barrier.wait()
        results[i] = [claimers[i](d) for d in docs]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(claimers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_claim_alert_race_sqlite_threads(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite")
    second = SqliteIndex(tmp_path / "i.sqlite")  # another "process" on the same file
    try:
        docs = [doc("cam1", f"f{i}", T0 + timedelta(seconds=100 * i), "a truck") for i in range(20)]
        claimers = [lambda d: index.claim_alert("r", d, 10), lambda d: index.claim_alert("r", d, 10),
                    lambda d: second.claim_alert("r", d, 10)]
        results = _race(claimers, docs)
        for i in range(len(docs)):
            assert sum(r[i] for r in results) == 1, i
    finally:
        index.close()
        second.close()


def test_claim_alert_race_postgres_connections(pg_url: str) -> None:
    from cloud.web.index_pg import PostgresIndex

    a, b = PostgresIndex(pg_url), PostgresIndex(pg_url)  # two pools, like two replicas
    try:
        docs = [doc("cam1", f"f{i}", T0 + timedelta(seconds=100 * i), "a truck") for i in range(20)]
        docs += [doc("cam1", f"g{i}", T0 + timedelta(seconds=2000 + i), "a truck") for i in range(5)]
        results = _race([lambda d: a.claim_alert("r", d, 10), lambda d: b.claim_alert("r", d, 10),
                         lambda d: a.claim_alert("r", d, 10)], docs)
        fired = [sum(r[i] for r in results) for i in range(len(docs))]
        assert fired[:20] == [1] * 20
        assert fired[20:] == [1, 0, 0, 0, 0]  # g1..g4 fold into g0's alert
    finally:
        a.close()
        b.close()


def test_postgres_error_hides_password(postgres_server: object) -> None:
    from cloud.web.index import CaptionIndexError
    from cloud.web.index_pg import PostgresIndex

    with pytest.raises(CaptionIndexError) as info:
        PostgresIndex("postgresql://who:s3cret-pw@127.0.0.1:1/nodb", timeout_s=2)
    assert "s3cret-pw" not in str(info.value) and "who:***@127.0.0.1:1" in str(info.value)


def test_sqlite_relevance_window_keeps_total_and_filters(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite")
    index.RELEVANCE_WINDOW = 5
    try:
        index.upsert([doc(f"cam{i % 2}", f"f{i:02d}", T0 + timedelta(seconds=i), "a dog " + "dog " * (i % 3))
                      for i in range(30)])
        page = index.search(SearchRequest(query="dog", order="relevance", limit=5,
                                          filters=SearchFilters(devices=("cam1",))))
        assert page.total == 15
        assert {h.doc.device_id for h in page.hits} == {"cam1"}
        assert {h.doc.frame_id for h in page.hits} == {f"f{i:02d}" for i in (29, 27, 25, 23, 21)}
    finally:
        index.close()


# -- agreement: SQLite == PostgreSQL == match_caption ----------------------------------------

WORDS = ["a", "dog", "red", "car", "don't", "café", "street", "night", "man", "bus"]


def _render(node: Any, top: bool = True) -> str:
    kind: str = node[0]
    rest: list[Any] = list(node[1:])
    if kind == "w":
        return str(rest[0])
    if kind == "p":
        return '"' + " ".join(rest[0]) + '"'
    if kind == "not":
        return rest[1] + _render(rest[0], top=False)
    joiner = " OR " if kind == "or" else " "
    text = joiner.join(_render(c, top=False) for c in rest[0])
    return text if top else f"({text})"


QUERIES = st.recursive(
    st.one_of(st.tuples(st.just("w"), st.sampled_from(WORDS)),
              st.tuples(st.just("p"), st.lists(st.sampled_from(WORDS), min_size=2, max_size=3))),
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner, st.sampled_from(["-", "NOT "])),
        st.tuples(st.just("and"), st.lists(inner, min_size=2, max_size=3)),
        st.tuples(st.just("or"), st.lists(inner, min_size=2, max_size=3))),
    max_leaves=6).map(_render)


@pytest.fixture
def both_indexes(tmp_path: Path, pg_url: str) -> Iterator[tuple[list[CaptionDoc], CaptionIndex, CaptionIndex]]:
    from cloud.web.index_pg import PostgresIndex

    rng = random.Random(7)
    docs = [doc(f"cam{i % 3}", f"f{i:03d}", T0 + timedelta(seconds=i),
                " ".join(rng.choices(WORDS, k=rng.randint(1, 8))).replace("dog", rng.choice(["dog", "Dog", "dog,"])))
            for i in range(300)]
    docs += [doc("cam0", "err", T0, "", score=None, error="bad frame")]
    sqlite_index, pg_index = SqliteIndex(tmp_path / "i.sqlite"), PostgresIndex(pg_url)
    sqlite_index.upsert(docs)
    pg_index.upsert(docs)
    yield docs, sqlite_index, pg_index
    sqlite_index.close()
    pg_index.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=QUERIES)
def test_backends_agree_with_python(both_indexes: tuple[list[CaptionDoc], CaptionIndex, CaptionIndex],
                                    text: str) -> None:
    docs, sqlite_index, pg_index = both_indexes
    try:
        q = parse_query(text)
    except QueryError:
        for index in (sqlite_index, pg_index):
            with pytest.raises(QueryError):
                index.search(SearchRequest(query=text))
        return
    expected = {d.frame_id for d in docs if match_caption(q, d.caption) is not None}
    for index in (sqlite_index, pg_index):
        for order in ("relevance", "time"):
            assert order in ("relevance", "time")
            page = index.search(SearchRequest(query=text, order=order, limit=500))
            assert {h.doc.frame_id for h in page.hits} == expected, (index.backend, text)
            assert page.total == len(expected)


# -- filters: both backends == a plain Python reference, on random documents -----------------

SCORES = [0.0, -0.05, -0.5, -1.0, -2.2, -2.25, -2.3, -2.3000000000000003, -2.2999999999999994, -2.31, -7.0,
          -39.95, -40.0, -55.5]


def _reference(docs: list[CaptionDoc], f: SearchFilters) -> set[str]:
    """What the filters mean, written independently of both backends."""
    out = set()
    for d in docs:
        local = d.captured_at + timedelta(minutes=f.tz_offset_min)
        minute = local.hour * 60 + local.minute
        if f.devices is not None and d.device_id not in f.devices:
            continue
        if f.start is not None and d.captured_at < f.start:
            continue
        if f.end is not None and d.captured_at >= f.end:
            continue
        if f.time_from_min is not None and f.time_to_min is not None:
            lo, hi = f.time_from_min, f.time_to_min
            inside = lo <= minute < hi if lo < hi else (minute >= lo or minute < hi) if lo > hi else True
            if not inside:
                continue
        if f.min_score is not None and (d.score is None or d.score < f.min_score):
            continue
        if f.errors_only and d.error is None:
            continue
        out.add(d.frame_id)
    return out


@pytest.fixture
def filter_indexes(tmp_path: Path, pg_url: str) -> Iterator[tuple[list[CaptionDoc], CaptionIndex, CaptionIndex]]:
    from cloud.web.index_pg import PostgresIndex

    rng = random.Random(11)
    docs = []
    for i in range(400):
        at = T0 + timedelta(minutes=rng.randrange(0, 3 * 1440), microseconds=rng.choice([0, 1, 500, 999_999]))
        error = "bad frame" if rng.random() < 0.1 else None
        docs.append(doc(f"cam{rng.randrange(4)}", f"f{i:03d}", at, "" if error else rng.choice(["a car", "a dog"]),
                        score=None if error else rng.choice(SCORES), error=error))
    sqlite_index, pg_index = SqliteIndex(tmp_path / "i.sqlite"), PostgresIndex(pg_url)
    sqlite_index.upsert(docs)
    pg_index.upsert(docs)
    yield docs, sqlite_index, pg_index
    sqlite_index.close()
    pg_index.close()


FILTERS = st.builds(
    SearchFilters,
    devices=st.none() | st.lists(st.sampled_from(["cam0", "cam1", "cam2", "cam3", "cam9"]), max_size=3).map(tuple),
    start=st.none() | st.integers(-60, 3 * 1440).map(lambda m: T0 + timedelta(minutes=m, microseconds=500)),
    end=st.none() | st.integers(0, 4 * 1440).map(lambda m: T0 + timedelta(minutes=m)),
    time_from_min=st.none() | st.integers(0, 1439),
    time_to_min=st.integers(0, 1439),
    tz_offset_min=st.sampled_from([0, 60, 120, -300, 330, 345, -570]),
    min_score=st.none() | st.sampled_from([*SCORES, -2.0, -39.9, -40.0, -0.0, 0.5, -2.35]),
    errors_only=st.booleans(),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=FILTERS, query=st.sampled_from(["", "car", "-dog", "a"]))
def test_filters_agree_with_reference(filter_indexes: tuple[list[CaptionDoc], CaptionIndex, CaptionIndex],
                                      f: SearchFilters, query: str) -> None:
    docs, sqlite_index, pg_index = filter_indexes
    q = parse_query(query)
    expected = {x for x in _reference(docs, f) if match_caption(q, next(d for d in docs if d.frame_id == x).caption) is not None}
    for index in (sqlite_index, pg_index):
        page = index.search(SearchRequest(query=query, filters=f, order="relevance", limit=500))
        assert {h.doc.frame_id for h in page.hits} == expected, index.backend
        assert page.total == len(expected)


def test_partial_hours_and_score_boundaries(caption_index: CaptionIndex) -> None:
    # UTC+5:30 viewer, 22:00-06:00 local = 16:30-00:30 UTC: boundaries fall inside hours
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    at = {"u1629": (16, 29), "u1630": (16, 30), "u2359": (23, 59), "u0029": (0, 29), "u0030": (0, 30)}
    caption_index.upsert([doc("cam1", f, day + timedelta(hours=h, minutes=m, seconds=59), "a car")
                          for f, (h, m) in at.items()])
    assert sorted(frames(caption_index, "car", time_from_min=22 * 60, time_to_min=6 * 60, tz_offset_min=330)) == [
        "u0029", "u1630", "u2359"]
    assert sorted(frames(caption_index, "car", time_from_min=16 * 60 + 30, time_to_min=16 * 60 + 31)) == ["u1630"]
    scores = {"a": -2.3, "b": -2.3000000000000003, "c": -2.2999999999999994, "d": -2.31, "e": -2.0, "f": -40.5,
              "g": 0.0}
    caption_index.upsert([doc("cam2", f, day, "a dog", score=s) for f, s in scores.items()])
    for m in (-2.3, -2.3000000000000003, -2.29, -2.31, -2.0, -2.05, -40.0, -41.0, 0.0, -0.0):
        expected = sorted(f for f, s in scores.items() if s >= m)
        assert sorted(frames(caption_index, "dog", min_score=m)) == expected, m
        assert sorted(frames(caption_index, "", min_score=m, devices=("cam2",))) == expected, m


def test_matches_are_counted_up_to_the_cap_then_the_total_is_a_lower_bound(caption_index: CaptionIndex) -> None:
    caption_index.upsert([doc("cam1", f"f{i}", T0 + timedelta(seconds=i), "a dog on a beach") for i in range(8)]
                         + [doc("cam1", "g0", T0, "a cat")])
    caption_index.count_cap = 5  # type: ignore[attr-defined]
    for query, order in (("dog", "relevance"), ("dog", "time"), ("", "time"), ("a NOT cat", "time")):
        page = caption_index.search(SearchRequest(query=query, order=order, limit=3))  # type: ignore[arg-type]
        assert (page.total, page.total_exact, len(page.hits)) == (5, False, 3), query
    page = caption_index.search(SearchRequest(query="cat"))
    assert (page.total, page.total_exact) == (1, True)
    caption_index.count_cap = 8  # type: ignore[attr-defined]
    page = caption_index.search(SearchRequest(query="dog", limit=3))
    assert (page.total, page.total_exact) == (8, True)  # exactly at the cap is still exact
