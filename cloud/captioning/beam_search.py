"""Batched beam search for Show, Attend and Tell decoders.

Many images are decoded at once as a (batch x beam) block. Per image it is the same algorithm
as the sgrvinod tutorial's ``caption_image_beam_search`` (Xu et al. 2015 decode with a beam):
at each step the live hypotheses of an image are extended by every word, the best ``live``
candidates are kept, those ending in ``<end>`` are complete and leave the beam (the beam of
that image shrinks), and decoding stops when no hypothesis is live or at ``max_len`` words.
The caption is the complete hypothesis with the best score (summed log-probability, divided
by ``length**length_penalty`` when ``length_penalty > 0``; the earliest found on a tie). An
image's result does not depend on the other images in the batch.

The search stays on the decoder's device: the best complete hypothesis of each image is kept
in tensors, n-gram bans are a scatter, and the host reads one small flag vector per step
(which images still decode), so a GPU is not stalled by per-hypothesis reads.
``tests/captioning/test_beam_reference.py`` pins it against an exhaustive search and a plain
per-image beam search; ``tests/captioning/test_pinned_captions.py`` pins the default model's
captions.

Under autocast (``Captioner(precision="bf16")``, fp16 on CUDA) the decoder's steps run in the
autocast dtype; the output layer's logits are cast to float32 before the log-softmax, so the
scores and their sums over the steps stay float32.

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


def _repeat_ban_index(seqs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and words that would repeat an n-gram of ``size`` words in ``seqs`` (rows, t).

    ``seqs`` starts with <start> (not part of any n-gram). Vectorised: every window of ``size``
    words whose first ``size - 1`` equal the hypothesis' last ``size - 1`` words bans its last
    word. Returns (rows, words) LongTensors, ordered by row, then by window position.
    """
    words = seqs[:, 1:]  # (rows, t) without <start>
    t = words.size(1)
    if size < 1 or t - size + 1 <= 0:
        empty = seqs.new_zeros(0)
        return empty, empty
    windows = words.unfold(1, size, 1)  # (rows, t - size + 1, size)
    prefix = words[:, t - size + 1:]  # (rows, size - 1)
    match = (windows[:, :, :size - 1] == prefix[:, None, :]).all(dim=2)  # (rows, t - size + 1)
    rows, position = match.nonzero(as_tuple=True)  # (bans,) each
    return rows, windows[rows, position, size - 1]


def _repeat_bans(seqs: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """(row, word) pairs that would repeat an n-gram of ``size`` words in ``seqs`` (rows, t)."""
    rows, words = _repeat_ban_index(seqs, size)
    return list(zip(rows.tolist(), words.tolist(), strict=True))


def _ban_repeats_(logp: torch.Tensor, seqs: torch.Tensor, size: int) -> None:
    """Set to -inf, in place, the log-probabilities (rows, vocab) of the words that would repeat
    an n-gram of ``size`` words in ``seqs`` (rows, t): the bans of :func:`_repeat_ban_index`
    without its ``nonzero`` (whose output size the host must wait for, a GPU sync per step).
    Every window scatters +inf (no ban) or -inf (ban) onto its last word with ``amin``."""
    words = seqs[:, 1:]  # (rows, t) without <start>
    t = words.size(1)
    if size < 1 or t - size + 1 <= 0:
        return
    windows = words.unfold(1, size, 1)  # (rows, t - size + 1, size)
    prefix = words[:, t - size + 1:]  # (rows, size - 1)
    match = (windows[:, :, :size - 1] == prefix[:, None, :]).all(dim=2)  # (rows, t - size + 1)
    inf = torch.tensor(float("inf"), dtype=logp.dtype, device=logp.device)
    logp.scatter_reduce_(1, windows[:, :, size - 1], torch.where(match, -inf, inf), reduce="amin")


@torch.inference_mode()
def beam_search(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                beam_size: int = 3, max_len: int = 30, length_penalty: float = 0.0,
                return_alphas: bool = False, allow_unk: bool = False,
                no_repeat_ngram_size: int = 0) -> list[Hypothesis]:
    """Decode a batch of images with beam search.

    The image features and their attention projection are kept once per image and read by
    all of its beams (``DecoderWithAttention.step_beams``); only h, c and the word history are
    per hypothesis. An image whose hypotheses have all ended leaves the batch, so a long
    caption does not keep the whole batch decoding.

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
    neg_inf = float("-inf")
    banned = torch.tensor([word_map.pad, word_map.start] + ([] if allow_unk else [word_map.unk]), device=device)
    state = decoder.init_state(encoder_out)
    features, att1 = state.features, state.att1  # (n, num_pixels, feature_dim), (n, num_pixels, attention_dim)
    h = state.h.repeat_interleave(k, dim=0)  # (n*k, decoder_dim)
    c = state.c.repeat_interleave(k, dim=0)  # (n*k, decoder_dim)
    work = att1.new_empty(n * k * att1.size(1) * att1.size(2))  # attention scratch, reused every step
    seqs = torch.full((n * k, 1), word_map.start, dtype=torch.long, device=device)  # (n*k, 1)
    scores = torch.full((n, k), neg_inf, device=device)  # (n, k)
    scores[:, 0] = 0.0  # one live hypothesis per image at first, so beams do not repeat
    live = torch.ones(n, dtype=torch.long, device=device) * k  # (n,) live hypotheses per image
    history = seqs.new_zeros(n * k, 0, features.size(1), dtype=torch.float) if return_alphas else None
    image_ids = torch.arange(n, device=device)  # (m,) the input index of each image still decoding
    # The best complete hypothesis of each image so far, kept on the device (no host sync per
    # step): its rank (float64, as Python ranks it), score, number of words, words and alphas.
    best_rank = torch.full((n,), neg_inf, dtype=torch.float64, device=device)  # (n,)
    best_score = torch.zeros(n, device=device)  # (n,)
    best_len = torch.full((n,), -1, dtype=torch.long, device=device)  # (n,) -1: none yet
    best_tokens = seqs.new_zeros(n, max_len)  # (n, max_len)
    best_alphas = (features.new_zeros(n, max_len + 1, features.size(1), dtype=torch.float)
                   if return_alphas else None)  # (n, max_len + 1, num_pixels)
    rank = torch.arange(k, device=device)[None]  # (1, k)
    base = (torch.arange(n, device=device) * k)[:, None]  # (n, 1)
    for step in range(1, max_len + 2):  # max_len words, then a last chance for <end>
        m = image_ids.size(0)  # images still decoding
        embedded = decoder.embedding(seqs[:, -1])  # (m*k, embed_dim)
        h, c, alpha = decoder.step_beams(embedded, features, att1, h, c, work)  # alpha (m*k, num_pixels)
        # float32 whatever the autocast dtype: a hypothesis' score adds up to max_len + 1 of them
        logp = F.log_softmax(decoder.fc(h).float(), dim=1)  # (m*k, vocab_size)
        logp.index_fill_(1, banned, neg_inf)
        if no_repeat_ngram_size > 0:
            _ban_repeats_(logp, seqs, no_repeat_ngram_size)
        if step == max_len + 1:  # only <end> may follow the last word
            end_logp = logp[:, word_map.end].clone()
            logp.fill_(neg_inf)
            logp[:, word_map.end] = end_logp
        candidates = (scores.view(-1, 1) + logp).view(m, k * vocab_size)  # (m, k*vocab_size)
        top_scores, top_index = candidates.topk(k, dim=1)  # (m, k)
        beam = torch.div(top_index, vocab_size, rounding_mode="floor")  # (m, k)
        words = top_index % vocab_size  # (m, k)
        keep = (rank < live[:, None]) & torch.isfinite(top_scores)  # (m, k)
        ended = keep & (words == word_map.end)  # (m, k)
        source = (base[:m] + beam).view(-1)  # (m*k,)
        seqs = torch.cat([seqs[source], words.view(-1, 1)], dim=1)  # (m*k, step+1)
        h, c = h[source], c[source]  # (m*k, decoder_dim) each
        if history is not None:
            history = torch.cat([history[source], alpha[source].unsqueeze(1)], dim=1)  # (m*k, step, num_pixels)
        # The hypotheses that ended now have step - 1 words; the best of them per image replaces
        # the image's best if it ranks strictly higher (on a tie the earlier one stays, and within
        # a step the first in beam order, as max() over them in that order would keep).
        ranked = top_scores.double()  # (m, k)
        if length_penalty > 0:
            ranked = ranked / float(step) ** length_penalty
        ranked = ranked.masked_fill(~ended, neg_inf)
        j = ranked.argmax(dim=1)  # (m,)
        step_best = ranked.gather(1, j[:, None])[:, 0]  # (m,)
        better = step_best > best_rank[image_ids]  # (m,)
        rows = base[:m, 0] + j  # (m,) row of each image's best new hypothesis
        best_rank[image_ids] = torch.where(better, step_best, best_rank[image_ids])
        best_score[image_ids] = torch.where(better, top_scores.gather(1, j[:, None])[:, 0], best_score[image_ids])
        best_len[image_ids] = torch.where(better, step - 1, best_len[image_ids])
        if step > 1:
            old = best_tokens[image_ids, :step - 1]  # (m, step - 1)
            best_tokens[image_ids, :step - 1] = torch.where(better[:, None], seqs[rows, 1:step], old)
        if best_alphas is not None and history is not None:
            old_alphas = best_alphas[image_ids, :step]  # (m, step, num_pixels)
            best_alphas[image_ids, :step] = torch.where(better[:, None, None], history[rows], old_alphas)
        live = live - ended.sum(dim=1)  # (m,)
        scores = top_scores.masked_fill(~keep | ended, neg_inf)  # (m, k)
        decoding = (live > 0).tolist()  # the one host sync of a step
        if not any(decoding):
            break
        if not all(decoding):  # images whose hypotheses have all ended leave the batch
            kept = torch.tensor([i for i, d in enumerate(decoding) if d], device=device)  # (m',)
            kept_rows = (kept[:, None] * k + rank).view(-1)  # (m'*k,)
            features, att1, scores, live = features[kept], att1[kept], scores[kept], live[kept]
            h, c, seqs = h[kept_rows], c[kept_rows], seqs[kept_rows]
            if history is not None:
                history = history[kept_rows]
            image_ids = image_ids[kept]
    lengths, found_scores, tokens = best_len.tolist(), best_score.tolist(), best_tokens.tolist()
    if min(lengths) < 0:
        raise ValueError("beam search ended an image without a complete caption (every word banned?)")
    return [Hypothesis(tokens[i][:length], found_scores[i],
                       best_alphas[i, :length + 1].clone() if best_alphas is not None else None)
            for i, length in enumerate(lengths)]
