"""``framecap caption IMAGE...``: caption image files, optionally drawing each word's attention.

``--json`` prints one line per image: {"image", "caption", "score"}. ``--attention-dir DIR``
writes DIR/<image stem>.png: the image once per word with that word's attention map over it
(as the sgrvinod tutorial's ``visualize_att``). A missing file or a non-image is reported on
stderr naming the file; the others are still captioned and the exit code is 1.

Images are read as they are captioned (``--batch-size`` at a time per thread, ``--threads``
threads), so memory does not grow with the number of files, and each line is printed as soon
as its chunk is done, in the order the files were given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import (
    DEVICE_HELP,
    check_checkpoint,
    check_device,
    device_arg,
    error_line,
    format_caption_line,
)

if TYPE_CHECKING:  # torch, numpy and Pillow are imported when a command runs, so --help needs none
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

# as cloud.captioning.inference.INFERENCE_PRECISIONS (a test checks it), without importing torch
# for --help
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16", "int8")
PRECISION_HELP = ("precision of the encoder and decoder: auto (fp16 on CUDA, fp32 on a CPU), "
                  "fp32, bf16 (also on a CPU), fp16 (CUDA only) or int8 (CPU only: the decoder "
                  "quantized to int8, a 2-4x faster beam search) (default: %(default)s)")


def check_precision(precision: str, device: str) -> str | None:
    """Why ``--precision precision`` cannot run on ``--device device`` (fp16 on a CPU, bf16 on
    a GPU without native bfloat16), or None when it can. Imports torch; a command calls it
    after ``check_device`` and exits 2 with the message."""
    from cloud.captioning.inference import inference_precision, resolve_device

    try:
        inference_precision(precision, resolve_device(device))
    except ValueError as err:
        return str(err)
    return None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="framecap caption",
        description="Caption image files: one line per image, IMAGE<TAB>CAPTION<TAB>SCORE (the "
        "caption's log-probability), in the order given. A missing file or a non-image is "
        "reported on stderr; the others are still captioned and the exit status is 1.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", type=Path, default=None,
                   help="model checkpoint, from 'framecap train' or 'framecap export' "
                        "(default: the packaged model)")
    p.add_argument("--beam-size", type=int, default=3, help="beam width (default: %(default)s)")
    p.add_argument("--max-caption-length", type=int, default=30,
                   help="longest caption, words (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="images captioned in parallel, each on one CPU thread "
                        "(default: the CPUs this process may use, at most 4)")
    p.add_argument("--batch-size", type=int, default=32, help="images per beam search (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)
    p.add_argument("--json", action="store_true",
                   help='one JSON line per image: {"image", "caption", "score"} (default: tab-separated)')
    p.add_argument("--attention-dir", type=Path, default=None,
                   help="write DIR/IMAGE_STEM.png: the image once per word with its attention "
                        "(default: none)")
    return p


def save_attention_png(path: Path, image: np.ndarray, words: list[str], alphas: torch.Tensor, grid: int) -> None:
    """Draw the image once per word (and <end>) with its attention map upsampled over it.

    image: (H, W, 3) uint8; alphas: (len(words) + 1, grid*grid) attention weights.
    """
    import matplotlib
    import torch.nn.functional as F

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image.shape[:2]
    labels = ["<start>", *words, "<end>"][1:] if words else ["<end>"]
    maps = alphas.detach().float().cpu().view(-1, 1, grid, grid)  # (words + 1, 1, grid, grid), on the CPU for numpy
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)[:, 0]  # (words + 1, H, W)
    n = len(labels) + 1
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("image", fontsize=10)
    for i, label in enumerate(labels):
        ax = axes.flat[i + 1]
        ax.imshow(image)
        ax.imshow(maps[i].numpy(), alpha=0.6, cmap="Greys_r")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from cloud.captioning.images import load_image
    from cloud.captioning.inference import Captioner, default_threads

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    captioner = Captioner.load(args.model, device=args.device, beam_size=args.beam_size,
                               max_caption_length=args.max_caption_length,
                               threads=args.threads or default_threads(), precision=args.precision)
    captioner.batch_size = args.batch_size
    attention = args.attention_dir is not None
    if attention:
        args.attention_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    images = []
    for path in args.images:
        if path.is_dir():
            print(f"framecap caption: {path}: is a directory, not an image file", file=sys.stderr)
            failed += 1
        else:
            images.append(path)
    for result in captioner.caption_stream(images, load_image, return_alphas=attention, keep_images=attention):
        path, hyp = result.item, result.hypothesis
        if hyp is None:
            print(f"framecap caption: {result.error}", file=sys.stderr)
            failed += 1
            continue
        words = captioner.word_map.decode(hyp.tokens)
        caption = " ".join(words)
        if args.json:
            print(json.dumps({"image": str(path), "caption": caption, "score": round(hyp.score, 4)}), flush=True)
        else:
            print(format_caption_line(str(path), caption, hyp.score), flush=True)
        if attention and hyp.alphas is not None and result.image is not None:
            out = args.attention_dir / f"{path.stem}.png"
            save_attention_png(out, result.image, words, hyp.alphas, captioner.model_args.encoded_image_size)
            logger.info("wrote %s", out)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """``framecap caption``: 0 when every image was captioned, 1 when one was not or the model
    cannot load (missing, a directory, not a checkpoint), 2 on a bad option (a device this
    machine lacks, a precision it cannot run)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_precision(args.precision, args.device)
    if problem is not None:
        parser.exit(2, f"framecap caption: {problem}\n")
    problem = check_checkpoint(args.model) if args.model is not None else None
    if problem is not None:
        print(f"framecap caption: {problem}", file=sys.stderr)
        return 1
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"framecap caption: {error_line(err)}", file=sys.stderr)
        return 1
