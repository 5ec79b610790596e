"""Self-critical sequence training: the CIDEr-D reward, the sampler, the loss and ``train --scst``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from cloud.captioning import train
from cloud.captioning.checkpoint import read_checkpoint
from cloud.captioning.models import DecoderWithAttention, ModelArgs
from cloud.captioning.scst import CiderD, reward_words, sample_captions, scst_loss, sentence_bleu4
from cloud.captioning.vocab import WordMap

from .test_train import TINY, data_dir  # noqa: F401  (fixture)


def test_cider_d_equals_pycocoevalcap_when_the_corpus_is_the_test_set(karpathy) -> None:
    from pycocoevalcap.cider.cider import Cider

    items = [i for i in karpathy["images"] if i["split"] == "val"][:60]
    refs = [[" ".join(s["tokens"]) for s in i["sentences"][1:]] for i in items]
    # candidates: another image's caption, a held-out own caption, a truncated one, an empty one
    cands = [" ".join(items[(j + 1) % len(items)]["sentences"][0]["tokens"]) if j % 3 == 0
             else " ".join(i["sentences"][0]["tokens"][: 4 if j % 3 == 1 else None])
             for j, i in enumerate(items)]
    cands[5] = ""
    mean, per_image = Cider().compute_score({j: r for j, r in enumerate(refs)}, {j: [c] for j, c in enumerate(cands)})
    ours = CiderD(refs).scores(list(range(len(items))), cands)
    np.testing.assert_allclose(ours, per_image, rtol=1e-9, atol=1e-12)
    assert ours[5] == 0.0 and ours.max() > 1.0


def test_cider_d_ranks_a_reference_above_an_unrelated_caption() -> None:
    cider = CiderD([["a dog runs on the grass", "a brown dog running in a field"],
                    ["two children play in the snow", "kids playing in snow"]])
    own, other = cider.scores([0, 0], ["a dog running on the grass", "two children play in the snow"])
    assert own > 1.0 > other


def test_sentence_bleu4_is_one_for_a_reference_and_near_zero_for_an_unrelated_caption() -> None:
    refs = [["a dog runs on the grass", "a brown dog running in a field"], ["kids playing in snow"]]
    scores = sentence_bleu4(refs, [0, 0, 1], ["a dog runs on the grass", "a cat sits", "kids playing in snow"])
    assert scores[0] == pytest.approx(1.0) and scores[1] < 1e-6 and scores[2] > 0.5


def test_scst_loss_uses_the_mean_of_the_other_samples_as_baseline() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5])  # two images x three samples
    log_probs = torch.full((6, 4), -1.0, requires_grad=True)
    mask = torch.ones(6, 4, dtype=torch.bool)
    loss, advantage = scst_loss(log_probs, mask, rewards, 3)
    torch.testing.assert_close(advantage, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    loss.backward()
    # raising the log-prob of the best sample lowers the loss, of the worst raises it
    assert log_probs.grad[2, 0] < 0 < log_probs.grad[0, 0]
    with pytest.raises(ValueError, match="at least 2"):
        scst_loss(log_probs, mask, rewards, 1)


def test_sample_captions_shapes_masks_and_gradients() -> None:
    word_map = WordMap.build([["a", "dog"], ["a", "cat"]], min_word_freq=1)
    torch.manual_seed(0)
    decoder = DecoderWithAttention(ModelArgs(vocab_size=len(word_map), encoder_proj_dim=8,
                                             attention_dim=8, embed_dim=8, decoder_dim=8))
    tokens, log_probs, mask = sample_captions(decoder, torch.randn(3, 4, 1280), word_map, 4, max_len=6)
    assert tokens.shape[0] == 12 and tokens.shape == log_probs.shape == mask.shape and tokens.shape[1] <= 6
    banned = {word_map.start, word_map.unk}
    assert not any(t in banned for t in tokens[mask].tolist())
    for row, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)  # live until <end>, then padding
        assert all(t == word_map.pad for t in row[n:])
        if word_map.end in row[:n]:
            assert row.index(word_map.end) == n - 1
    assert (log_probs[~mask] == 0).all() and (log_probs[mask] <= 0).all()
    log_probs.sum().backward()
    assert decoder.fc.weight.grad is not None
    words = reward_words(tokens, word_map)
    assert len(words) == 12 and all("<pad>" not in w and "<start>" not in w for w in words)


def test_train_scst_from_a_cross_entropy_checkpoint_raises_the_reward(data_dir, tmp_path) -> None:  # noqa: F811
    xe = tmp_path / "xe"
    base = ["--data-dir", str(data_dir), "--batch-size", "20", "--seed", "1"]
    assert train.main([*base, "--run-dir", str(xe), "--epochs", "4", "--lr", "3e-3", "--no-val", *TINY]) == 0
    run = tmp_path / "scst"
    assert train.main([*base, "--run-dir", str(run), "--epochs", "4", "--lr", "1e-3", "--scst",
                       "--init-from", str(xe / "last.pt"), "--scst-samples", "4", "--scst-max-len", "12",
                       "--val-limit", "4"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    rewards = [float(r["reward"]) for r in rows]
    assert len(rewards) == 4 and rewards[-1] > rewards[0], rewards
    assert "SCST" in (run / "train.log").read_text()
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["model_args"]["decoder_dim"] == 32  # taken from the --init-from model, not the defaults


def test_train_scst_refuses_a_model_with_another_word_map(data_dir, tmp_path) -> None:  # noqa: F811
    other = tmp_path / "other.pt"
    torch.save({"decoder": {}, "model_args": ModelArgs(vocab_size=5).to_dict(),
                "word_map": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "zebra": 4}}, other)
    assert train.main(["--data-dir", str(data_dir), "--run-dir", str(tmp_path / "r"), "--scst",
                       "--init-from", str(other), "--epochs", "1"]) == 1
    assert "word map differs" in (tmp_path / "r" / "train.log").read_text()
