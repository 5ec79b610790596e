"""Export a training checkpoint as a small inference model (float16 decoder, no optimizer).

``python -m cloud.captioning.export runs/NAME/best.pt --output cloud/models/default.pt [--name N]``;
several checkpoints (e.g. ``epoch8.pt epoch9.pt epoch10.pt``) are averaged weight by weight.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cloud.captioning.checkpoint import CheckpointError, export_model

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m cloud.captioning.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="one checkpoint, or several to average")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--name", default=None, help="model name in caption records (default: sat-ENCODER-flickr8k-v1; the committed model is -v2)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="decoding default stored in the model: rank captions by logp / len**a")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="decoding default stored in the model: forbid repeating an n-gram of N words (0: off)")
    args = p.parse_args(argv)
    try:
        out = export_model(list(args.checkpoints), args.output, args.name, args.length_penalty,
                           args.no_repeat_ngram_size)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 1
    size_mb = args.output.stat().st_size / 1e6
    print(f"{args.output}: {out['name']}, epoch {out['epoch']}, {size_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
