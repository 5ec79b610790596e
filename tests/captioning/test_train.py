"""``framecap train`` on a small real subset: one process, resume, and torchrun DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloud.captioning import prepare, train
from cloud.captioning.checkpoint import read_checkpoint
from cloud.captioning.models import DecoderWithAttention, ModelArgs

from .conftest import IMAGE_DIR

REPO = Path(__file__).resolve().parents[2]
TINY = ["--encoder-proj-dim", "32", "--attention-dim", "32", "--embed-dim", "32", "--decoder-dim", "32"]


@pytest.fixture(scope="module")
def data_dir(small_karpathy_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep")
    assert prepare.main(["prepare", "--karpathy-json", str(small_karpathy_json), "--image-dir",
                         str(IMAGE_DIR), "--output-dir", str(out), "--min-word-freq", "1",
                         "--cache-features"]) == 0
    return out


def test_train_writes_checkpoints_metrics_and_resumes(data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "20", *TINY]
    assert train.main([*common, "--epochs", "2"]) == 0
    assert {"last.pt", "best.pt", "metrics.csv", "metrics.png", "train.log"} <= {p.name for p in run.iterdir()}
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["model_args"]["decoder_dim"] == 32
    assert train.main([*common, "--epochs", "3"]) == 0  # resumes from last.pt
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["loss"]) < float(rows[0]["loss"])
    assert "resuming" in (run / "train.log").read_text()


def _train_steps(data_dir: Path, run: Path, batch: int, nproc: int) -> dict:
    args = ["--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", str(batch), "--epochs", "1",
            "--max-steps", "3", "--no-val", "--dropout", "0", "--feature-dropout", "0", "--no-resume", *TINY]
    if nproc == 1:
        cmd = [sys.executable, "-m", "common.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "common.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_checkpoint(run / "last.pt")["decoder"]


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process(data_dir, tmp_path) -> None:
    one = _train_steps(data_dir, tmp_path / "one", batch=20, nproc=1)
    two = _train_steps(data_dir, tmp_path / "two", batch=10, nproc=2)  # same global batch of 20
    assert "x 2 processes" in (tmp_path / "two" / "train.log").read_text()
    torch.manual_seed(42)  # the trainer's seed: the same initial weights
    fresh = DecoderWithAttention(ModelArgs.from_dict(read_checkpoint(tmp_path / "one" / "last.pt")["model_args"]))
    assert not torch.allclose(one["fc.weight"], fresh.fc.weight)  # the steps did train
    for name, weight in one.items():
        if name == "attention.full_att.bias":
            # softmax ignores a shift of all scores, so this bias's true gradient is 0: what
            # it gets is float noise, and Adam turns noise of either sign into a full step.
            continue
        assert torch.allclose(weight, two[name], atol=1e-5, rtol=1e-4), name
