"""Helpers of ``framecap train``: the encoder+decoder module, val decoding, metrics files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from torch import nn

from cloud.captioning.beam_search import beam_search
from cloud.captioning.data import CaptionDataset
from cloud.captioning.metrics import bleu4
from cloud.captioning.models import DecoderWithAttention, Encoder

logger = logging.getLogger(__name__)


class CaptionModel(nn.Module):
    """Encoder (None when training on cached features) + decoder, one module for DDP."""

    def __init__(self, encoder: Encoder | None, decoder: DecoderWithAttention) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, S, S) -> features (b, grid, grid, encoder_dim); features pass through."""
        if self.encoder is None:
            return inputs  # (b, num_pixels, encoder_dim) cached features
        return self.encoder(inputs)

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decoder(self.encode(inputs), captions, lengths, image_index)


@torch.inference_mode()
def decode_split(model: CaptionModel, dataset: CaptionDataset, beam_size: int, max_len: int,
                 device: torch.device, limit: int | None = None, batch_size: int = 250
                 ) -> tuple[list[str], list[list[str]]]:
    """Caption the images of a split without teacher forcing; returns hypotheses, references."""
    model.eval()
    word_map = dataset.word_map
    n = min(limit or len(dataset.images), len(dataset.images))
    hypotheses: list[str] = []
    for start in range(0, n, batch_size):
        inputs = torch.stack([dataset.image_input(i) for i in range(start, min(start + batch_size, n))])
        encoder_out = model.encode(inputs.to(device)).float()  # (b, num_pixels or grid, ..., encoder_dim)
        for h in beam_search(model.decoder, encoder_out, word_map, beam_size, max_len):
            hypotheses.append(" ".join(word_map.decode(h.tokens)))
    return hypotheses, dataset.references[:n]


def val_scores(model: CaptionModel, dataset: CaptionDataset, beam_size: int, max_len: int,
               device: torch.device, limit: int | None = None) -> tuple[float, float, list[str]]:
    """Decode the val images; returns corpus BLEU-4, CIDEr-D (pycocoevalcap on the Karpathy
    tokens, no PTB) and the captions."""
    from pycocoevalcap.cider.cider import Cider

    hypotheses, references = decode_split(model, dataset, beam_size, max_len, device, limit)
    cider, _ = Cider().compute_score({i: r for i, r in enumerate(references)},
                                     {i: [h] for i, h in enumerate(hypotheses)})
    return bleu4(references, hypotheses), float(cider), hypotheses


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_metrics(path: Path, rows: list[dict]) -> None:
    """Training loss, top-5 accuracy and val BLEU-4 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key, title in zip(axes, ("loss", "top5", "val_bleu4"),
                              ("train loss (token CE)", "train top-5 accuracy", "val BLEU-4 (decoded)"), strict=True):
        ax.plot(epochs, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
