"""``framecap evaluate``: caption a Karpathy split and score it with pycocoevalcap.

Scores BLEU-1..4, METEOR, ROUGE-L and CIDEr (PTBTokenizer on both references and captions,
as the COCO caption evaluation; ruotianluo's ``eval_utils.language_eval``). With ``--json``
prints one JSON object whose keys are pycocoevalcap's: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.captioning.caption import PRECISION_CHOICES, PRECISION_HELP, check_precision
from cloud.captioning.metrics import METRIC_KEYS
from common.cli import (
    DEVICE_HELP,
    check_checkpoint,
    check_device,
    check_file,
    device_arg,
    error_line,
)

if TYPE_CHECKING:  # torch and Pillow are imported when the command runs, so --help needs neither
    from cloud.captioning.inference import Captioner

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="framecap evaluate",
        description="Caption a split of a Karpathy-format dataset and score the captions against "
        "its references: BLEU-1..4, METEOR, ROUGE-L and CIDEr (the COCO caption evaluation).",
    )
    p.add_argument("--model", type=Path, default=None,
                   help="model checkpoint (default: the packaged model)")
    p.add_argument("--karpathy-json", type=Path, required=True,
                   help="Karpathy-format dataset JSON, e.g. dataset_flickr8k.json (required)")
    p.add_argument("--image-dir", type=Path, required=True, help="folder of its images (required)")
    p.add_argument("--split", default="val", help="split to caption: train, val or test (default: %(default)s)")
    p.add_argument("--beam-size", type=int, default=3, help="beam width (default: %(default)s)")
    p.add_argument("--max-caption-length", type=int, default=30,
                   help="longest caption, words (default: %(default)s)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="rank finished captions by logp / len**a (0: off; default: the model's own)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="forbid repeating an n-gram of N words (0: off; default: the model's own)")
    p.add_argument("--limit", type=int, default=None, help="caption only the first N images of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)
    p.add_argument("--json", action="store_true",
                   help="print the scores as one JSON object (default: one score per line)")
    p.add_argument("--output", type=Path, default=None,
                   help="also write each image's caption and references as JSON here (default: none)")
    return p


def caption_split(captioner: Captioner, filenames: list[str], image_dir: Path, batch_size: int) -> list[str]:
    from tqdm import tqdm

    from cloud.captioning.images import load_image

    captions: list[str] = []
    for start in tqdm(range(0, len(filenames), batch_size), desc="captioning", unit="batch", disable=None):
        images = [load_image(image_dir / f) for f in filenames[start:start + batch_size]]
        captions += [c for c, _ in captioner.caption_images(images)]
    return captions


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Caption ``args.split`` and return the seven scores (plus the captions in ``--output``)."""
    from cloud.captioning.inference import Captioner
    from cloud.captioning.metrics import coco_scores
    from cloud.captioning.prepare import DatasetError, check_images, read_karpathy

    images = [i for i in read_karpathy(args.karpathy_json) if i.split == args.split][: args.limit]
    if not images:
        raise DatasetError(f"{args.karpathy_json}: no images in split {args.split!r}")
    check_images(images, args.image_dir, decode=False)
    captioner = Captioner.load(args.model, device=args.device, beam_size=args.beam_size,
                               max_caption_length=args.max_caption_length, precision=args.precision)
    if args.length_penalty is not None:
        captioner.length_penalty = args.length_penalty
    if args.no_repeat_ngram_size is not None:
        captioner.no_repeat_ngram_size = args.no_repeat_ngram_size
    captioner.batch_size = args.batch_size
    t0 = time.time()
    hypotheses = caption_split(captioner, [i.filename for i in images], args.image_dir, args.batch_size)
    logger.info("captioned %d images in %.1fs (beam %d, precision %s)", len(images), time.time() - t0,
                args.beam_size, captioner.precision.name)
    references = [[" ".join(c) for c in i.captions] for i in images]
    scores = coco_scores(references, hypotheses)
    if args.output:
        args.output.write_text(json.dumps(
            [{"image": i.filename, "caption": h, "references": r}
             for i, h, r in zip(images, hypotheses, references, strict=True)], indent=1))
    return scores


def main(argv: list[str]) -> int:
    """``framecap evaluate``: 0 with the scores printed; 1 when the dataset, its images or the
    model cannot be used (missing, a directory, not what is expected); 2 on a bad option (a
    device this machine lacks, a precision it cannot run)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    problem = check_device(args.device) or check_precision(args.precision, args.device)
    if problem is not None:
        parser.exit(2, f"framecap evaluate: {problem}\n")
    problem = check_file(args.karpathy_json, "Karpathy JSON file")
    if problem is None and not args.image_dir.is_dir():
        problem = f"{args.image_dir}: {'not a directory' if args.image_dir.exists() else 'no such directory'} (--image-dir)"
    if problem is None and args.model is not None:
        problem = check_checkpoint(args.model)
    if problem is not None:
        print(f"framecap evaluate: {problem}", file=sys.stderr)
        return 1
    try:
        scores = evaluate(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # ImageLoadError, DatasetError are ValueErrors
        print(f"framecap evaluate: {error_line(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: round(scores[k], 4) for k in METRIC_KEYS}))
    else:
        for key in METRIC_KEYS:
            print(f"{key:8s} {scores[key]:.4f}")
    return 0
