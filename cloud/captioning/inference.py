"""The captioning interface the caption worker uses: ``Captioner.load(...).caption_images(...)``.

A ``Captioner`` holds a frozen encoder, a decoder and its word map, rebuilt from a checkpoint
(``cloud/models/default.pt`` unless told otherwise), and captions RGB uint8 images of any size
with the batched beam search (Xu et al. 2015; sgrvinod's tutorial ``caption.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.captioning.beam_search import Hypothesis, beam_search
from cloud.captioning.checkpoint import CheckpointError, build_models, model_name, read_checkpoint
from cloud.captioning.models import ModelArgs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parents[1] / "models" / "default.pt"

__all__ = ["DEFAULT_MODEL_PATH", "Captioner", "CheckpointError"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Captioner:
    """A loaded captioning model.

    Attributes:
        name: the model name written in caption records, e.g. "sat-efficientnet_lite0-flickr8k-v2".
        beam_size, max_caption_length, length_penalty, no_repeat_ngram_size: decoding settings
            (see beam_search); the last two default to the values stored in the checkpoint.
        batch_size: images per encoder/beam-search batch.
    """

    def __init__(self, ckpt: dict[str, Any], *, device: str = "auto", beam_size: int = 3,
                 max_caption_length: int = 30, source: str = "checkpoint",
                 pretrained_encoder: bool = True, length_penalty: float | None = None,
                 batch_size: int = 32, no_repeat_ngram_size: int | None = None) -> None:
        if beam_size < 1 or max_caption_length < 1:
            raise ValueError("beam_size and max_caption_length must be >= 1")
        self.device = resolve_device(device)
        encoder, decoder, word_map = build_models(ckpt, source, pretrained_encoder)
        self.encoder = encoder.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        self.word_map = word_map
        self.model_args: ModelArgs = decoder.args
        self.name: str = str(ckpt.get("name") or model_name(self.model_args))
        self.beam_size = beam_size
        self.max_caption_length = max_caption_length
        # the checkpoint may carry the decoding setting it was tuned with (export --length-penalty)
        self.length_penalty = float(ckpt.get("length_penalty", 0.0) if length_penalty is None else length_penalty)
        self.no_repeat_ngram_size = int(ckpt.get("no_repeat_ngram_size", 0)
                                        if no_repeat_ngram_size is None else no_repeat_ngram_size)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto", beam_size: int = 3,
             max_caption_length: int = 30) -> Captioner:
        """Load a checkpoint (None: the committed default model).

        Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for a
        file that is not a captioning checkpoint or whose weights do not fit its model_args or
        word map.
        """
        path = Path(path) if path is not None else DEFAULT_MODEL_PATH
        ckpt = read_checkpoint(path)
        captioner = cls(ckpt, device=device, beam_size=beam_size,
                        max_caption_length=max_caption_length, source=str(path))
        logger.info("loaded captioning model %s from %s on %s", captioner.name, path, captioner.device)
        return captioner

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any], **kwargs: Any) -> Captioner:
        """Build from an in-memory checkpoint dict (e.g. ``testing.tiny_checkpoint()``)."""
        return cls(ckpt, **kwargs)

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) images -> encoder_out (batch, grid, grid, encoder_dim)."""
        x = self.encoder.preprocess(images).to(self.device)  # (batch, 3, S, S)
        return self.encoder(x).float()  # (batch, grid, grid, encoder_dim)

    def hypotheses(self, images: Sequence[np.ndarray], return_alphas: bool = False) -> list[Hypothesis]:
        """Beam-search hypotheses per image, batched ``batch_size`` images at a time."""
        out: list[Hypothesis] = []
        for start in range(0, len(images), self.batch_size):
            encoder_out = self.encode(images[start:start + self.batch_size])
            out += beam_search(self.decoder, encoder_out, self.word_map, self.beam_size,
                               self.max_caption_length, self.length_penalty, return_alphas,
                               no_repeat_ngram_size=self.no_repeat_ngram_size)
        return out

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Caption RGB uint8 HxWx3 images of any size.

        Returns (caption, score) per image, in order: the caption as lower-case words joined
        by spaces, the score its summed natural-log probability (<= 0; includes <end>).
        Raises ValueError for an array that is not RGB uint8 HxWx3.
        """
        if len(images) == 0:
            return []
        return [(" ".join(self.word_map.decode(h.tokens)), h.score) for h in self.hypotheses(images)]
