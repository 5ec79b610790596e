"""A tiny model learns real captions; batched beam search equals a plain per-image beam search
(``test_beam_reference.plain_beam_search``, which shares no code with it) on real images."""

from __future__ import annotations

import pytest
import torch

from cloud.captioning.beam_search import beam_search

from .test_beam_reference import greedy, plain_beam_search


def test_tiny_model_overfits_real_captions(overfit_model) -> None:
    decoder, word_map, encoder_out, targets, losses = overfit_model
    assert losses[-1] < 0.1 * losses[0]
    hyps = beam_search(decoder, encoder_out, word_map, beam_size=3, max_len=30)
    decoded = [word_map.decode(h.tokens) for h in hyps]
    assert decoded == targets


@pytest.mark.parametrize(("beam_size", "length_penalty", "ngram"), [(1, 0.0, 0), (3, 0.0, 0), (5, 1.0, 2)])
def test_batched_equals_a_plain_beam_search_on_real_images(overfit_model, encoder, real_images, beam_size,
                                                           length_penalty, ngram) -> None:
    decoder, word_map, _, _, _ = overfit_model
    with torch.inference_mode():
        encoder_out = encoder(encoder.preprocess(real_images))  # (8, 7, 7, 1280) unseen images
    batched = beam_search(decoder, encoder_out, word_map, beam_size, max_len=12, length_penalty=length_penalty,
                          return_alphas=True, no_repeat_ngram_size=ngram)
    differs_from_greedy = 0
    for i, hyp in enumerate(batched):
        tokens, score = plain_beam_search(decoder, encoder_out[i:i + 1], word_map, beam_size, 12,
                                          length_penalty, ngram)
        assert hyp.tokens == tokens
        assert hyp.score == pytest.approx(score, abs=1e-4)
        assert hyp.alphas is not None and hyp.alphas.shape == (len(hyp.tokens) + 1, 49)
        assert len(hyp.tokens) <= 12
        differs_from_greedy += tokens != greedy(decoder, encoder_out[i:i + 1], word_map, 12, ngram)
    if beam_size > 1:
        assert differs_from_greedy > 0  # greedy decoding would fail this test


def test_trained_default_model_batched_equals_single(real_images) -> None:
    from cloud.captioning.inference import DEFAULT_MODEL_PATH, Captioner

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no committed default model")
    captioner = Captioner.load(None, device="cpu", beam_size=3)
    encoder_out = captioner.encode(real_images)
    batched = beam_search(captioner.decoder, encoder_out, captioner.word_map, 3, 30)
    singles = [beam_search(captioner.decoder, encoder_out[i:i + 1], captioner.word_map, 3, 30)[0]
               for i in range(len(real_images))]
    assert [h.tokens for h in batched] == [h.tokens for h in singles]
    assert all(len(h.tokens) > 2 for h in batched)


def test_beam_search_never_emits_special_tokens(overfit_model, encoder, real_images) -> None:
    decoder, word_map, _, _, _ = overfit_model
    with torch.inference_mode():
        encoder_out = encoder(encoder.preprocess(real_images[:4]))
    for hyp in beam_search(decoder, encoder_out, word_map, beam_size=4, max_len=8):
        assert not {word_map.pad, word_map.start, word_map.unk, word_map.end} & set(hyp.tokens)


def test_repeat_bans_finds_the_word_that_would_repeat_an_ngram() -> None:
    from cloud.captioning.beam_search import _repeat_bans

    seqs = torch.tensor([[1, 5, 6, 7, 5], [1, 5, 6, 5, 6]])  # <start>=1; "a dog b a", "a dog a dog"
    assert _repeat_bans(seqs, 2) == [(0, 6), (1, 5)]  # "a dog" again; "dog a" again
    assert _repeat_bans(seqs, 3) == [(1, 5)]  # "a dog a" again
    assert _repeat_bans(seqs, 0) == []


@pytest.mark.parametrize("size", [2, 3])
def test_no_repeat_ngram_blocks_repeats_and_batched_equals_single(real_images, size) -> None:
    from cloud.captioning.inference import DEFAULT_MODEL_PATH, Captioner

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no committed default model")
    captioner = Captioner.load(None, device="cpu", beam_size=3)
    encoder_out = captioner.encode(real_images)
    batched = beam_search(captioner.decoder, encoder_out, captioner.word_map, 3, 30, no_repeat_ngram_size=size)
    singles = [beam_search(captioner.decoder, encoder_out[i:i + 1], captioner.word_map, 3, 30,
                           no_repeat_ngram_size=size)[0] for i in range(len(real_images))]
    assert [h.tokens for h in batched] == [h.tokens for h in singles]
    for h in batched:
        grams = [tuple(h.tokens[i:i + size]) for i in range(len(h.tokens) - size + 1)]
        assert len(grams) == len(set(grams)), h.tokens
