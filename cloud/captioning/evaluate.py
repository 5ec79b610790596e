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

from cloud.captioning.images import ImageLoadError, load_image
from cloud.captioning.inference import Captioner
from cloud.captioning.metrics import METRIC_KEYS, coco_scores
from cloud.captioning.prepare import DatasetError, check_images, read_karpathy

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="framecap evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the committed model)")
    p.add_argument("--karpathy-json", type=Path, required=True)
    p.add_argument("--image-dir", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-caption-length", type=int, default=30)
    p.add_argument("--length-penalty", type=float, default=None,
                   help="rank finished captions by logp / len**a (0: off; default: the model's own)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="forbid repeating an n-gram of N words (0: off; default: the model's own)")
    p.add_argument("--limit", type=int, default=None, help="first N images of the split")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.add_argument("--output", type=Path, default=None, help="write the captions as JSON here")
    return p


def caption_split(captioner: Captioner, filenames: list[str], image_dir: Path, batch_size: int) -> list[str]:
    from tqdm import tqdm

    captions: list[str] = []
    for start in tqdm(range(0, len(filenames), batch_size), desc="captioning", unit="batch", disable=None):
        images = [load_image(image_dir / f) for f in filenames[start:start + batch_size]]
        captions += [c for c, _ in captioner.caption_images(images)]
    return captions


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Caption ``args.split`` and return the seven scores (plus the captions in ``--output``)."""
    images = [i for i in read_karpathy(args.karpathy_json) if i.split == args.split][: args.limit]
    if not images:
        raise DatasetError(f"{args.karpathy_json}: no images in split {args.split!r}")
    check_images(images, args.image_dir, decode=False)
    captioner = Captioner.load(args.model, device=args.device, beam_size=args.beam_size,
                               max_caption_length=args.max_caption_length)
    if args.length_penalty is not None:
        captioner.length_penalty = args.length_penalty
    if args.no_repeat_ngram_size is not None:
        captioner.no_repeat_ngram_size = args.no_repeat_ngram_size
    captioner.batch_size = args.batch_size
    t0 = time.time()
    hypotheses = caption_split(captioner, [i.filename for i in images], args.image_dir, args.batch_size)
    logger.info("captioned %d images in %.1fs (beam %d)", len(images), time.time() - t0, args.beam_size)
    references = [[" ".join(c) for c in i.captions] for i in images]
    scores = coco_scores(references, hypotheses)
    if args.output:
        args.output.write_text(json.dumps(
            [{"image": i.filename, "caption": h, "references": r}
             for i, h, r in zip(images, hypotheses, references, strict=True)], indent=1))
    return scores


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        scores = evaluate(args)
    except (FileNotFoundError, ValueError, ImageLoadError, RuntimeError) as err:
        print(f"framecap evaluate: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: round(scores[k], 4) for k in METRIC_KEYS}))
    else:
        for key in METRIC_KEYS:
            print(f"{key:8s} {scores[key]:.4f}")
    return 0
