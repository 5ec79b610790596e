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

import numpy as np
import torch
import torch.nn.functional as F

from cloud.captioning.images import load_image
from cloud.captioning.inference import Captioner, default_threads

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="framecap caption", description="Caption image files.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the committed model)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-caption-length", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="images captioned in parallel, each on one CPU thread "
                        f"(default: the CPUs this process may use, at most 4; here {default_threads()})")
    p.add_argument("--batch-size", type=int, default=32, help="images per beam search (default 32)")
    p.add_argument("--json", action="store_true", help='one JSON line per image: {"image","caption","score"}')
    p.add_argument("--attention-dir", type=Path, default=None, help="write a PNG of each word's attention here")
    return p


def save_attention_png(path: Path, image: np.ndarray, words: list[str], alphas: torch.Tensor, grid: int) -> None:
    """Draw the image once per word (and <end>) with its attention map upsampled over it.

    image: (H, W, 3) uint8; alphas: (len(words) + 1, grid*grid) attention weights.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = image.shape[:2]
    labels = ["<start>", *words, "<end>"][1:] if words else ["<end>"]
    maps = alphas.view(-1, 1, grid, grid).float()  # (words + 1, 1, grid, grid)
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
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    captioner = Captioner.load(args.model, device=args.device, beam_size=args.beam_size,
                               max_caption_length=args.max_caption_length,
                               threads=args.threads or default_threads())
    captioner.batch_size = args.batch_size
    attention = args.attention_dir is not None
    if attention:
        args.attention_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for result in captioner.caption_stream(args.images, load_image, return_alphas=attention, keep_images=attention):
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
            print(f"{path}\t{caption}\t{hyp.score:.3f}", flush=True)
        if attention and hyp.alphas is not None and result.image is not None:
            out = args.attention_dir / f"{path.stem}.png"
            save_attention_png(out, result.image, words, hyp.alphas, captioner.model_args.encoded_image_size)
            logger.info("wrote %s", out)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"framecap caption: {err}", file=sys.stderr)
        return 1
