"""``framecap train``: train a Show, Attend and Tell captioner (Xu et al. 2015).

Teacher forcing; cross-entropy (optional label smoothing) plus doubly stochastic attention
regularisation ``alpha_c * ((1 - sum_t alpha_t)**2)``; gradient clipping; Adam; learning-rate
decay when the val BLEU-4 stalls (and optionally every N epochs); early stopping on the val
BLEU-4 of real decoding (beam search without teacher forcing, not the tutorial's
teacher-forced BLEU). A checkpoint every epoch (``last.pt``) and the best (``best.pt``), both
loadable with ``torch.load(weights_only=True)``; ``--resume``. Several processes with
``torchrun`` (DDP; gloo on CPU, nccl on GPU); ``torch.amp`` on GPU. Writes ``train.log``,
``metrics.csv`` and ``metrics.png`` in the run folder. Layout after torchvision's
``references/classification/train.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cloud.captioning.checkpoint import read_checkpoint, save_checkpoint
from cloud.captioning.data import BucketBatchSampler, CaptionDataset, collate_captions
from cloud.captioning.models import DecoderWithAttention, Encoder, ModelArgs
from cloud.captioning.scst import END_WORD, CiderD, scst_batches, train_one_epoch_scst
from cloud.captioning.train_utils import (
    FP32,
    PRECISIONS,
    CaptionModel,
    Precision,
    choose_precision,
    enable_tf32,
    plot_metrics,
    train_device,
    val_scores,
    write_metrics_csv,
)
from common.cli import DEVICE_HELP, check_checkpoint, check_device, device_arg, error_line

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="framecap train",
        description="Train a Show, Attend and Tell captioner (Xu et al. 2015) on the output of "
        "'framecap data prepare'. Checkpoints (last.pt every epoch, best.pt), train.log, "
        "metrics.csv and metrics.png go to the run folder; a run resumes from RUN_DIR/last.pt. "
        "Several processes: launch with torchrun.",
    )
    p.add_argument("--data-dir", type=Path, required=True, help="output of 'framecap data prepare' (required)")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, log, metrics (required; created)")
    p.add_argument("--epochs", type=int, default=30, help="most epochs (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop after the epoch that passes this (default: %(default)s, no limit)")
    p.add_argument("--batch-size", type=int, default=80, help="captions per process and step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=4e-4, help="decoder learning rate, Adam (default: %(default)s)")
    p.add_argument("--encoder-lr", type=float, default=1e-4,
                   help="encoder learning rate when fine-tuning it (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm (default: %(default)s)")
    p.add_argument("--alpha-c", type=float, default=1.0,
                   help="weight of the doubly stochastic attention loss (default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing (default: %(default)s)")
    p.add_argument("--lr-patience", type=int, default=2,
                   help="epochs without val BLEU-4 gain before decay (default: %(default)s)")
    p.add_argument("--lr-decay", type=float, default=0.5, help="factor applied on a plateau (default: %(default)s)")
    p.add_argument("--lr-step-every", type=int, default=0,
                   help="also decay every N epochs (default: %(default)s, off)")
    p.add_argument("--lr-step-factor", type=float, default=0.8,
                   help="factor of --lr-step-every (default: %(default)s)")
    p.add_argument("--patience", type=int, default=6,
                   help="early stop after N epochs without gain (default: %(default)s)")
    p.add_argument("--val-beam-size", type=int, default=1,
                   help="beam for the val BLEU-4 (default: %(default)s, greedy)")
    p.add_argument("--val-limit", type=int, default=None, help="decode only the first N val images (default: all)")
    p.add_argument("--group-by-image", action=argparse.BooleanOptionalAction, default=True,
                   help="batch all captions of an image together, features projected once per image "
                        "(default: on)")
    p.add_argument("--max-caption-length", type=int, default=30,
                   help="longest caption decoded for val, words (default: %(default)s)")
    p.add_argument("--limit-images", type=int, default=None, help="first N train images (default: all)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop each epoch after N steps (default: %(default)s, no limit)")
    p.add_argument("--no-val", action="store_true", help="skip val decoding (default: decode val every epoch)")
    for name, default, what in (
            ("encoder", "efficientnet_lite0", "image encoder"),
            ("encoded-image-size", 7, "feature grid side"),
            ("fine-tune-from", -1, "fine-tune encoder blocks from this index (-1: frozen)"),
            ("encoder-proj-dim", 512, "encoder projection width"),
            ("attention-dim", 512, "attention width"),
            ("embed-dim", 512, "word embedding width"),
            ("decoder-dim", 512, "LSTM width"),
            ("dropout", 0.5, "decoder dropout"),
            ("feature-dropout", 0.5, "dropout on the encoder features")):
        p.add_argument(f"--{name}", type=type(default), default=default,
                       help=f"model architecture: {what} (default: %(default)s)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's or exported model's decoder weights and model args "
                        "(e.g. a cross-entropy model before --scst); the architecture options are ignored "
                        "(default: none)")
    p.add_argument("--scst", action="store_true",
                   help="self-critical sequence training with a CIDEr-D reward (Rennie et al. 2017) "
                        "instead of cross-entropy; needs cached features and usually --init-from (default: off)")
    p.add_argument("--scst-samples", type=int, default=5,
                   help="captions sampled per image, SCST (default: %(default)s)")
    p.add_argument("--scst-max-len", type=int, default=20,
                   help="most sampled words per caption, SCST (default: %(default)s)")
    p.add_argument("--scst-bleu-weight", type=float, default=0.0,
                   help="SCST reward = CIDEr-D + this x sentence BLEU-4 (default: %(default)s, CIDEr-D only)")
    p.add_argument("--scst-sample-dropout", action="store_true",
                   help="keep dropout on while sampling (SCST; default: off, sample the test-time policy)")
    p.add_argument("--resume", type=Path, default=None,
                   help="checkpoint to resume (default: RUN_DIR/last.pt if present)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if RUN_DIR/last.pt exists")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers when reading images (default: %(default)s, in the main process)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision: auto (bf16 on a GPU that has it, else fp16 with a gradient "
                        "scaler; fp32 on the CPU), fp32, bf16 or fp16 (default: %(default)s); TF32 "
                        "matmuls are on for a GPU's fp32 work")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (default: %(default)s, torch's default); "
                        "1 is steadier on a busy CPU")
    return p


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """Init DDP when launched by torchrun (gloo on CPU, nccl on GPU); returns rank, world, device.

    Raises:
        ValueError: ``--device cuda:N`` under torchrun (see :func:`train_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = train_device(device_arg, local_rank, world, torch.cuda.is_available())
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer, scaler,
                    args: argparse.Namespace, epoch: int, world: int, device: torch.device,
                    rank: int, precision: Precision = FP32) -> dict[str, float]:
    """One pass over the train captions; returns mean token loss and top-5 accuracy.

    The forward pass runs under ``precision``'s autocast; ``scaler`` scales the loss (enabled
    for fp16 only)."""
    from tqdm import tqdm

    model.train()
    totals = [0.0, 0.0, 0.0]  # summed token loss, top-5 hits, tokens
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=rank != 0 or None, mininterval=5)
    for step, (inputs, captions, lengths, *rest) in enumerate(bar):
        if args.max_steps and step >= args.max_steps:
            break
        inputs, captions, lengths = inputs.to(device), captions.to(device), lengths.to(device)
        image_index = rest[0].to(device) if rest else None
        with precision.autocast(device):
            scores, alphas, decode_lengths = model(inputs, captions, lengths, image_index)  # (b, T, V), (b, T, P), (b,)
        scores = scores.float()
        targets = captions[:, 1: scores.size(1) + 1]  # (b, T)
        mask = torch.arange(scores.size(1), device=device)[None] < decode_lengths[:, None]  # (b, T)
        n_tokens, n_captions = all_reduce_sum([float(mask.sum()), float(len(lengths))], device, world)
        token_loss = F.cross_entropy(scores[mask], targets[mask], reduction="sum",
                                     label_smoothing=args.label_smoothing)
        att_reg = ((1.0 - alphas.float().sum(dim=1)) ** 2).mean(dim=1).sum()  # summed over captions
        loss = world * (token_loss / n_tokens + args.alpha_c * att_reg / n_captions)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            top5 = scores[mask].topk(5, dim=1).indices.eq(targets[mask][:, None]).any(dim=1).sum()
            plain = F.cross_entropy(scores[mask], targets[mask], reduction="sum")
        totals = [totals[0] + float(plain), totals[1] + float(top5), totals[2] + float(mask.sum())]
        if rank == 0 and step % 50 == 0:
            bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.3f}", top5=f"{totals[1] / max(totals[2], 1):.3f}")
    loss_sum, hits, tokens = all_reduce_sum(totals, device, world)
    return {"loss": loss_sum / max(tokens, 1), "top5": hits / max(tokens, 1)}


def feature_batches(dataset: CaptionDataset, sampler: BucketBatchSampler):
    """Batches straight from the in-memory feature cache (faster than a DataLoader here)."""
    for indices in sampler:
        index = torch.tensor(indices)
        lengths = dataset.lengths[index]  # (b,)
        captions = dataset.captions[index][:, : int(lengths.max())]  # (b, L)
        images, image_index = torch.div(index, dataset.cpi, rounding_mode="floor").unique(return_inverse=True)
        assert dataset.features is not None
        yield dataset.features[images], captions, lengths, image_index  # features (n_images, P, E)


def build_model(args: argparse.Namespace, vocab_size: int, use_features: bool,
                init: dict | None = None) -> CaptionModel:
    """The model of the CLI's architecture options, or of ``init``'s model_args and decoder
    weights (a checkpoint dict from ``--init-from``)."""
    if init is not None:
        model_args = ModelArgs.from_dict(dict(init["model_args"]))
        if model_args.vocab_size != vocab_size:
            raise ValueError(f"--init-from model has vocab_size {model_args.vocab_size}, the data {vocab_size}")
        args.fine_tune_from = model_args.fine_tune_from
        decoder = DecoderWithAttention(model_args)
        decoder.load_state_dict({k: v.float() for k, v in init["decoder"].items()})
        encoder = None if use_features else Encoder(model_args.encoder, model_args.encoded_image_size,
                                                     model_args.fine_tune_from)
        if encoder is not None and init.get("encoder"):
            encoder.backbone.load_state_dict({k: v.float() for k, v in init["encoder"].items()})
        return CaptionModel(encoder, decoder)
    model_args = ModelArgs(vocab_size=vocab_size, encoder=args.encoder,
                           encoded_image_size=args.encoded_image_size, fine_tune_from=args.fine_tune_from,
                           encoder_proj_dim=args.encoder_proj_dim, attention_dim=args.attention_dim,
                           embed_dim=args.embed_dim, decoder_dim=args.decoder_dim, dropout=args.dropout,
                           feature_dropout=args.feature_dropout)
    encoder = None if use_features else Encoder(args.encoder, args.encoded_image_size, args.fine_tune_from)
    return CaptionModel(encoder, DecoderWithAttention(model_args))


def make_optimizer(model: CaptionModel, args: argparse.Namespace) -> torch.optim.Optimizer:
    groups = [{"params": list(model.decoder.parameters()), "lr": args.lr}]
    if model.encoder is not None and args.fine_tune_from >= 0:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": args.encoder_lr})
    return torch.optim.Adam(groups, weight_decay=args.weight_decay)


def setup_logging(run_dir: Path, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def input_problem(args: argparse.Namespace) -> str | None:
    """Why the files named on the command line cannot be used (missing, a directory where a
    file is expected, not a checkpoint), or None."""
    if not args.data_dir.is_dir():
        return (f"{args.data_dir}: {'not a directory' if args.data_dir.exists() else 'no such directory'}"
                " (--data-dir: the output folder of 'framecap data prepare')")
    if args.run_dir.exists() and not args.run_dir.is_dir():
        return f"{args.run_dir}: not a directory (--run-dir)"
    for option, path in (("--resume", args.resume), ("--init-from", args.init_from)):
        problem = check_checkpoint(path) if path is not None else None
        if problem is not None:
            return f"{problem} ({option})"
    return None


def main(argv: list[str]) -> int:
    """``framecap train``: 0 when done; 1 when the data or a checkpoint cannot be used; 2 on a bad
    option (a device this machine lacks)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    problem = check_device(args.device)
    if problem is not None:
        parser.exit(2, f"framecap train: {problem}\n")
    problem = input_problem(args)
    if problem is not None:
        print(f"framecap train: {problem}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rank, world, device = setup_distributed(args.device)
    except ValueError as err:
        parser.exit(2, f"framecap train: {err}\n")
    setup_logging(args.run_dir, rank)
    try:
        fit(args, rank, world, device)
    except (FileNotFoundError, ValueError) as err:
        logger.error("framecap train: %s", error_line(err))
        return 1
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def load_resume(args: argparse.Namespace) -> dict | None:
    path = args.resume or (None if args.no_resume else args.run_dir / "last.pt")
    if path is None or (args.resume is None and not Path(path).is_file()):
        return None
    logger.info("resuming from %s", path)
    return read_checkpoint(path)


def fit(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """The whole training run: data, model, epochs, val decoding, checkpoints, metrics."""
    torch.manual_seed(args.seed)
    use_features = args.fine_tune_from < 0 and (args.data_dir / "train_features.npy").is_file()
    preprocess = None if use_features else Encoder(args.encoder, args.encoded_image_size, pretrained=False).preprocess
    train_ds = CaptionDataset(args.data_dir, "train", use_features, preprocess, args.limit_images)
    val_ds = None if args.no_val else CaptionDataset(args.data_dir, "val", use_features, preprocess, args.val_limit)
    word_map = train_ds.word_map
    init = None
    if args.init_from is not None:
        init = read_checkpoint(args.init_from)
        if init["word_map"] != word_map.to_dict():
            raise ValueError(f"{args.init_from}: its word map differs from {args.data_dir}/word_map.json")
        logger.info("starting from the weights of %s", args.init_from)
    if args.scst and not use_features:
        raise ValueError("--scst needs cached features ('framecap data prepare --cache-features') and a frozen encoder")
    model = build_model(args, len(word_map), use_features, init).to(device)
    optimizer = make_optimizer(model, args)
    state: dict[str, Any] = {"epoch": 0, "best_bleu4": -1.0, "since_best": 0, "metrics": []}
    ckpt = load_resume(args)
    if ckpt is not None:
        model.decoder.load_state_dict(ckpt["decoder"])
        if ckpt.get("encoder") and model.encoder is not None:
            model.encoder.backbone.load_state_dict(ckpt["encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
    torch.manual_seed(args.seed + 1000 * rank + state["epoch"])  # dropout differs per rank and epoch
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    precision = choose_precision(args.precision, device)
    tf32 = enable_tf32(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    if ckpt is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])  # the loss scale it had learnt, not 2**16 again
        logger.info("gradient scaler resumed at scale %g", scaler.get_scale())
    logger.info("precision %s%s%s", precision.name, " with a gradient scaler" if scaler.is_enabled() else "",
                "; TF32 matmuls" if tf32 else "")
    sampler = BucketBatchSampler(train_ds.lengths, args.batch_size, world, rank, args.seed,
                                 captions_per_image=train_ds.cpi if args.group_by_image else 1)
    loader = None
    if not use_features:
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate_captions,
                                             num_workers=args.workers)
    logger.info("train: %d captions, %d steps/epoch x %d processes; vocab %d; device %s; features cached: %s%s",
                len(train_ds), len(sampler), world, len(word_map), device, use_features,
                f"; SCST, {args.scst_samples} samples per image" if args.scst else "")
    cider = None
    if args.scst:
        cider = CiderD([[f"{r} {END_WORD}" for r in refs] for refs in train_ds.references])
    started = time.time()
    for epoch in range(state["epoch"], args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        if cider is not None:
            stats = train_one_epoch_scst(model, scst_batches(train_ds, sampler), optimizer, cider, word_map,
                                         args.scst_samples, args.scst_max_len, args.grad_clip, epoch, rank,
                                         world, args.max_steps, args.scst_sample_dropout,
                                         args.scst_bleu_weight, train_ds.references)
            stats["top5"] = float("nan")
        else:
            batches = loader if loader is not None else feature_batches(train_ds, sampler)
            stats = train_one_epoch(ddp_model, batches, optimizer, scaler, args, epoch, world, device, rank,
                                    precision)
        bleu, cider_val, samples = -1.0, -1.0, list[str]()
        if val_ds is not None:  # each rank decodes its shard; all get the same scores
            bleu, cider_val, samples = val_scores(model, val_ds, args.val_beam_size, args.max_caption_length,
                                                  device, rank=rank, world=world)
        improved = bleu > state["best_bleu4"]
        state["since_best"] = 0 if improved else state["since_best"] + 1
        state["best_bleu4"] = max(bleu, state["best_bleu4"])
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "loss": round(stats["loss"], 4), "top5": round(stats["top5"], 4),
               "val_bleu4": round(bleu, 4), "val_cider": round(cider_val, 4), "lr": lr, "epoch_s": round(time.time() - t0, 1)}
        if "reward" in stats:
            row["reward"] = round(stats["reward"], 4)
        state["metrics"].append(row)
        state["epoch"] = epoch + 1
        what = (f"SCST loss {stats['loss']:.4f} mean sample reward {stats['reward']:.4f}" if "reward" in stats
                else f"loss {stats['loss']:.4f} top-5 {stats['top5']:.4f}")
        logger.info("epoch %d: %s val BLEU-4 %.4f CIDEr %.4f lr %.2e time %.0fs%s", epoch + 1,
                    what, bleu, cider_val, lr, row["epoch_s"], " (best)" if improved else "")
        decay_lr(optimizer, args, state, epoch + 1)
        if rank == 0:
            save_run(args, model, optimizer, state, word_map, improved, samples, scaler)
        if state["since_best"] >= args.patience:
            logger.info("early stop: val BLEU-4 has not improved for %d epochs", args.patience)
            break
        if args.max_minutes and time.time() - started > args.max_minutes * 60:
            logger.info("stopping: time budget of %.0f minutes used", args.max_minutes)
            break


def decay_lr(optimizer: torch.optim.Optimizer, args: argparse.Namespace, state: dict, epochs_done: int) -> None:
    factor = 1.0
    if state["since_best"] > 0 and state["since_best"] % args.lr_patience == 0:
        factor *= args.lr_decay
    if args.lr_step_every and epochs_done % args.lr_step_every == 0:
        factor *= args.lr_step_factor
    if factor != 1.0:
        for group in optimizer.param_groups:
            group["lr"] *= factor
        logger.info("learning rate x%.2f -> %.2e", factor, optimizer.param_groups[0]["lr"])


def save_run(args: argparse.Namespace, model: CaptionModel, optimizer: torch.optim.Optimizer,
             state: dict, word_map, improved: bool, samples: list[str],
             scaler: torch.amp.GradScaler | None = None) -> None:
    """last.pt every epoch, best.pt when val BLEU-4 improved, metrics.csv and metrics.png.

    The checkpoint holds the gradient scaler's state (fp16) so that a resumed run keeps the
    loss scale it had learnt."""
    payload = {
        "decoder": model.decoder.state_dict(),
        "model_args": model.decoder.args.to_dict(),
        "word_map": word_map.to_dict(),
        "optimizer": optimizer.state_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **state,
    }
    if model.encoder is not None and args.fine_tune_from >= 0:
        payload["encoder"] = model.encoder.backbone.state_dict()
    if scaler is not None and scaler.is_enabled():
        payload["scaler"] = scaler.state_dict()
    save_checkpoint(args.run_dir / "last.pt", payload)
    if improved:
        save_checkpoint(args.run_dir / "best.pt", payload)
    write_metrics_csv(args.run_dir / "metrics.csv", state["metrics"])
    plot_metrics(args.run_dir / "metrics.png", state["metrics"])
    for i, caption in enumerate(samples[:3]):
        logger.info("  val sample %d: %s", i, caption)
