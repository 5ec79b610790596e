"""The word map: words <-> indices, with ``<pad>``, ``<start>``, ``<end>`` and ``<unk>``.

As in the sgrvinod tutorial (``create_input_files``): words seen fewer than ``min_word_freq``
times in the training captions map to ``<unk>``. ``<pad>`` is index 0 so that padded
positions are zeros.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)


class WordMap:
    """A bidirectional mapping between words and indices.

    ``word_map[word] -> index``; ``decode(indices) -> words`` stops at ``<end>`` and drops
    ``<start>``/``<pad>``.
    """

    def __init__(self, word_to_index: dict[str, int]) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in word_to_index]
        if missing:
            raise ValueError(f"word map lacks special tokens {missing}")
        indices = sorted(word_to_index.values())
        if indices != list(range(len(indices))):
            raise ValueError("word map indices must be 0..vocab_size-1 without gaps")
        self.word_to_index = dict(word_to_index)
        self.index_to_word = {i: w for w, i in self.word_to_index.items()}

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_word_freq: int = 5) -> WordMap:
        """Build from tokenised training captions; words below ``min_word_freq`` become <unk>."""
        counts: Counter[str] = Counter()
        for tokens in captions:
            counts.update(tokens)
        words = sorted(w for w, c in counts.items() if c >= min_word_freq and w not in SPECIAL_TOKENS)
        mapping = {PAD: 0, START: 1, END: 2, UNK: 3}
        for word in words:
            mapping[word] = len(mapping)
        logger.info("word map: %d words (min_word_freq=%d, %d distinct)", len(mapping), min_word_freq, len(counts))
        return cls(mapping)

    def __len__(self) -> int:
        return len(self.word_to_index)

    def __getitem__(self, word: str) -> int:
        return self.word_to_index[word]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordMap) and self.word_to_index == other.word_to_index

    @property
    def pad(self) -> int:
        return self.word_to_index[PAD]

    @property
    def start(self) -> int:
        return self.word_to_index[START]

    @property
    def end(self) -> int:
        return self.word_to_index[END]

    @property
    def unk(self) -> int:
        return self.word_to_index[UNK]

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """``<start> w1 .. wn <end>``, truncated to ``max_len`` words (no padding)."""
        body = [self.word_to_index.get(t, self.unk) for t in tokens[:max_len]]
        return [self.start, *body, self.end]

    def decode(self, indices: Iterable[int]) -> list[str]:
        """Words of a sequence of indices, without <start>/<pad>, stopping at <end>."""
        words = []
        for index in indices:
            index = int(index)
            if index == self.end:
                break
            if index in (self.start, self.pad):
                continue
            words.append(self.index_to_word.get(index, UNK))
        return words

    def to_dict(self) -> dict[str, int]:
        return dict(self.word_to_index)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.word_to_index, indent=0, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> WordMap:
        """Read a word_map.json; raises FileNotFoundError or ValueError on a bad file."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON word map ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a word map must be a JSON object")
        return cls({str(k): int(v) for k, v in data.items()})
