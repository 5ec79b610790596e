"""``framecap export``: a training checkpoint as a small inference model (float16 decoder, no
optimizer state).

``framecap export runs/NAME/best.pt --output model.pt [--name N]``; several checkpoints (e.g.
``epoch8.pt epoch9.pt epoch10.pt``) are averaged weight by weight. ``python -m
cloud.captioning.export`` runs the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.cli import check_checkpoint, error_line

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="framecap export",
        description="Turn a training checkpoint into a small inference model (float16 decoder, no "
        "optimizer state) for 'framecap caption', the worker and the web pages; several "
        "checkpoints are averaged weight by weight first.",
    )
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                   help="one checkpoint of 'framecap train' (e.g. RUN_DIR/best.pt), or several to average")
    p.add_argument("--output", type=Path, required=True, help="model file to write (required)")
    p.add_argument("--name", default=None,
                   help="model name in caption records (default: sat-ENCODER-flickr8k-v1)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="decoding default stored in the model: rank captions by logp / len**a "
                        "(default: %(default)s, off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="decoding default stored in the model: forbid repeating an n-gram of N "
                        "words (default: %(default)s, off)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``framecap export``: 0 when written; 1 when a checkpoint cannot be used (missing, a
    directory, not a checkpoint) or the output cannot be written."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    problems = [p for p in (check_checkpoint(c) for c in args.checkpoints) if p is not None]
    if args.output.is_dir():
        problems.append(f"{args.output}: is a directory; --output names the model file to write")
    if problems:
        for problem in problems:
            print(f"framecap export: {problem}", file=sys.stderr)
        return 1
    from cloud.captioning.checkpoint import CheckpointError, export_model

    try:
        out = export_model(list(args.checkpoints), args.output, args.name, args.length_penalty,
                           args.no_repeat_ngram_size)
    except (OSError, CheckpointError) as err:
        print(f"framecap export: {error_line(err)}", file=sys.stderr)
        return 1
    size_mb = args.output.stat().st_size / 1e6
    print(f"{args.output}: {out['name']}, epoch {out['epoch']}, {size_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
