"""The search box's language, parsed once into a small immutable tree.

Syntax (what a user types):

- ``truck night``: words, all of them must appear (implicit AND; ``AND`` may be written).
- ``"red car"``: a phrase, the words next to each other in this order.
- ``truck OR bus``: either side (``OR`` in capitals; ``or`` is a word).
- ``NOT rain``, ``-rain``, ``NOT "parked car"``, ``-(a OR b)``: without.
- ``(truck OR bus) night``: parentheses group.

A query made only of negations (``-rain``) matches every caption except those. Stop words
(:data:`STOP_WORDS`: ``a``, ``the``, ``is``, ...) beside other words are not searched for
(``a dog`` is ``dog``): nearly every caption has them, so they select nothing and cost the most;
inside a phrase (``"a man"``), alone, or under NOT/OR they are kept. Words are
lower-cased and split exactly as captions are (:func:`tokenize`: runs of letters and digits,
apostrophes inside a word kept; no stemming), so the SQLite FTS5 compiler (:func:`to_fts5`),
the PostgreSQL compiler (:func:`to_tsquery`) and the Python evaluator (:func:`match_caption`)
agree on every caption. Anything else a user types (``*``, ``^``, ``:``, ``NEAR(``) is a
separator, never syntax of a backend: compiled words are always quoted.

Tree: :class:`Term`, :class:`Phrase`, :class:`Not`, :class:`And`, :class:`Or`
(:data:`Query` is their union). Errors are :class:`cloud.web.index.QueryError` with a message
for the user.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cloud.web.index import QueryError

MAX_QUERY_CHARS = 500
"""Longest query text accepted."""
MAX_QUERY_TERMS = 32
"""Most words (counting each word of a phrase) a query may hold."""

STOP_WORDS = frozenset({"a", "an", "the", "is", "are", "of", "and", "to", "in", "on", "at", "with"})
"""Words dropped from an AND that has another positive word (not from phrases, NOT or OR)."""

_TOKEN_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
"""A word: letters and digits (Unicode), with apostrophes inside it (``don't``)."""
_LEX_RE = re.compile(r'(?P<space>\s+)|"[^"]*"?|\(|\)|(?P<minus>-(?=[^\s-]))|[^\s"()]+')


def _norm(token: str) -> str:
    return token.lower().replace("\u2019", "'")


def tokenize(text: str) -> list[str]:
    """The words of a caption or query text, lower-cased, in order, as every index stores them.

    A word is a run of letters/digits (any script) with inner apostrophes (``don't``,
    typographic ``’`` read as ``'``); everything else separates words.
    """
    return [_norm(m.group()) for m in _TOKEN_RE.finditer(text)]


@dataclass(frozen=True)
class Term:
    """One word (lower case, as :func:`tokenize` makes it)."""

    word: str


@dataclass(frozen=True)
class Phrase:
    """Two or more words next to each other, in this order."""

    words: tuple[str, ...]


@dataclass(frozen=True)
class Not:
    """Captions that do not match ``node``."""

    node: Query


@dataclass(frozen=True)
class And:
    """Captions matching every node (at least two)."""

    nodes: tuple[Query, ...]


@dataclass(frozen=True)
class Or:
    """Captions matching any node (at least two)."""

    nodes: tuple[Query, ...]


Query = Term | Phrase | Not | And | Or


# -- parsing -----------------------------------------------------------------------------


class _Parser:
    """Recursive descent over lexed items: ``or := and (OR and)*``, ``and := unary+``,
    ``unary := (NOT | -) unary | primary``, ``primary := word | "phrase" | ( or )``."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.pos = 0

    def peek(self) -> str | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def take(self) -> str:
        item = self.items[self.pos]
        self.pos += 1
        return item

    def parse_or(self) -> Query | None:
        if self.peek() == "OR":
            raise QueryError("OR needs something on its left, as in: truck OR bus")
        nodes = []
        first = self.parse_and()
        if first is not None:
            nodes.append(first)
        while self.peek() == "OR":
            self.take()
            if self.peek() in (None, ")", "OR"):
                raise QueryError("OR needs something on its right, as in: truck OR bus")
            node = self.parse_and()
            if node is not None:
                nodes.append(node)
        if not nodes:
            return None
        return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))

    def parse_and(self) -> Query | None:
        nodes: list[Query] = []
        while self.peek() not in (None, ")", "OR"):
            if self.peek() == "AND":
                self.take()
                if self.peek() in (None, ")", "OR", "AND"):
                    raise QueryError("AND needs something on its right, as in: truck AND night")
                continue
            node = self.parse_unary()
            if isinstance(node, And):  # (a -b) inside an AND: one level
                nodes.extend(node.nodes)
            elif node is not None:
                nodes.append(node)
        if not nodes:
            return None
        nodes = _without_stop_words(nodes)
        return nodes[0] if len(nodes) == 1 else And(tuple(nodes))

    def parse_unary(self) -> Query | None:
        item = self.peek()
        if item in ("NOT", "-"):
            self.take()
            if self.peek() in (None, ")", "OR", "AND"):
                raise QueryError('NOT needs a word, a "phrase" or (...) right after it, as in: '
                                 "truck NOT night" if item == "NOT"
                                 else "- needs a word right after it, as in: truck -night")
            node = self.parse_unary()
            if node is None:
                raise QueryError(f"{item} is followed by nothing searchable (use letters or digits)")
            return node.node if isinstance(node, Not) else Not(node)
        return self.parse_primary()

    def parse_primary(self) -> Query | None:
        item = self.take()
        if item == "(":
            node = self.parse_or()
            if self.peek() != ")":
                raise QueryError("a parenthesis is not closed: add ')'")
            self.take()
            return node
        if item.startswith('"'):
            if len(item) < 2 or not item.endswith('"'):
                raise QueryError('a quote is not closed: add \'"\' after the phrase')
            return _words_node(tokenize(item[1:-1]), quoted=True)
        return _words_node(tokenize(item), quoted=False)


def _without_stop_words(nodes: list[Query]) -> list[Query]:
    """The nodes of an AND less its stop-word terms, when a positive part is left without them."""
    def stop(node: Query) -> bool:
        return isinstance(node, Term) and node.word in STOP_WORDS

    kept = [node for node in nodes if not stop(node)]
    return kept if any(not is_negative(node) for node in kept) else nodes


def _words_node(words: list[str], *, quoted: bool) -> Query | None:
    if not words:
        if quoted:
            raise QueryError('an empty "" phrase: put words between the quotes')
        return None  # punctuation only (*, ^, :): nothing to search for
    return Term(words[0]) if len(words) == 1 else Phrase(tuple(words))


def _lex(text: str) -> list[str]:
    items: list[str] = []
    pos = 0
    while pos < len(text):
        m = _LEX_RE.match(text, pos)
        if m is None:  # cannot happen: every character starts one alternative
            raise QueryError(f"cannot read the query at character {pos + 1}")
        pos = m.end()
        item = m.group()
        if m.lastgroup == "space" or (item == "-" and m.lastgroup != "minus"):
            continue  # a "-" standing alone is punctuation, not NOT
        items.append(item)
    return items


def parse_query(text: str) -> Query | None:
    """Parse the search box text once; None for a blank query (matches every caption).

    Raises:
        QueryError: unbalanced quote or parenthesis, OR/AND/NOT/- with nothing beside it,
            a query with no word at all (only ``*`` or ``:``), NOT inside OR without a word to
            subtract from, more than :data:`MAX_QUERY_CHARS` characters or
            :data:`MAX_QUERY_TERMS` words. The message is for the user.
    """
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is too long: {len(text)} characters, at most {MAX_QUERY_CHARS}")
    if not text.strip():
        return None
    parser = _Parser(_lex(text))
    node = parser.parse_or()
    if parser.peek() == ")":
        raise QueryError("a ')' has no '(' before it")
    if node is None:
        raise QueryError("the query has no word to search for (use letters or digits)")
    terms = sum(len(w) if isinstance(w, tuple) else 1 for w in _all_words(node))
    if terms > MAX_QUERY_TERMS:
        raise QueryError(f"the query has too many words: {terms}, at most {MAX_QUERY_TERMS}")
    _check_negations(node)
    return node


def _all_words(node: Query) -> Iterable[str | tuple[str, ...]]:
    if isinstance(node, Term):
        yield node.word
    elif isinstance(node, Phrase):
        yield node.words
    elif isinstance(node, Not):
        yield from _all_words(node.node)
    else:
        for child in node.nodes:
            yield from _all_words(child)


def is_negative(node: Query) -> bool:
    """True if ``node`` matches by absence only (a NOT, or an AND of NOTs): it cannot use an
    index by itself and needs a positive part to subtract from (except at the top)."""
    if isinstance(node, Not):
        return True
    if isinstance(node, And):
        return all(is_negative(child) for child in node.nodes)
    if isinstance(node, Or):
        return any(is_negative(child) for child in node.nodes)
    return False


def _check_negations(node: Query) -> None:
    if isinstance(node, Not):
        if is_negative(node.node):
            raise QueryError("NOT of a NOT: say what to keep, as in: truck NOT night")
        _check_negations(node.node)
    elif isinstance(node, Or):
        for child in node.nodes:
            if is_negative(child):
                raise QueryError("NOT inside OR needs a word to subtract from, as in: "
                                 "(truck -night) OR bus")
            _check_negations(child)
    elif isinstance(node, And):
        for child in node.nodes:
            _check_negations(child)


def negated_part(q: Query) -> Query | None:
    """For a query made only of negations, what it excludes (``-a -b`` gives ``a OR b``);
    None for a query with a positive part."""
    if isinstance(q, Not):
        return q.node
    if isinstance(q, And) and all(isinstance(c, Not) for c in q.nodes):
        inner = tuple(c.node for c in q.nodes if isinstance(c, Not))
        return inner[0] if len(inner) == 1 else Or(inner)
    return None


# -- using the tree -----------------------------------------------------------------------


def query_words(q: Query | None) -> list[str]:
    """The words a matching caption may contain (not those under NOT), in query order, once
    each: for widening lookups and highlights."""
    out: list[str] = []

    def walk(node: Query) -> None:
        if isinstance(node, Term):
            out.append(node.word)
        elif isinstance(node, Phrase):
            out.extend(node.words)
        elif isinstance(node, (And, Or)):
            for child in node.nodes:
                walk(child)

    if q is not None:
        walk(q)
    return list(dict.fromkeys(out))


def apply_widenings(q: Query, widenings: dict[str, list[str]]) -> Query:
    """``q`` with every :class:`Term` whose word is in ``widenings`` replaced by
    ``Or(Term(word), Term(w1), ...)`` (phrases stay exact). Widening words are tokenised like
    captions; those that are not one word are skipped."""
    if isinstance(q, Term):
        extra = [t[0] for w in widenings.get(q.word, []) if len(t := tokenize(w)) == 1]
        words = list(dict.fromkeys([q.word, *extra]))
        return q if len(words) == 1 else Or(tuple(Term(w) for w in words))
    if isinstance(q, Not):
        return Not(apply_widenings(q.node, widenings))
    if isinstance(q, And):
        return And(tuple(apply_widenings(c, widenings) for c in q.nodes))
    if isinstance(q, Or):
        return Or(tuple(apply_widenings(c, widenings) for c in q.nodes))
    return q


def _contains(tokens: Sequence[str], words: Sequence[str]) -> bool:
    n = len(words)
    return any(tuple(tokens[i:i + n]) == tuple(words) for i in range(len(tokens) - n + 1))


def _match(node: Query, tokens: list[str], present: set[str], matched: list[str]) -> bool:
    if isinstance(node, Term):
        if node.word in present:
            matched.append(node.word)
            return True
        return False
    if isinstance(node, Phrase):
        if _contains(tokens, node.words):
            matched.extend(node.words)
            return True
        return False
    if isinstance(node, Not):
        return not _match(node.node, tokens, present, [])
    if isinstance(node, And):
        found: list[str] = []
        if all(_match(c, tokens, present, found) for c in node.nodes):
            matched.extend(found)
            return True
        return False
    hits = [_match(c, tokens, present, matched) for c in node.nodes]  # every branch, for words
    return any(hits)


def match_caption(q: Query | None, caption: str) -> list[str] | None:
    """Evaluate ``q`` on one caption in Python (what the indexes do in SQL): None if it does
    not match, else the query words found in it (once each, query order; may be empty for a
    query of negations only or a None query, which matches everything)."""
    if q is None:
        return []
    tokens = tokenize(caption)
    matched: list[str] = []
    if not _match(q, tokens, set(tokens), matched):
        return None
    return list(dict.fromkeys(matched))


def highlight(caption: str, words: Iterable[str]) -> str:
    """``caption`` HTML-escaped, with each word in ``words`` (compared as :func:`tokenize`
    makes them) wrapped in ``<mark>...</mark>``."""
    wanted = {_norm(w) for w in words}
    out: list[str] = []
    pos = 0
    for m in _TOKEN_RE.finditer(caption):
        if _norm(m.group()) in wanted:
            out.append(html.escape(caption[pos:m.start()]))
            out.append(f"<mark>{html.escape(m.group())}</mark>")
            pos = m.end()
    out.append(html.escape(caption[pos:]))
    return "".join(out)


# -- compilers ----------------------------------------------------------------------------


def _fts5_string(words: Sequence[str]) -> str:
    return '"' + " ".join(words).replace('"', '""') + '"'


def to_fts5(q: Query) -> str:
    """An SQLite FTS5 MATCH expression for ``q`` (bind it as a parameter). Every word is a
    quoted FTS5 string, so nothing a user typed is read as FTS5 syntax.

    Raises:
        ValueError: ``q`` is negative only (see :func:`negated_part`): FTS5 cannot express
            "everything but"; match :func:`negated_part` and subtract instead.
    """
    if isinstance(q, Term):
        return _fts5_string([q.word])
    if isinstance(q, Phrase):
        return _fts5_string(q.words)
    if isinstance(q, Or):
        return " OR ".join(f"({to_fts5(c)})" for c in q.nodes)
    if isinstance(q, And):
        positive = [c for c in q.nodes if not isinstance(c, Not)]
        negative = [c.node for c in q.nodes if isinstance(c, Not)]
        if not positive:
            raise ValueError("a query of negations only has no FTS5 form")
        expr = " AND ".join(f"({to_fts5(c)})" for c in positive)
        for neg in negative:
            expr = f"({expr}) NOT ({to_fts5(neg)})"
        return expr
    raise ValueError("a query of negations only has no FTS5 form")


def _ts_lexeme(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def to_tsquery(q: Query) -> str:
    """PostgreSQL ``tsquery`` input text for ``q``: bind it as a parameter and cast it
    (``%s::tsquery``), never through ``to_tsquery`` (whose parser would split words
    differently). Every lexeme is quoted; phrases use ``<->``."""
    if isinstance(q, Term):
        return _ts_lexeme(q.word)
    if isinstance(q, Phrase):
        return "(" + " <-> ".join(_ts_lexeme(w) for w in q.words) + ")"
    if isinstance(q, Not):
        return f"!({to_tsquery(q.node)})"
    joiner = " & " if isinstance(q, And) else " | "
    return "(" + joiner.join(f"({to_tsquery(c)})" for c in q.nodes) + ")"


def to_tsvector(caption: str) -> str:
    """PostgreSQL ``tsvector`` input text of a caption (cast ``%s::tsvector``): each word of
    :func:`tokenize` with its 1-based positions, the same words :func:`to_tsquery` looks for."""
    positions: dict[str, list[int]] = {}
    for i, word in enumerate(tokenize(caption)[:16383], start=1):
        positions.setdefault(word, []).append(i)
    return " ".join(f"{_ts_lexeme(w)}:{','.join(map(str, p[:256]))}" for w, p in positions.items())
