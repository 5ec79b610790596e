"""Helpers of ``framecap train``: the encoder+decoder module, device and precision, val
decoding (sharded over the DDP ranks), metrics files."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cloud.captioning.beam_search import beam_search
from cloud.captioning.data import CaptionDataset
from cloud.captioning.metrics import bleu4
from cloud.captioning.models import DecoderWithAttention, Encoder

logger = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How the training forward pass runs: ``dtype`` for ``torch.autocast`` (None: float32, no
    autocast) and whether the loss needs a ``GradScaler`` (float16 only: its gradients can
    underflow; bfloat16 has float32's exponent range)."""

    name: str  # fp32, bf16 or fp16
    dtype: torch.dtype | None
    scaler: bool

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of this precision on ``device`` (disabled for fp32)."""
        return torch.autocast(device_type=device.type, dtype=self.dtype, enabled=self.dtype is not None)


FP32 = Precision("fp32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)


def cuda_bf16_supported() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (Ampere and later), not by
    emulation (which ``torch.cuda.is_bf16_supported()`` counts by default)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_precision(requested: str, device: torch.device,
                     bf16_supported: Callable[[], bool] = cuda_bf16_supported) -> Precision:
    """The training precision for ``--precision requested`` on ``device``.

    ``auto``: bf16 on a GPU that supports it, else fp16 with a GradScaler; fp32 on the CPU.
    ``fp32``, ``bf16`` and ``fp16`` as asked (fp16 gets a GradScaler on any device).

    Raises:
        ValueError: bf16 asked on a GPU without it, or an unknown name.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return FP32
    if requested == "fp16":
        return FP16
    if device.type != "cuda":
        return BF16 if requested == "bf16" else FP32
    if bf16_supported():
        return BF16
    if requested == "bf16":
        raise ValueError(f"--precision bf16: {device} has no native bfloat16 (before Ampere); "
                         "use --precision fp16 or auto")
    return FP16


def enable_tf32(device: torch.device) -> bool:
    """On a GPU, let float32 matmuls and convolutions use TF32 tensor cores (Ampere and later;
    about 10 mantissa bits, ample for training). Returns True when set (CUDA only)."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def train_device(device_arg: str, local_rank: int, world: int, cuda_available: bool) -> torch.device:
    """The device of this training process for ``--device device_arg``.

    ``auto``: cuda when available, else cpu. ``cuda``: the GPU of this process, ``cuda:LOCAL_RANK``
    (one per torchrun process). ``cuda:N``: GPU N, for a single process.

    Raises:
        ValueError: ``cuda:N`` with several processes (each takes its own GPU).
    """
    if device_arg == "auto":
        device_arg = "cuda" if cuda_available else "cpu"
    if device_arg == "cpu":
        return torch.device("cpu")
    if device_arg == "cuda":
        return torch.device(f"cuda:{local_rank}")
    device = torch.device(device_arg)
    if device.type != "cuda" or device.index is None:
        raise ValueError(f"--device {device_arg!r}: use auto, cpu, cuda or cuda:N")
    if world > 1:
        raise ValueError(f"--device {device_arg}: names one GPU, but torchrun started {world} processes, "
                         "each on its own GPU (cuda:LOCAL_RANK): use --device cuda, and "
                         "CUDA_VISIBLE_DEVICES to choose the GPUs")
    return device


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


def shard(n: int, rank: int, world: int) -> list[int]:
    """The items of ``range(n)`` that rank ``rank`` of ``world`` handles: every world-th one
    from ``rank`` (shard sizes differ by at most one)."""
    return list(range(rank, n, world))


def unshard(shards: list[list[str]]) -> list[str]:
    """Put back in item order the results of ``shard(n, r, world)`` for r = 0..world-1."""
    out: list[str] = []
    for i in range(max((len(s) for s in shards), default=0)):
        out += [s[i] for s in shards if i < len(s)]
    return out


@torch.inference_mode()
def decode_split(model: CaptionModel, dataset: CaptionDataset, beam_size: int, max_len: int,
                 device: torch.device, limit: int | None = None, batch_size: int = 250,
                 rank: int = 0, world: int = 1) -> tuple[list[str], list[list[str]]]:
    """Caption the images of a split without teacher forcing; returns hypotheses, references.

    With ``world > 1`` (DDP) each rank decodes its shard (:func:`shard`) and all ranks get all
    hypotheses (``all_gather_object``): the ranks meet in a collective only once, after about
    1/world of the decoding, instead of ranks 1.. waiting in one for the whole split (past
    NCCL's timeout on a large val set). Every rank returns the same lists.
    """
    model.eval()
    word_map = dataset.word_map
    n = min(limit or len(dataset.images), len(dataset.images))
    mine = shard(n, rank, world)
    hypotheses: list[str] = []
    for start in range(0, len(mine), batch_size):
        inputs = torch.stack([dataset.image_input(i) for i in mine[start:start + batch_size]])
        encoder_out = model.encode(inputs.to(device)).float()  # (b, num_pixels or grid, ..., encoder_dim)
        for h in beam_search(model.decoder, encoder_out, word_map, beam_size, max_len):
            hypotheses.append(" ".join(word_map.decode(h.tokens)))
    if world > 1:
        shards: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(shards, hypotheses)
        hypotheses = unshard(shards)
    return hypotheses, dataset.references[:n]


def val_scores(model: CaptionModel, dataset: CaptionDataset, beam_size: int, max_len: int,
               device: torch.device, limit: int | None = None, rank: int = 0,
               world: int = 1) -> tuple[float, float, list[str]]:
    """Decode the val images (sharded over ``world`` DDP ranks, see :func:`decode_split`);
    returns corpus BLEU-4, CIDEr-D (pycocoevalcap on the Karpathy tokens, no PTB) and the
    captions, the same on every rank."""
    from pycocoevalcap.cider.cider import Cider

    hypotheses, references = decode_split(model, dataset, beam_size, max_len, device, limit,
                                          rank=rank, world=world)
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
