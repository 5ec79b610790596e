"""Tiny randomly initialised captioning checkpoints, so tests need not wait for a trained model.

``tiny_checkpoint()`` returns a checkpoint dict (EfficientNet-Lite0 encoder, a decoder of a
few thousand parameters, a 10-word vocabulary); ``make_tiny_checkpoint(path)`` writes one that
``Captioner.load(path)`` accepts. Captions from it are random words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cloud.captioning.checkpoint import save_checkpoint
from cloud.captioning.models import DecoderWithAttention, ModelArgs
from cloud.captioning.vocab import WordMap

TINY_WORDS = ("a", "dog", "man", "runs", "on", "the", "grass", "in", "water", "street")


def tiny_word_map() -> WordMap:
    return WordMap.build([list(TINY_WORDS)], min_word_freq=1)


def tiny_checkpoint(seed: int = 0, encoder: str = "efficientnet_lite0", dim: int = 16,
                    encoded_image_size: int = 7) -> dict[str, Any]:
    """A checkpoint dict of a tiny random decoder (dims ``dim``) over the real frozen encoder."""
    word_map = tiny_word_map()
    args = ModelArgs(vocab_size=len(word_map), encoder=encoder, encoded_image_size=encoded_image_size,
                     encoder_proj_dim=dim, attention_dim=dim, embed_dim=dim, decoder_dim=dim, dropout=0.0, feature_dropout=0.0)
    torch.manual_seed(seed)
    decoder = DecoderWithAttention(args)
    return {"decoder": decoder.state_dict(), "model_args": args.to_dict(),
            "word_map": word_map.to_dict(), "name": "sat-tiny-random-v0", "metrics": []}


def make_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write ``tiny_checkpoint(seed)`` to ``path`` and return the path."""
    path = Path(path)
    save_checkpoint(path, tiny_checkpoint(seed))
    return path
