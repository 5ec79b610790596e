"""Beam search pinned against references that share none of its code (issue 8, item 18).

``beam_search`` decodes many images at once as a (batch x beam) block with the decoder's
batched ``step_beams``. Comparing it with itself on one image proves nothing about the search:
a mutant that decodes greedily for every beam size passes such a test. Here it is compared,
on tokens and scores, with

* an exhaustive search: every caption of at most ``max_len`` words over a tiny vocabulary,
  scored word by word with the decoder's one-image ``step``; a beam at least as wide as the
  number of captions keeps every hypothesis, so it must find the best one;
* a plain per-image beam search written below from the algorithm's description (Python lists,
  one hypothesis at a time), for beam sizes 1 to 5, with length penalty and n-gram bans.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cloud.captioning.beam_search import beam_search
from cloud.captioning.models import DecoderState, DecoderWithAttention, ModelArgs
from cloud.captioning.vocab import WordMap

NEG_INF = float("-inf")


def tiny_decoder(words: int, seed: int) -> tuple[DecoderWithAttention, WordMap]:
    """A random decoder over the four special tokens and ``words`` words, with peaked output
    distributions (weights drawn wide) so that the best caption is not the greedy one."""
    word_map = WordMap.build([[f"w{i}" for i in range(words)]], min_word_freq=1)
    args = ModelArgs(vocab_size=len(word_map), encoder_proj_dim=8, attention_dim=8, embed_dim=8,
                     decoder_dim=16, dropout=0.0, feature_dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    decoder = DecoderWithAttention(args).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.7)
    return decoder, word_map


def features(images: int, seed: int) -> torch.Tensor:
    """Random encoder output (images, 2, 2, 1280): a 2x2 attention grid."""
    return torch.randn(images, 2, 2, 1280, generator=torch.Generator().manual_seed(seed))


@dataclass
class Node:
    """A live hypothesis of the reference searches: words (no <start>), summed log-prob, state."""

    words: list[int]
    score: float
    state: DecoderState


def _next_logp(decoder: DecoderWithAttention, node: Node, word_map: WordMap) -> tuple[DecoderState, list[float]]:
    """One decoder step of one hypothesis: its new state and log P(word | words so far)."""
    last = node.words[-1] if node.words else word_map.start
    state, _ = decoder.step(decoder.embedding(torch.tensor([last])), node.state)
    return state, F.log_softmax(decoder.fc(state.h), dim=1)[0].tolist()


def _allowed(word_map: WordMap, words: list[int], word: int, ngram: int) -> bool:
    """Whether ``word`` may follow ``words``: no <pad>/<start>/<unk>, no repeated ``ngram``-gram."""
    if word in (word_map.pad, word_map.start, word_map.unk):
        return False
    if ngram > 0 and word != word_map.end:
        seq = [*words, word]
        grams = [tuple(seq[i:i + ngram]) for i in range(len(seq) - ngram + 1)]
        if grams and grams[-1] in grams[:-1]:
            return False
    return True


def _rank(words: list[int], score: float, length_penalty: float) -> float:
    return score / float(len(words) + 1) ** length_penalty if length_penalty > 0 else score


@torch.inference_mode()
def exhaustive_best(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                    max_len: int, length_penalty: float, ngram: int) -> tuple[list[int], float]:
    """The best caption of at most ``max_len`` words, every caption scored (one image)."""
    words = [w for w in range(len(word_map)) if w != word_map.end]
    best: tuple[list[int], float] | None = None
    for length in range(max_len + 1):
        for seq in itertools.product(words, repeat=length):
            if not all(_allowed(word_map, list(seq[:i]), seq[i], ngram) for i in range(length)):
                continue
            node = Node([], 0.0, decoder.init_state(encoder_out))
            for word in [*seq, word_map.end]:
                node.state, logp = _next_logp(decoder, node, word_map)
                node = Node([*node.words, word], node.score + logp[word], node.state)
            caption, score = node.words[:-1], node.score
            if best is None or _rank(caption, score, length_penalty) > _rank(*best, length_penalty):
                best = (caption, score)
    assert best is not None
    return best


@torch.inference_mode()
def plain_beam_search(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                      beam_size: int, max_len: int, length_penalty: float, ngram: int) -> tuple[list[int], float]:
    """Beam search of one image, as described in beam_search's docstring, one hypothesis at a time.

    Each step extends every live hypothesis by every allowed word (only <end> after ``max_len``
    words), keeps the best ``beam_size - completed`` candidates; those ending in <end> are
    complete. The result is the complete caption of best rank.
    """
    live = [Node([], 0.0, decoder.init_state(encoder_out))]
    complete: list[tuple[list[int], float]] = []
    for step in range(1, max_len + 2):
        candidates: list[tuple[float, list[int], DecoderState]] = []
        for node in live:
            state, logp = _next_logp(decoder, node, word_map)
            for word, lp in enumerate(logp):
                if step == max_len + 1 and word != word_map.end:
                    continue
                if _allowed(word_map, node.words, word, ngram):
                    candidates.append((node.score + lp, [*node.words, word], state))
        candidates.sort(key=lambda cand: cand[0], reverse=True)
        live = []
        for score, words, state in candidates[:beam_size - len(complete)]:
            if words[-1] == word_map.end:
                complete.append((words[:-1], score))
            else:
                live.append(Node(words, score, state))
        if not live:
            break
    best = complete[0]
    for caption in complete[1:]:
        if _rank(*caption, length_penalty) > _rank(*best, length_penalty):
            best = caption
    return best


@torch.inference_mode()
def greedy(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap, max_len: int,
           ngram: int) -> list[int]:
    return plain_beam_search(decoder, encoder_out, word_map, 1, max_len, 0.0, ngram)[0]


@pytest.mark.parametrize(("length_penalty", "ngram"), [(0.0, 0), (1.0, 0), (0.7, 1), (0.0, 2)])
def test_a_beam_wider_than_all_captions_finds_the_exhaustive_best(length_penalty: float, ngram: int) -> None:
    words, max_len = 3, 3
    decoder, word_map = tiny_decoder(words, seed=1)
    captions = sum(words ** n for n in range(max_len + 1))  # 40: a beam this wide drops no hypothesis
    encoder_out = features(12, seed=2)
    hyps = beam_search(decoder, encoder_out, word_map, captions, max_len, length_penalty,
                       no_repeat_ngram_size=ngram)
    not_greedy = 0
    for i, hyp in enumerate(hyps):
        tokens, score = exhaustive_best(decoder, encoder_out[i:i + 1], word_map, max_len, length_penalty, ngram)
        assert hyp.tokens == tokens, i
        assert hyp.score == pytest.approx(score, abs=1e-4), i
        not_greedy += tokens != greedy(decoder, encoder_out[i:i + 1], word_map, max_len, ngram)
    assert not_greedy >= 2  # the test has teeth: greedy decoding would fail it


@pytest.mark.parametrize(("length_penalty", "ngram"), [(0.0, 0), (1.0, 0), (1.0, 2), (0.5, 3)])
def test_batched_beam_search_equals_a_plain_per_image_beam_search(length_penalty: float, ngram: int) -> None:
    decoder, word_map = tiny_decoder(words=8, seed=3)
    encoder_out = features(10, seed=4)
    max_len = 7
    differs_from_greedy = 0
    for beam_size in (1, 2, 3, 5):
        hyps = beam_search(decoder, encoder_out, word_map, beam_size, max_len, length_penalty,
                           return_alphas=True, no_repeat_ngram_size=ngram)
        for i, hyp in enumerate(hyps):
            tokens, score = plain_beam_search(decoder, encoder_out[i:i + 1], word_map, beam_size, max_len,
                                              length_penalty, ngram)
            assert hyp.tokens == tokens, (beam_size, i)
            assert hyp.score == pytest.approx(score, abs=1e-4), (beam_size, i)
            assert hyp.alphas is not None and hyp.alphas.shape == (len(tokens) + 1, 4)
            if beam_size > 1:
                differs_from_greedy += tokens != greedy(decoder, encoder_out[i:i + 1], word_map, max_len, ngram)
    assert differs_from_greedy >= 3  # the test has teeth: greedy decoding would fail it


def test_alphas_are_the_attention_of_each_word_of_the_caption() -> None:
    """The alphas returned with a caption are those of teacher-forcing that caption (one image)."""
    decoder, word_map = tiny_decoder(words=8, seed=5)
    encoder_out = features(4, seed=6)
    for i, hyp in enumerate(beam_search(decoder, encoder_out, word_map, 3, 6, 1.0, return_alphas=True)):
        assert hyp.alphas is not None
        with torch.inference_mode():
            state = decoder.init_state(encoder_out[i:i + 1])
            expected = []
            for word in [word_map.start, *hyp.tokens]:
                state, alpha = decoder.step(decoder.embedding(torch.tensor([word])), state)
                expected.append(alpha[0])
        assert torch.allclose(hyp.alphas, torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_scattered_repeat_bans_equal_the_listed_ones(size: int) -> None:
    from cloud.captioning.beam_search import _ban_repeats_, _repeat_bans

    generator = torch.Generator().manual_seed(size)
    for length in range(1, 9):
        seqs = torch.randint(4, 9, (12, length), generator=generator)  # few words: many repeats
        seqs[:, 0] = 1  # <start>
        logp = torch.randn(12, 10, generator=generator)
        expected = logp.clone()
        for row, word in _repeat_bans(seqs, size):
            expected[row, word] = NEG_INF
        _ban_repeats_(logp, seqs, size)
        assert torch.equal(logp, expected)


def test_beam_search_reads_the_device_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every read of a tensor's value by the host waits for the queued work: the search
    makes one such read per step (which images still decode) and three at the end."""
    decoder, word_map = tiny_decoder(words=8, seed=7)
    encoder_out = features(10, seed=8)
    reads = {"n": 0}
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original: object = original, **kwargs: object) -> object:
            reads["n"] += 1
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    max_len = 7
    hyps = beam_search(decoder, encoder_out, word_map, 5, max_len, 1.0, return_alphas=True, no_repeat_ngram_size=2)
    monkeypatch.undo()
    assert len(hyps) == 10
    assert reads["n"] <= (max_len + 1) + 3, reads
