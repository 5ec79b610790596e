"""The search language: parsing, errors, the Python evaluator, highlights, widenings, and the
FTS5 compiler checked against a real (in-memory) FTS5 table with hostile input."""

from __future__ import annotations

import re
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.web.index import QueryError
from cloud.web.query import (
    And,
    Not,
    Or,
    Phrase,
    Term,
    apply_widenings,
    highlight,
    match_caption,
    negated_part,
    parse_query,
    query_words,
    to_fts5,
    to_tsquery,
    tokenize,
)
from cloud.web.query import Query as QueryNode


def pq(text: str) -> QueryNode:
    """parse_query of a query that is not blank."""
    q = parse_query(text)
    assert q is not None
    return q


@pytest.mark.parametrize(("text", "tree"), [
    ("truck", Term("truck")),
    ("Truck NIGHT", And((Term("truck"), Term("night")))),
    ('"Red car"', Phrase(("red", "car"))),
    ("truck OR bus", Or((Term("truck"), Term("bus")))),
    ("truck or bus", And((Term("truck"), Term("or"), Term("bus")))),
    ("truck -rain", And((Term("truck"), Not(Term("rain"))))),
    ("truck NOT rain", And((Term("truck"), Not(Term("rain"))))),
    ('NOT "parked car"', Not(Phrase(("parked", "car")))),
    ("(truck OR bus) night", And((Or((Term("truck"), Term("bus"))), Term("night")))),
    ("x AND y", And((Term("x"), Term("y")))),
    ("wi-fi", Phrase(("wi", "fi"))),
    ("don't", Term("don't")),
    ("don\u2019t", Term("don't")),
    ("-x -y", And((Not(Term("x")), Not(Term("y"))))),
    ("NOT -x", Term("x")),
    ("x - y", And((Term("x"), Term("y")))),
    ("truck -", Term("truck")),
    # stop words beside a positive word are not searched for; in phrases, alone, under NOT/OR kept
    ("a dog", Term("dog")),
    ("the dog on a bench", And((Term("dog"), Term("bench")))),
    ('"a man"', Phrase(("a", "man"))),
    ("a", Term("a")),
    ("a -dog", And((Term("a"), Not(Term("dog"))))),
    ("dog -a", And((Term("dog"), Not(Term("a"))))),
    ("a OR the", Or((Term("a"), Term("the")))),
    ("the dog OR a cat", Or((Term("dog"), Term("cat")))),
])
def test_parse_good(text: str, tree: object) -> None:
    assert parse_query(text) == tree


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_blank_matches_all(text: str) -> None:
    assert parse_query(text) is None


@pytest.mark.parametrize(("text", "needle"), [
    ('"red car', "quote"),
    ("truck OR", "OR"),
    ("OR truck", "OR"),
    ("a OR OR b", "OR"),
    ("NOT", "NOT"),
    ("truck NOT", "NOT"),
    ("(truck", "parenthesis"),
    ("truck)", "')'"),
    ("*", "no word"),
    ("^ : *", "no word"),
    ('""', "empty"),
    ("truck OR -bus", "NOT inside OR"),
    ("x" * 501, "too long"),
    (" ".join(["w"] * 33), "too many words"),
    ('"a b c d e f g h i j k l m n o p q r s t u v w x y z aa bb cc dd ee ff gg"', "too many"),
])
def test_parse_bad(text: str, needle: str) -> None:
    with pytest.raises(QueryError, match=re.escape(needle)):
        parse_query(text)


def test_hostile_text_is_only_words() -> None:
    q = parse_query('col:car NEAR(u b) car* ^start {words}:x')
    assert q == And((Phrase(("col", "car")), Term("near"), Term("u"), Term("b"), Term("car"),
                     Term("start"), Phrase(("words", "x"))))
    assert to_fts5(Term('x"y')) == '"x""y"'
    assert to_tsquery(Term("don't")) == "'don''t'"


def test_negated_part() -> None:
    assert negated_part(pq("-a -b")) == Or((Term("a"), Term("b")))
    assert negated_part(pq("-a")) == Term("a")
    assert negated_part(pq("a -b")) is None
    with pytest.raises(ValueError):
        to_fts5(pq("-a"))


def test_query_words_and_widenings() -> None:
    q = pq('sedan "red car" -rain (bus OR lorry)')
    assert query_words(q) == ["sedan", "red", "car", "bus", "lorry"]
    wide = apply_widenings(q, {"sedan": ["car", "Automobile"], "lorry": ["truck"], "rain": ["wet"]})
    assert wide == And((Or((Term("sedan"), Term("car"), Term("automobile"))), Phrase(("red", "car")),
                        Not(Or((Term("rain"), Term("wet")))),
                        Or((Term("bus"), Or((Term("lorry"), Term("truck")))))))
    assert match_caption(wide, "a car and a truck") is None  # "red car" phrase still needed
    assert match_caption(wide, "a red car beside a truck") == ["car", "red", "truck"]
    assert match_caption(wide, "a red car beside a truck in the wet") is None


def test_match_caption() -> None:
    q = parse_query('"red car" OR (truck -night)')
    assert match_caption(q, "A red car parked") == ["red", "car"]
    assert match_caption(q, "a car that is red") is None
    assert match_caption(q, "a truck at noon") == ["truck"]
    assert match_caption(q, "a truck at night") is None
    assert match_caption(parse_query("-dog"), "") == []
    assert match_caption(parse_query("-dog"), "a dog") is None
    assert match_caption(None, "anything") == []


def test_highlight_escapes_and_marks() -> None:
    assert highlight("A <b>Dog</b> & a dog's toy", ["dog", "a"]) == (
        "<mark>A</mark> &lt;b&gt;<mark>Dog</mark>&lt;/b&gt; &amp; <mark>a</mark> dog&#x27;s toy")
    assert highlight("x", []) == "x"


def test_tokenize() -> None:
    assert tokenize("A café, don't-stop 'quoted' x_y 3D") == ["a", "café", "don't", "stop", "quoted", "x", "y", "3d"]


# -- the FTS5 compiler on a real FTS5 table --------------------------------------------------

VOCAB = ["a", "dog", "red", "car", "don't", "near", "and", "or", "not", "café"]
CAPTIONS = ["a dog", "a red car", "red dog and car", "don't near the car", "café or not", "a a a",
            "car red", "not a dog", ""]
HOSTILE = st.lists(st.sampled_from(list('ab "()*^:-{}+.,\'NOTRAEdogcar') + [" OR ", " AND ", "NOT ", "NEAR(", "red"]),
                   max_size=20).map("".join)


@pytest.fixture(scope="module")
def fts() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(words, tokenize=\"unicode61 remove_diacritics 0 "
                 "tokenchars ''''\")")
    for i, caption in enumerate(CAPTIONS):
        conn.execute("INSERT INTO t(rowid, words) VALUES (?, ?)", (i, " ".join(tokenize(caption))))
    return conn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
def test_fts5_agrees_with_python_on_hostile_text(fts: sqlite3.Connection, text: str) -> None:
    try:
        q = parse_query(text)
    except QueryError:
        return
    expected = {i for i, c in enumerate(CAPTIONS) if match_caption(q, c) is not None}
    if q is None:
        assert expected == set(range(len(CAPTIONS)))
        return
    neg = negated_part(q)
    expr = to_fts5(neg if neg is not None else q)
    got = {r for (r,) in fts.execute("SELECT rowid FROM t WHERE t MATCH ?", (expr,))}  # never a syntax error
    if neg is not None:
        got = set(range(len(CAPTIONS))) - got
    assert got == expected, (text, expr)
