"""Checkpoint round trip, export, and clear errors for bad checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.captioning.checkpoint import (
    CheckpointError,
    export_model,
    read_checkpoint,
    save_checkpoint,
)
from cloud.captioning.inference import Captioner
from cloud.captioning.testing import make_tiny_checkpoint, tiny_checkpoint


def test_round_trip_gives_same_captions(tmp_path, real_images) -> None:
    path = make_tiny_checkpoint(tmp_path / "tiny.pt", seed=3)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickled modules
    assert set(raw) >= {"decoder", "model_args", "word_map"}
    loaded = Captioner.load(path, device="cpu", beam_size=2, max_caption_length=6)
    direct = Captioner.from_checkpoint_dict(tiny_checkpoint(seed=3), device="cpu", beam_size=2,
                                            max_caption_length=6)
    assert loaded.name == "sat-tiny-random-v0"
    assert loaded.caption_images(real_images[:3]) == direct.caption_images(real_images[:3])


def test_export_is_fp16_and_loads(tmp_path, real_images) -> None:
    ckpt = tiny_checkpoint(seed=1)
    ckpt.update(optimizer={}, epoch=4, metrics=[{"epoch": 4, "val_bleu4": 0.1}])
    save_checkpoint(tmp_path / "train.pt", ckpt)
    out = export_model(tmp_path / "train.pt", tmp_path / "model.pt", name="sat-test-v9", length_penalty=0.7)
    assert all(v.dtype == torch.float16 for v in out["decoder"].values() if v.is_floating_point())
    assert "optimizer" not in read_checkpoint(tmp_path / "model.pt")
    captioner = Captioner.load(tmp_path / "model.pt", device="cpu", max_caption_length=5)
    assert captioner.name == "sat-test-v9" and captioner.length_penalty == 0.7
    (caption, score), = captioner.caption_images(real_images[:1])
    assert isinstance(caption, str) and score <= 0


def test_caption_images_any_size_and_bad_arrays() -> None:
    captioner = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", max_caption_length=4)
    images = [np.zeros((480, 640, 3), np.uint8), np.full((100, 50, 3), 200, np.uint8)]
    out = captioner.caption_images(images)
    assert len(out) == 2 and all(isinstance(c, str) and isinstance(s, float) for c, s in out)
    assert captioner.caption_images([]) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        captioner.caption_images([np.zeros((10, 10, 4), np.uint8)])


def test_missing_and_garbage_checkpoints(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        Captioner.load(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        Captioner.load(garbage)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a framecap captioning checkpoint"):
        Captioner.load(tmp_path / "other.pt")


def test_wrong_shape_and_wrong_vocabulary(tmp_path) -> None:
    ckpt = tiny_checkpoint()
    ckpt["model_args"] = {**ckpt["model_args"], "decoder_dim": 32}  # weights are for 16
    save_checkpoint(tmp_path / "shape.pt", ckpt)
    with pytest.raises(CheckpointError, match="do not fit model_args"):
        Captioner.load(tmp_path / "shape.pt")
    ckpt = tiny_checkpoint()
    ckpt["word_map"] = {**ckpt["word_map"], "zebra": len(ckpt["word_map"])}
    save_checkpoint(tmp_path / "vocab.pt", ckpt)
    with pytest.raises(CheckpointError, match="vocab_size"):
        Captioner.load(tmp_path / "vocab.pt")
    assert issubclass(CheckpointError, ValueError)


def test_average_checkpoints(tmp_path) -> None:
    from cloud.captioning.checkpoint import average_checkpoints

    save_checkpoint(tmp_path / "a.pt", tiny_checkpoint(seed=1))
    save_checkpoint(tmp_path / "b.pt", tiny_checkpoint(seed=2))
    avg = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    a, b = tiny_checkpoint(seed=1)["decoder"], tiny_checkpoint(seed=2)["decoder"]
    assert torch.allclose(avg["decoder"]["fc.weight"], (a["fc.weight"] + b["fc.weight"]) / 2)
    other = tiny_checkpoint()
    other["word_map"] = {**other["word_map"], "zebra": len(other["word_map"])}
    save_checkpoint(tmp_path / "c.pt", other)
    with pytest.raises(CheckpointError, match="differ"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "c.pt"])
