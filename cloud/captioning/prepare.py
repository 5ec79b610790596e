"""``framecap data prepare``: word map, encoded captions and an optional encoder feature cache.

Reads a Karpathy-format JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json;
``restval`` counts as ``train``) and its image folder, as the tutorial's
``create_input_files`` does. Everything is validated (JSON structure, every image present and
decodable) before any long work. Writes into the output folder:

* ``word_map.json``: word -> index (min_word_freq over the train captions);
* ``{split}.json``: ``images`` (file names), ``captions`` (captions_per_image encoded captions
  per image, ``<start> .. <end>`` without padding) and ``references`` (all tokenised captions);
* ``meta.json``: the options used;
* with ``--cache-features``: ``{split}_features.npy``, float16 (num_images, num_pixels,
  encoder_dim) grid features of the frozen encoder, in the order of ``{split}.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.captioning.vocab import WordMap
from common.cli import check_file, error_line

logger = logging.getLogger(__name__)
SPLIT_ALIASES = {"restval": "train"}


class DatasetError(ValueError):
    """The Karpathy JSON or its images are unusable; the message says which file and why."""


@dataclass
class KarpathyImage:
    filename: str
    split: str
    captions: list[list[str]]


def read_karpathy(json_path: Path) -> list[KarpathyImage]:
    """Parse a Karpathy-format JSON; raises DatasetError naming the file on any malformation."""
    try:
        data = json.loads(Path(json_path).read_text())
    except FileNotFoundError as err:
        raise DatasetError(f"{json_path}: no such file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path}: expected an object with an 'images' list (Karpathy format)")
    images, bad = [], []
    for i, entry in enumerate(data["images"]):
        try:
            filename = entry.get("filepath", "") and f"{entry['filepath']}/{entry['filename']}" or entry["filename"]
            captions = [list(map(str, s["tokens"])) for s in entry["sentences"]]
            split = SPLIT_ALIASES.get(entry["split"], entry["split"])
        except (KeyError, TypeError, AttributeError) as err:
            bad.append(f"image #{i}: missing {err}")
            continue
        if not captions:
            bad.append(f"image #{i} ({filename}): no sentences")
            continue
        images.append(KarpathyImage(filename, split, captions))
    if bad:
        raise DatasetError(f"{json_path}: {len(bad)} malformed image entries, first: {bad[:3]}")
    return images


def check_images(images: list[KarpathyImage], image_dir: Path, decode: bool = True) -> None:
    """Raise DatasetError naming the first bad file and how many are missing or unreadable."""
    from tqdm import tqdm

    from cloud.captioning.images import ImageLoadError, load_image

    missing, unreadable = [], []
    for image in tqdm(images, desc="checking images", unit="img", disable=None):
        path = image_dir / image.filename
        if not path.is_file():
            missing.append(path)
        elif decode:
            try:
                load_image(path)
            except ImageLoadError:
                unreadable.append(path)
    if missing or unreadable:
        first = (missing or unreadable)[0]
        raise DatasetError(
            f"{len(missing)} of {len(images)} images missing and {len(unreadable)} unreadable "
            f"under {image_dir}; first: {first}")


def encode_split(images: list[KarpathyImage], word_map: WordMap, captions_per_image: int,
                 max_len: int, seed: int = 0) -> dict[str, list]:
    """Encoded captions (sampled with replacement when an image has fewer) and references."""
    rng = random.Random(seed)
    captions, references = [], []
    for image in images:
        caps = image.captions
        chosen = (rng.sample(caps, captions_per_image) if len(caps) >= captions_per_image
                  else caps + [rng.choice(caps) for _ in range(captions_per_image - len(caps))])
        captions.append([word_map.encode(c, max_len) for c in chosen])
        references.append([" ".join(c) for c in caps])
    return {"images": [i.filename for i in images], "captions": captions, "references": references}


def cache_features(filenames: list[str], image_dir: Path, out_path: Path, encoder_name: str,
                   encoded_image_size: int, batch_size: int = 16) -> None:
    """Run the frozen encoder over every image; write float16 (N, num_pixels, encoder_dim) .npy."""
    import torch
    from tqdm import tqdm

    from cloud.captioning.images import load_image
    from cloud.captioning.models import Encoder

    encoder = Encoder(encoder_name, encoded_image_size).eval()
    num_pixels = encoded_image_size**2
    tmp_path = out_path.with_suffix(".partial.npy")
    cache = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16,
                                      shape=(len(filenames), num_pixels, encoder.encoder_dim))
    with torch.inference_mode():
        for start in tqdm(range(0, len(filenames), batch_size), desc=f"features {out_path.name}",
                          unit="batch", disable=None):
            names = filenames[start:start + batch_size]
            x = encoder.preprocess([load_image(image_dir / n) for n in names])  # (b, 3, S, S)
            feats = encoder(x).reshape(len(names), num_pixels, -1)  # (b, num_pixels, encoder_dim)
            cache[start:start + len(names)] = feats.numpy().astype(np.float16)
    cache.flush()
    del cache
    tmp_path.replace(out_path)


DESCRIPTION = ("Turn a Karpathy-format dataset (its JSON and image folder) into what "
               "'framecap train' reads: a word map, encoded captions per split and, with "
               "--cache-features, the frozen encoder's features of every image.")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``framecap data prepare`` parser."""
    p = argparse.ArgumentParser(prog="framecap data prepare", description=DESCRIPTION)
    add_prepare_arguments(p)
    return p


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``framecap data prepare``."""
    p.add_argument("--karpathy-json", type=Path, required=True,
                   help="Karpathy-format dataset JSON: dataset_coco.json, dataset_flickr8k.json or "
                        "dataset_flickr30k.json (required)")
    p.add_argument("--image-dir", type=Path, required=True, help="folder of its images (required)")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="where word_map.json, SPLIT.json, meta.json and the feature caches go (required; created)")
    p.add_argument("--min-word-freq", type=int, default=5,
                   help="words seen fewer times in the train captions become <unk> (default: %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=5,
                   help="captions encoded per image (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=50, help="longest caption kept, words (default: %(default)s)")
    p.add_argument("--encoder", default="efficientnet_lite0",
                   help="encoder of the feature cache (default: %(default)s)")
    p.add_argument("--encoded-image-size", type=int, default=7,
                   help="feature grid side: SIZE x SIZE positions (default: %(default)s)")
    p.add_argument("--cache-features", action="store_true",
                   help="also cache the frozen encoder's features (float16) for fast training (default: off)")
    p.add_argument("--splits", nargs="+", default=None, help="splits to write (default: all in the JSON)")
    p.add_argument("--limit", type=int, default=None, help="first N images per split (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the caption sampling (default: %(default)s)")


def get_data_parser() -> argparse.ArgumentParser:
    """The ``framecap data`` parser: its one subcommand, ``prepare``."""
    p = argparse.ArgumentParser(prog="framecap data", description="Datasets for training.")
    sub = p.add_subparsers(dest="action", required=True, metavar="prepare")
    add_prepare_arguments(sub.add_parser("prepare", help=DESCRIPTION, description=DESCRIPTION))
    return p


def prepare(args: argparse.Namespace) -> None:
    images = read_karpathy(args.karpathy_json)
    splits = args.splits or sorted({i.split for i in images})
    by_split = {s: [i for i in images if i.split == s][: args.limit] for s in splits}
    if not by_split.get("train"):
        raise DatasetError(f"{args.karpathy_json}: no 'train' (or 'restval') images to build a word map")
    selected = [i for s in splits for i in by_split[s]]
    check_images(selected, args.image_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    word_map = WordMap.build((c for i in by_split["train"] for c in i.captions), args.min_word_freq)
    word_map.save(args.output_dir / "word_map.json")
    for split in splits:
        encoded = encode_split(by_split[split], word_map, args.captions_per_image, args.max_len, args.seed)
        (args.output_dir / f"{split}.json").write_text(json.dumps(encoded))
        logger.info("%s: %d images, %d captions", split, len(by_split[split]),
                    len(by_split[split]) * args.captions_per_image)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta.update(splits=splits, vocab_size=len(word_map), features=bool(args.cache_features))
    (args.output_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    if args.cache_features:
        for split in splits:
            cache_features(encoded_names(args.output_dir, split), args.image_dir,
                           args.output_dir / f"{split}_features.npy", args.encoder, args.encoded_image_size)


def encoded_names(output_dir: Path, split: str) -> list[str]:
    return json.loads((output_dir / f"{split}.json").read_text())["images"]


def main(argv: list[str]) -> int:
    """``framecap data prepare``: 0 when done, 1 when the dataset cannot be used, 2 on bad options."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_data_parser().parse_args(argv)
    problem = check_file(args.karpathy_json, "Karpathy JSON file")
    if problem is None and not args.image_dir.is_dir():
        problem = f"{args.image_dir}: {'not a directory' if args.image_dir.exists() else 'no such directory'} (--image-dir)"
    if problem is None and args.output_dir.exists() and not args.output_dir.is_dir():
        problem = f"{args.output_dir}: not a directory (--output-dir)"
    if problem is not None:
        print(f"framecap data prepare: {problem}", file=sys.stderr)
        return 1
    try:
        prepare(args)
    except (DatasetError, OSError) as err:
        print(f"framecap data prepare: {error_line(err)}", file=sys.stderr)
        return 1
    return 0
