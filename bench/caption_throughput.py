"""Captioning throughput on this machine's CPUs: framecap against a per-image loop (issue 9).

Every ratio is against a baseline run in the same process, on the same images and model, and the
captions of both must be identical (the default decoding: the checkpoint's length penalty and
n-gram ban):

* ``e2e``: jpg -> caption. Baseline: a per-image loop written here (load, resize, encode at
  batch 1, a one-image beam search of its own), run with torch's intra-op threads at each of
  ``--baseline-threads``; the best of them is the baseline. framecap: ``Captioner.caption_stream``
  with ``threads=--threads``, the code path of ``framecap caption``.
* ``process``: the whole ``framecap caption --json`` process on the same files (model load
  included), its wall time and peak RSS.
* ``decoder``: beam search only, on features encoded once: the one-image search above, image by
  image, against ``beam_search`` at each of ``--decoder-batches`` images per batch, on one
  intra-op thread as the Captioner runs it.

With int8 (unless ``--no-int8``) framecap also runs with its decoder quantized to int8
(``--precision int8``) against the same float32 baselines: its captions are not identical (the
bench counts how many are), its val BLEU-4 and CIDEr are in docs/performance.md.

Prints one JSON line per measurement and a last line with the targets (>= 3x). It asserts
nothing; ``make bench-caption`` runs it.

    .venv/bin/python bench/caption_throughput.py --images DIR --count 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud.captioning.beam_search import beam_search  # noqa: E402
from cloud.captioning.checkpoint import build_models, read_checkpoint  # noqa: E402
from cloud.captioning.images import load_image  # noqa: E402
from cloud.captioning.inference import DEFAULT_MODEL_PATH, Captioner, quantize_decoder  # noqa: E402
from cloud.captioning.models import DecoderWithAttention, Encoder  # noqa: E402
from cloud.captioning.vocab import WordMap  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "flickr8k" / "images"


@torch.inference_mode()
def one_image_beam_search(decoder: DecoderWithAttention, encoder_out: torch.Tensor, word_map: WordMap,
                          beam_size: int, max_len: int, length_penalty: float,
                          no_repeat_ngram_size: int) -> tuple[list[int], float]:
    """Beam search of one image as the sgrvinod tutorial's ``caption_image_beam_search`` does it.

    The hypotheses still live are the rows; each step extends them by every word, keeps the best
    ``beam_size - completed`` candidates, and those ending in <end> are complete. Same rules as
    ``cloud.captioning.beam_search`` (banned <pad>/<start>/<unk>, n-gram ban, <end> forced after
    ``max_len`` words, best complete caption by score / (words + 1) ** length_penalty).

    Returns:
        (word indices without <start>/<end>, summed log-probability).
    """
    vocab_size = decoder.args.vocab_size
    banned = [word_map.pad, word_map.start, word_map.unk]
    state = decoder.init_state(encoder_out)  # (1, ...): one live hypothesis at first
    seqs = [[word_map.start]]
    scores = torch.zeros(1)  # (rows,)
    complete: list[tuple[list[int], float]] = []
    for step in range(1, max_len + 2):
        wanted = beam_size - len(complete)
        embedded = decoder.embedding(torch.tensor([s[-1] for s in seqs]))  # (rows, embed_dim)
        state, _ = decoder.step(embedded, state)
        logp = F.log_softmax(decoder.fc(state.h), dim=1)  # (rows, vocab_size)
        logp[:, banned] = float("-inf")
        n = no_repeat_ngram_size
        for row, seq in enumerate(seqs):
            words = seq[1:]
            if n < 1 or len(words) < n - 1:
                continue
            prefix = words[len(words) - n + 1:] if n > 1 else []
            for i in range(len(words) - n + 1):
                if words[i:i + n - 1] == prefix:
                    logp[row, words[i + n - 1]] = float("-inf")
        if step == max_len + 1:
            end = logp[:, word_map.end].clone()
            logp.fill_(float("-inf"))
            logp[:, word_map.end] = end
        top_scores, top_index = (scores[:, None] + logp).view(-1).topk(wanted)  # (wanted,)
        rows, keep_scores, new_seqs = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist(), strict=True):
            if score == float("-inf"):
                continue
            row, word = divmod(index, vocab_size)
            if word == word_map.end:
                complete.append((seqs[row][1:], score))
            else:
                rows.append(row)
                keep_scores.append(score)
                new_seqs.append([*seqs[row], word])
        if len(complete) == beam_size or not rows:
            break
        state = state.select(torch.tensor(rows))
        seqs, scores = new_seqs, torch.tensor(keep_scores)

    def rank(hyp: tuple[list[int], float]) -> float:
        return hyp[1] / float(len(hyp[0]) + 1) ** length_penalty if length_penalty > 0 else hyp[1]

    return max(complete, key=rank)


class PerImageCaptioner:
    """The baseline: load, resize, encode at batch 1, one-image beam search, image by image."""

    def __init__(self, model: Path, beam_size: int, max_len: int) -> None:
        ckpt = read_checkpoint(model)
        encoder, decoder, word_map = build_models(ckpt, str(model))
        self.encoder: Encoder = encoder.eval()
        self.decoder: DecoderWithAttention = decoder.eval()
        self.word_map = word_map
        self.beam_size, self.max_len = beam_size, max_len
        self.length_penalty = float(ckpt.get("length_penalty", 0.0))
        self.no_repeat_ngram_size = int(ckpt.get("no_repeat_ngram_size", 0))

    @torch.inference_mode()
    def decode(self, encoder_out: torch.Tensor) -> tuple[list[int], float]:
        return one_image_beam_search(self.decoder, encoder_out, self.word_map, self.beam_size, self.max_len,
                                     self.length_penalty, self.no_repeat_ngram_size)

    @torch.inference_mode()
    def caption(self, path: Path) -> str:
        x = self.encoder.preprocess([load_image(path)])  # (1, 3, S, S)
        tokens, _ = self.decode(self.encoder(x))
        return " ".join(self.word_map.decode(tokens))


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn; its result and wall seconds, CPU seconds (user, sys) and minor page faults."""
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return out, {"wall_s": round(wall, 3), "user_s": round(after.ru_utime - before.ru_utime, 2),
                 "sys_s": round(after.ru_stime - before.ru_stime, 2),
                 "minor_faults": after.ru_minflt - before.ru_minflt}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def bench_e2e(args: argparse.Namespace, files: list[Path], baseline: PerImageCaptioner,
              captioner: Captioner, int8: Captioner | None = None) -> tuple[float, bool, list[str], float | None]:
    """Rounds of baseline (each thread setting) then framecap (then framecap with the int8
    decoder); returns framecap's best ratio, whether its captions are the baseline's, its
    captions, and the int8 ratio (None without it)."""
    rates: dict[str, list[float]] = {}
    captions: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for threads in args.baseline_threads:
            torch.set_num_threads(threads)
            out, stats = timed(lambda: [baseline.caption(p) for p in files])
            name = f"per-image loop, {threads} intra-op thread(s)"
            captions[name] = out
            rates.setdefault(name, []).append(len(files) / stats["wall_s"])
            emit({"bench": "e2e", "run": name, "images": len(files),
                  "captions_per_s": round(len(files) / stats["wall_s"], 2), **stats})
        torch.set_num_threads(1)  # as Captioner(threads=...) sets it

        runs = [(f"framecap, threads={args.threads}", captioner)]
        if int8 is not None:
            runs.append((f"framecap int8, threads={args.threads}", int8))
        for name, model in runs:
            def run_framecap(model: Captioner = model) -> list[str]:
                return [" ".join(model.word_map.decode(r.hypothesis.tokens)) if r.hypothesis else ""
                        for r in model.caption_stream(files, load_image)]

            out, stats = timed(run_framecap)
            captions[name] = out
            rates.setdefault(name, []).append(len(files) / stats["wall_s"])
            emit({"bench": "e2e", "run": name, "images": len(files),
                  "captions_per_s": round(len(files) / stats["wall_s"], 2), **stats})
    fast_name = f"framecap, threads={args.threads}"
    int8_name = f"framecap int8, threads={args.threads}"
    best_base = max((n for n in rates if n not in (fast_name, int8_name)), key=lambda n: max(rates[n]))
    ratio = max(rates[fast_name]) / max(rates[best_base])
    identical = all(c == captions[fast_name] for n, c in captions.items() if n != int8_name)
    differing = sum(a != b for a, b in zip(captions[best_base], captions[fast_name], strict=True))
    emit({"bench": "e2e", "result": "ratio", "framecap_per_s": round(max(rates[fast_name]), 2),
          "baseline": best_base, "baseline_per_s": round(max(rates[best_base]), 2),
          "ratio": round(ratio, 2), "captions_identical": identical, "captions_differing": differing})
    int8_ratio = None
    if int8 is not None:
        int8_ratio = max(rates[int8_name]) / max(rates[best_base])
        emit({"bench": "e2e", "result": "ratio, int8 decoder", "framecap_per_s": round(max(rates[int8_name]), 2),
              "baseline": best_base, "baseline_per_s": round(max(rates[best_base]), 2),
              "ratio": round(int8_ratio, 2), "captions_same_as_baseline": sum(
                  a == b for a, b in zip(captions[best_base], captions[int8_name], strict=True))})
    return ratio, identical, captions[fast_name], int8_ratio


def bench_process(args: argparse.Namespace, files: list[Path], expected: list[str]) -> None:
    """The whole ``framecap caption --json`` process: wall time, captions/s, peak RSS."""
    cmd = [sys.executable, "-m", "common.cli", "caption", "--json", "--threads", str(args.threads),
           "--beam-size", str(args.beam_size), "--max-caption-length", str(args.max_caption_length),
           "--model", str(args.model), *map(str, files)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    got = [json.loads(line)["caption"] for line in proc.stdout.splitlines() if line.startswith("{")]
    emit({"bench": "process", "run": f"framecap caption --threads {args.threads}", "images": len(files),
          "exit_code": proc.returncode, "wall_s": round(wall, 2), "captions_per_s": round(len(files) / wall, 2),
          "peak_rss_mb": round(peak_mb), "captions_identical": got == expected})


def bench_decoder(args: argparse.Namespace, files: list[Path], baseline: PerImageCaptioner,
                  captioner: Captioner) -> list[tuple[str, int, float, bool]]:
    """Beam search only: one image at a time against batches; features encoded once."""
    torch.set_num_threads(1)
    features = torch.cat([captioner.encode([load_image(p)]) for p in files])  # (n, grid, grid, encoder_dim)
    count = min(args.decoder_baseline_count, len(files))
    base_rate, base_tokens, base_name = 0.0, [], ""
    for threads in args.baseline_threads:
        torch.set_num_threads(threads)
        tokens, stats = timed(lambda: [baseline.decode(features[i:i + 1])[0] for i in range(count)])
        rate = count / stats["wall_s"]
        emit({"bench": "decoder", "run": f"one image at a time, {threads} intra-op thread(s)", "images": count,
              "images_per_s": round(rate, 2), **stats})
        if rate > base_rate:
            base_rate, base_tokens, base_name = rate, tokens, f"one image at a time, {threads} thread(s)"
    torch.set_num_threads(1)
    results = []
    decoders = [("fp32", captioner.decoder)]
    if args.int8:
        decoders.append(("int8", quantize_decoder(captioner.decoder)))
    for precision, decoder in decoders:
        for batch in args.decoder_batches:
            def run(batch: int = batch, decoder: torch.nn.Module = decoder) -> list[list[int]]:
                out = []
                for start in range(0, len(features), batch):
                    out += [h.tokens for h in beam_search(decoder, features[start:start + batch],
                                                          captioner.word_map, args.beam_size,
                                                          args.max_caption_length, captioner.length_penalty,
                                                          no_repeat_ngram_size=captioner.no_repeat_ngram_size)]
                return out
            tokens, stats = timed(run)
            rate = len(features) / stats["wall_s"]
            same = sum(a == b for a, b in zip(tokens[:count], base_tokens, strict=True))
            results.append((precision, batch, rate / base_rate, same == count))
            emit({"bench": "decoder", "run": f"batched beam_search, {precision}, batch {batch}, 1 thread",
                  "images": len(features), "images_per_s": round(rate, 2), "baseline": base_name,
                  "ratio": round(rate / base_rate, 2), "captions_identical": same == count,
                  "captions_same_as_baseline": f"{same}/{count}", **stats})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                   help="a folder of JPEG files (default: the Flickr8k images beside the repository)")
    p.add_argument("--count", type=int, default=200, help="images for the jpg -> caption runs")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="checkpoint (default: the packaged model)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-caption-length", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="framecap's --threads (the cores to compare on)")
    p.add_argument("--baseline-threads", type=int, nargs="+", default=[1, 2],
                   help="torch intra-op threads of the per-image loop; the fastest is the baseline")
    p.add_argument("--rounds", type=int, default=1, help="alternate baseline and framecap this many times")
    p.add_argument("--decoder-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip the runs with the decoder quantized to int8 (--precision int8)")
    p.add_argument("--decoder-baseline-count", type=int, default=64, help="images for the one-at-a-time decoder")
    p.add_argument("--skip-process", action="store_true", help="do not run the framecap caption process")
    p.add_argument("--skip-decoder", action="store_true", help="do not run the decoder-only comparison")
    args = p.parse_args(argv)
    files = sorted(args.images.glob("*.jpg"))
    if len(files) < args.count:
        print(f"caption_throughput: need {args.count} .jpg files in {args.images}, found {len(files)}", file=sys.stderr)
        return 2
    emit({"bench": "setup", "cpus": len(os.sched_getaffinity(0)), "load_avg_1m": round(os.getloadavg()[0], 2),
          "torch": torch.__version__, "images": args.count, "beam_size": args.beam_size, "threads": args.threads})
    baseline = PerImageCaptioner(args.model, args.beam_size, args.max_caption_length)
    captioner = Captioner.load(args.model, device="cpu", beam_size=args.beam_size,
                               max_caption_length=args.max_caption_length, threads=args.threads)
    for threads in args.baseline_threads:  # warm both paths up
        torch.set_num_threads(threads)
        [baseline.caption(f) for f in files[:2]]
    torch.set_num_threads(1)
    list(captioner.caption_stream(files[:8], load_image))
    int8 = None
    if args.int8:
        int8 = Captioner.load(args.model, device="cpu", beam_size=args.beam_size,
                              max_caption_length=args.max_caption_length, threads=args.threads, precision="int8")
        list(int8.caption_stream(files[:8], load_image))
    e2e_ratio, identical, captions, int8_ratio = bench_e2e(args, files[:args.count], baseline, captioner, int8)
    if not args.skip_process:
        bench_process(args, files[:args.count], captions)
    targets: dict[str, Any] = {"bench": "targets", "e2e_ratio": round(e2e_ratio, 2),
                               "e2e_at_least_3x": e2e_ratio >= 3.0, "e2e_captions_identical": identical}
    if int8_ratio is not None:
        targets["e2e_int8_ratio"] = round(int8_ratio, 2)
    if not args.skip_decoder:
        decoder = bench_decoder(args, files[:max(args.decoder_batches)], baseline, captioner)
        for precision in ("fp32", "int8"):
            rows = [(b, r, same) for p, b, r, same in decoder if p == precision]
            if not rows:
                continue
            targets[f"decoder_{precision}_ratios"] = {str(b): round(r, 2) for b, r, _ in rows}
            targets[f"decoder_{precision}_at_least_3x_every_batch"] = all(r >= 3.0 for _, r, _ in rows)
        targets["decoder_fp32_at_least_3x_from_batch_8"] = all(
            r >= 3.0 for p, b, r, _ in decoder if p == "fp32" and b >= 8)
        targets["decoder_fp32_captions_identical"] = all(same for p, _, _, same in decoder if p == "fp32")
    targets["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    emit(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
