"""``framecap train``: the fp16 gradient scaler survives a resume; validation under torchrun is
sharded over the ranks and scores exactly what one process scores (issue 8, item 17)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloud.captioning import train
from cloud.captioning.checkpoint import build_models, read_checkpoint, save_checkpoint
from cloud.captioning.data import CaptionDataset
from cloud.captioning.train_utils import CaptionModel, val_scores

from .test_train import REPO, TINY, data_dir  # noqa: F401 - data_dir is a fixture


def test_fp16_gradient_scaler_state_is_saved_and_restored_on_resume(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "20", "--max-steps", "2",
              "--no-val", "--precision", "fp16", *TINY]
    assert train.main([*common, "--epochs", "1"]) == 0
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["scaler"]["scale"] > 0 and ckpt["args"]["precision"] == "fp16"
    ckpt["scaler"] = {**ckpt["scaler"], "scale": 1024.0}  # as if the run had backed off to 2**10
    save_checkpoint(run / "last.pt", {k: v for k, v in ckpt.items() if k != "format_version"})
    assert train.main([*common, "--epochs", "2"]) == 0
    log = (run / "train.log").read_text()
    assert "gradient scaler resumed at scale 1024" in log
    assert read_checkpoint(run / "last.pt")["scaler"]["scale"] <= 1024.0  # went on from there, not 2**16


def test_fp32_checkpoints_carry_no_scaler(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    assert train.main(["--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "20", "--epochs", "1",
                       "--max-steps", "1", "--no-val", *TINY]) == 0  # auto on a CPU: fp32
    assert "scaler" not in read_checkpoint(run / "last.pt")
    assert "precision fp32" in (run / "train.log").read_text()


def test_cuda_n_under_torchrun_exits_2_with_the_reason(data_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811, ANN001
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "check_device", lambda device: None)  # as on a machine with 2 GPUs
    with pytest.raises(SystemExit) as info:
        train.main(["--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"), "--device", "cuda:1"])
    assert info.value.code == 2


@pytest.mark.slow
def test_torchrun_validation_is_sharded_and_scores_what_one_process_scores(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Both ranks decode half of the val images and gather the captions: the BLEU-4 and CIDEr
    logged equal those of one process decoding all of them with the same weights."""
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "common.cli",
           "train", "--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "10", "--epochs", "1",
           "--max-steps", "3", "--val-beam-size", "3", "--no-resume", *TINY]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    ckpt = read_checkpoint(run / "last.pt")
    _, decoder, _ = build_models(ckpt, "last.pt", pretrained_encoder=False)
    model = CaptionModel(None, decoder.eval())
    val = CaptionDataset(data_dir, "val", True, None)
    bleu, cider, _ = val_scores(model, val, 3, 30, torch.device("cpu"))
    assert float(rows[-1]["val_bleu4"]) == round(bleu, 4) and float(rows[-1]["val_cider"]) == round(cider, 4)
    assert bleu > 0 or cider > 0  # something was decoded and scored
