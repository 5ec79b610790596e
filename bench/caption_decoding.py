"""Decoding variants of a trained captioner on cached val features: beam size x length penalty.

Scores BLEU-4 and CIDEr (pycocoevalcap on the Karpathy tokens, no PTB/METEOR, so it is fast)
and the time per image of the batched beam search. It measures; it asserts nothing.

    .venv/bin/python bench/caption_decoding.py --checkpoint runs/sat-lite0-v1/best.pt \
        --data-dir data/flickr8k-lite0 --beams 1 3 5 --length-penalties 0 0.5 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cloud.captioning.beam_search import beam_search
from cloud.captioning.checkpoint import build_models, read_checkpoint
from cloud.captioning.data import CaptionDataset
from cloud.captioning.metrics import bleu4


def cider(references: list[list[str]], hypotheses: list[str]) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: r for i, r in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--length-penalties", type=float, nargs="+", default=[0.0])
    p.add_argument("--max-len", type=int, default=30)
    p.add_argument("--no-repeat-ngram-sizes", type=int, nargs="+", default=[0])
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    _, decoder, word_map = build_models(read_checkpoint(args.checkpoint), pretrained_encoder=False)
    decoder.eval()
    data = CaptionDataset(args.data_dir, args.split, use_features=True, limit_images=args.limit)
    features = data.features.float()  # (n, num_pixels, encoder_dim)
    baseline_ms = None  # the first variant, measured in this run, is the baseline of the ratios
    variants = [(b, lp, nr) for b in args.beams for lp in args.length_penalties for nr in args.no_repeat_ngram_sizes]
    for beam, lp, nr in variants:
        t0 = time.time()
        hyps = []
        for start in range(0, len(features), 200):
            hyps += beam_search(decoder, features[start:start + 200], word_map, beam, args.max_len, lp,
                                no_repeat_ngram_size=nr)
        seconds = time.time() - t0
        captions = [" ".join(word_map.decode(h.tokens)) for h in hyps]
        mean_len = sum(len(c.split()) for c in captions) / len(captions)
        ms = 1000 * seconds / len(captions)
        baseline_ms = baseline_ms or ms
        print(json.dumps({"beam": beam, "length_penalty": lp, "no_repeat_ngram_size": nr,
                          "bleu4": round(bleu4(data.references, captions), 4),
                          "cider": round(cider(data.references, captions), 4), "mean_words": round(mean_len, 2),
                          "ms_per_image": round(ms, 2),
                          "time_ratio_vs_first": round(ms / baseline_ms, 2)}), flush=True)

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
