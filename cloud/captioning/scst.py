"""Self-critical sequence training (SCST) of a captioner trained with cross-entropy.

The reward is CIDEr-D. SCST comes from Rennie et al. 2017, "Self-critical Sequence Training for
Image Captioning" (arXiv:1612.00563). The baseline is the mean reward of the other samples of
the same image (Luo 2020, "A Better Variant of Self-Critical Sequence Training",
arXiv:2003.09971), so no greedy decode is needed.

For each image the decoder samples ``k`` captions from its own distribution. The reward of a
caption is its CIDEr-D against the image's references. The loss is
``-(reward - baseline) * log p(caption)``, averaged over the sampled words. The document
frequencies come from the train references, as in ruotianluo's self-critical.pytorch. The
``<end>`` token counts as a word on both sides, so a caption cut off mid-phrase is penalised.

:class:`CiderD` computes the same numbers as pycocoevalcap's ``Cider``
(``tests/captioning/test_scst.py`` checks this). It differs in two ways: the document
frequencies are fixed once, from a corpus, and the reference vectors are built once, so a
training step only counts the n-grams of its samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cloud.captioning.models import DecoderWithAttention
from cloud.captioning.vocab import WordMap

Ngram = tuple[str, ...]
END_WORD = "<end>"


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter[Ngram]:
    """Counts of every 1..n-gram of ``words`` (pycocoevalcap's ``precook``)."""
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation",
    arXiv:1411.5726) with document frequencies from a fixed corpus of references.

    The computation follows pycocoevalcap's ``CiderScorer``:
    - tf-idf vectors per n-gram order (n = 1..4);
    - clipped cosine similarity to each reference;
    - a Gaussian length penalty with sigma 6 (length is the caption's bigram count, as there);
    - the mean over n-gram orders and references, times 10.

    Args:
        references: per image, its reference captions as space-separated tokens. They define
            the document frequencies, and image ``i`` of :meth:`scores` is ``references[i]``.
        n: longest n-gram.
        sigma: width of the length penalty.
    """

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        cooked = [[ngram_counts(r.split(), n) for r in refs] for refs in references]
        df: Counter[Ngram] = Counter()
        for refs in cooked:
            df.update({g for ref in refs for g in ref})
        self.log_df = {g: math.log(c) for g, c in df.items()}
        self.ref_len = math.log(float(len(references)))
        self.ref_vectors = [[self._vector(ref) for ref in refs] for refs in cooked]

    def _vector(self, counts: Counter[Ngram]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = tf * (self.ref_len - self.log_df.get(gram, 0.0))
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: int, candidate: str) -> float:
        """CIDEr-D of one caption (space-separated tokens) against the references of ``image``."""
        vec, norm, length = self._vector(ngram_counts(candidate.split(), self.n))
        refs = self.ref_vectors[image]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for order in range(self.n):
                ref_o = ref_vec[order]
                val = sum(min(w, ref_o.get(g, 0.0)) * ref_o.get(g, 0.0) for g, w in vec[order].items())
                if norm[order] != 0 and ref_norm[order] != 0:
                    val /= norm[order] * ref_norm[order]
                total += val * penalty
        return total / self.n / len(refs) * 10.0

    def scores(self, images: Sequence[int], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against the references of ``images[i]``: (len,) float64."""
        return np.array([self.score(i, c) for i, c in zip(images, candidates, strict=True)])


def sample_captions(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                    samples_per_image: int, max_len: int, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample captions from the decoder (multinomial, with gradients).

    The decoder's current mode is kept: in train mode dropout stays on while sampling.

    Args:
        decoder: the decoder.
        encoder_out: (n, grid, grid, encoder_dim) or (n, num_pixels, encoder_dim).
        word_map: the model's word map (``<pad>``, ``<start>`` and ``<unk>`` are never sampled).
        samples_per_image: k, captions sampled per image.
        max_len: most words per caption, ``<end>`` included.
        temperature: divides the logits before sampling.

    Returns:
        tokens (n*k, T) long, ``<end>``-terminated where the caption ended, then ``<pad>``;
        log_probs (n*k, T) of the sampled tokens, zero past the end;
        mask (n*k, T) bool, True for the sampled words up to and including ``<end>``.
        Rows i*k .. i*k+k-1 belong to image i.
    """
    n = encoder_out.size(0)
    device = encoder_out.device
    state = decoder.init_state(encoder_out)
    state = state.select(torch.arange(n, device=device).repeat_interleave(samples_per_image))
    rows = n * samples_per_image
    token = torch.full((rows,), word_map.start, dtype=torch.long, device=device)  # (rows,)
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # (rows,)
    banned = torch.tensor([word_map.pad, word_map.start, word_map.unk], device=device)
    tokens, log_probs, masks = [], [], []
    for _ in range(max_len):
        state, _ = decoder.step(decoder.embedding(token), state)
        logits = decoder.logits(state.h).float() / temperature  # (rows, vocab)
        logits[:, banned] = float("-inf")
        logp = F.log_softmax(logits, dim=1)  # (rows, vocab)
        sampled = torch.multinomial(logp.detach().exp(), 1).squeeze(1)  # (rows,), never banned
        alive = ~done
        token = torch.where(alive, sampled, torch.full_like(sampled, word_map.pad))
        tokens.append(token)
        chosen = logp.gather(1, sampled[:, None]).squeeze(1)  # (rows,), finite
        log_probs.append(torch.where(alive, chosen, torch.zeros_like(chosen)))
        masks.append(alive)
        done = done | (token == word_map.end)
        if bool(done.all()):
            break
    return torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1)


def reward_words(tokens: torch.Tensor, word_map: WordMap) -> list[str]:
    """Sampled token rows (rows, T) -> captions for CIDEr-D, ``<end>`` kept as a word when
    the caption ended (a caption cut at max_len has none)."""
    out = []
    for row in tokens.tolist():
        words = []
        for t in row:
            if t == word_map.end:
                words.append(END_WORD)
                break
            if t == word_map.pad:
                break
            words.append(word_map.index_to_word[t])
        out.append(" ".join(words))
    return out


def scst_loss(log_probs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              samples_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient loss with the mean-of-other-samples baseline.

    Args:
        log_probs: (n*k, T) log-probabilities of the sampled tokens.
        mask: (n*k, T) True for sampled words (``<end>`` included).
        rewards: (n*k,) CIDEr-D of each sample, image-major (k rows per image).
        samples_per_image: k >= 2.

    Returns:
        the loss (a scalar: the advantage-weighted negative log-likelihood per sampled word) and
        the advantages (n*k,).
    """
    if samples_per_image < 2:
        raise ValueError("the mean-of-samples baseline needs at least 2 samples per image")
    k = samples_per_image
    per_image = rewards.view(-1, k)  # (n, k)
    baseline = (per_image.sum(dim=1, keepdim=True) - per_image) / (k - 1)  # (n, k)
    advantage = (per_image - baseline).reshape(-1)  # (n*k,)
    loss = -(advantage[:, None] * log_probs * mask).sum() / mask.sum().clamp(min=1)
    return loss, advantage


def sentence_bleu4(references: Sequence[Sequence[str]], images: Sequence[int],
                   candidates: Sequence[str]) -> np.ndarray:
    """Sentence-level BLEU-4 of ``candidates[i]`` against ``references[images[i]]``, with
    pycocoevalcap's ``BleuScorer`` (closest reference length, its tiny smoothing): (len,)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for image, candidate in zip(images, candidates, strict=True):
        scorer += (candidate, list(references[image]))
    _, per_order = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_order[3], dtype=np.float64)


def scst_batches(dataset, sampler):
    """Per step: cached features (n_images, P, E) and the image indices (n_images,) of the
    sampler's caption batch (each image once, whatever its number of captions in the batch)."""
    assert dataset.features is not None
    for indices in sampler:
        images = torch.div(torch.tensor(indices), dataset.cpi, rounding_mode="floor").unique()
        yield dataset.features[images], images


def train_one_epoch_scst(model, batches, optimizer, cider: CiderD, word_map: WordMap,
                         samples_per_image: int, max_len: int, grad_clip: float, epoch: int,
                         rank: int, world: int = 1, max_steps: int = 0,
                         sample_dropout: bool = False, bleu_weight: float = 0.0,
                         references: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """One SCST pass over the train images; returns the mean policy loss and mean sample reward
    (CIDEr-D, ``<end>`` counted as a word). With several processes the gradients are averaged
    with ``all_reduce`` (sampling runs outside DDP's forward). Dropout stays off while sampling
    unless ``sample_dropout``, so the policy trained is the one that decodes at test time.
    ``bleu_weight`` > 0 adds that times the sentence BLEU-4 (against ``references``, without
    ``<end>``) to the reward."""
    from tqdm import tqdm

    model.train(sample_dropout)
    decoder = model.module.decoder if hasattr(model, "module") else model.decoder
    device = next(decoder.parameters()).device
    loss_sum, reward_sum, n_steps, n_samples = 0.0, 0.0, 0, 0
    bar = tqdm(batches, desc=f"scst epoch {epoch}", unit="batch", disable=rank != 0 or None, mininterval=5)
    for step, (features, images) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        tokens, log_probs, mask = sample_captions(decoder, features.to(device), word_map,
                                                  samples_per_image, max_len)
        captions = reward_words(tokens, word_map)
        image_rows = images.repeat_interleave(samples_per_image).tolist()
        reward = cider.scores(image_rows, captions)  # (n*k,)
        if bleu_weight > 0 and references is not None:
            plain = [c.removesuffix(END_WORD).strip() for c in captions]
            reward = reward + bleu_weight * sentence_bleu4(references, image_rows, plain)
        rewards = torch.from_numpy(reward).float().to(device)  # (n*k,)
        loss, _ = scst_loss(log_probs, mask, rewards, samples_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in decoder.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip)
        optimizer.step()
        loss_sum += float(loss.detach())
        reward_sum += float(rewards.sum())
        n_steps += 1
        n_samples += len(captions)
        if rank == 0 and step % 20 == 0:
            bar.set_postfix(reward=f"{reward_sum / max(n_samples, 1):.3f}")
    return {"loss": loss_sum / max(n_steps, 1), "reward": reward_sum / max(n_samples, 1)}
