"""Batched beam search for Show, Attend and Tell decoders.

Many images are decoded at once as a (batch x beam) block. Per image it is the same algorithm
as the sgrvinod tutorial's ``caption_image_beam_search`` (Xu et al. 2015 decode with a beam):
at each step the live hypotheses of an image are extended by every word, the best ``live``
candidates are kept, those ending in ``<end>`` are complete and leave the beam (the beam of
that image shrinks), and decoding stops when no hypothesis is live or at ``max_len`` words.
The caption is the complete hypothesis with the best score (summed log-probability, divided
by ``length**length_penalty`` when ``length_penalty > 0``). An image's result does not depend
on the other images in the batch; ``tests/captioning/test_beam_search.py`` checks that.

Beam size 1 is greedy decoding. ``no_repeat_ngram_size=N`` forbids a word that would repeat
an n-gram of N words already in the hypothesis (as ``no_repeat_ngram_size`` in Hugging Face
``generate``, after fairseq), e.g. "a dog playing with a dog" with N=2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloud.captioning.models import DecoderWithAttention
from cloud.captioning.vocab import WordMap

logger = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    """A decoded caption: word indices without <start>/<end>, its log-probability and alphas."""

    tokens: list[int]
    score: float  # summed log-probability of the words and <end> (natural log)
    alphas: torch.Tensor | None = None  # (len(tokens) + 1, num_pixels) attention per word, with <end>


def _ranking(h: Hypothesis, length_penalty: float) -> float:
    if length_penalty <= 0:
        return h.score
    return h.score / float(len(h.tokens) + 1) ** length_penalty


def _repeat_bans(seqs: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """(row, word) pairs that would repeat an n-gram of ``size`` words in ``seqs`` (rows, t)."""
    if size < 1 or seqs.size(1) < size:
        return []
    bans = []
    for row, seq in enumerate(seqs[:, 1:].tolist()):  # without <start>
        if len(seq) < size - 1:
            continue
        prefix = tuple(seq[len(seq) - size + 1:]) if size > 1 else ()
        for i in range(len(seq) - size + 1):
            if tuple(seq[i:i + size - 1]) == prefix:
                bans.append((row, seq[i + size - 1]))
    return bans


@torch.inference_mode()
def beam_search(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                beam_size: int = 3, max_len: int = 30, length_penalty: float = 0.0,
                return_alphas: bool = False, allow_unk: bool = False,
                no_repeat_ngram_size: int = 0) -> list[Hypothesis]:
    """Decode a batch of images with beam search.

    Args:
        decoder: the decoder (put in eval mode by the caller).
        encoder_out: (batch, grid, grid, encoder_dim) or (batch, num_pixels, encoder_dim).
        word_map: the model's word map.
        beam_size: hypotheses kept per image (1 = greedy).
        max_len: most words per caption (not counting <start>/<end>).
        length_penalty: 0 ranks complete captions by summed log-probability; a > 0 by
            score / (words + 1) ** a.
        return_alphas: keep each word's attention weights (for visualisation).
        allow_unk: let captions contain <unk>.
        no_repeat_ngram_size: N > 0 forbids repeating any n-gram of N words (0: off).

    Returns:
        one Hypothesis per image, in input order.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError("beam_size and max_len must be >= 1")
    n, k = encoder_out.size(0), beam_size
    device = encoder_out.device
    vocab_size = decoder.args.vocab_size
    banned = [word_map.pad, word_map.start] + ([] if allow_unk else [word_map.unk])
    state = decoder.init_state(encoder_out)
    state = state.select(torch.arange(n, device=device).repeat_interleave(k))  # (n*k, ...)
    seqs = torch.full((n * k, 1), word_map.start, dtype=torch.long, device=device)  # (n*k, 1)
    scores = torch.full((n, k), float("-inf"), device=device)  # (n, k)
    scores[:, 0] = 0.0  # one live hypothesis per image at first, so beams do not repeat
    live = torch.ones(n, dtype=torch.long, device=device) * k  # (n,) live hypotheses per image
    history = seqs.new_zeros(n * k, 0, state.features.size(1), dtype=torch.float) if return_alphas else None
    complete: list[list[Hypothesis]] = [[] for _ in range(n)]
    rank = torch.arange(k, device=device)[None]  # (1, k)
    base = (torch.arange(n, device=device) * k)[:, None]  # (n, 1)
    for step in range(1, max_len + 2):  # max_len words, then a last chance for <end>
        embedded = decoder.embedding(seqs[:, -1])  # (n*k, embed_dim)
        state, alpha = decoder.step(embedded, state)  # alpha (n*k, num_pixels)
        logp = F.log_softmax(decoder.fc(state.h), dim=1)  # (n*k, vocab_size)
        logp[:, banned] = float("-inf")
        for row, word in _repeat_bans(seqs, no_repeat_ngram_size):
            logp[row, word] = float("-inf")
        if step == max_len + 1:  # only <end> may follow the last word
            end_logp = logp[:, word_map.end].clone()
            logp.fill_(float("-inf"))
            logp[:, word_map.end] = end_logp
        candidates = (scores.view(-1, 1) + logp).view(n, k * vocab_size)  # (n, k*vocab_size)
        top_scores, top_index = candidates.topk(k, dim=1)  # (n, k)
        beam = torch.div(top_index, vocab_size, rounding_mode="floor")  # (n, k)
        words = top_index % vocab_size  # (n, k)
        keep = (rank < live[:, None]) & torch.isfinite(top_scores)  # (n, k)
        ended = keep & (words == word_map.end)  # (n, k)
        source = (base + beam).view(-1)  # (n*k,)
        seqs = torch.cat([seqs[source], words.view(-1, 1)], dim=1)  # (n*k, step+1)
        state = state.select(source)
        if history is not None:
            history = torch.cat([history[source], alpha[source].unsqueeze(1)], dim=1)  # (n*k, step, num_pixels)
        for i, j in ended.nonzero().tolist():
            row = i * k + j
            complete[i].append(Hypothesis(seqs[row, 1:-1].tolist(), float(top_scores[i, j]),
                                          history[row].clone() if history is not None else None))
        live = live - ended.sum(dim=1)  # (n,)
        scores = top_scores.masked_fill(~keep | ended, float("-inf"))  # (n, k)
        if int(live.max()) == 0:
            break
    return [max(c, key=lambda h: _ranking(h, length_penalty)) for c in complete]
