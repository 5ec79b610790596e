"""``framecap evaluate`` and ``framecap caption`` on real images with a tiny model."""

from __future__ import annotations

import json

import pytest

from cloud.captioning import caption, evaluate
from cloud.captioning.metrics import METRIC_KEYS
from cloud.captioning.testing import make_tiny_checkpoint

from .conftest import IMAGE_DIR, KARPATHY_JSON


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def test_evaluate_small_subset_returns_all_seven_scores(tiny_model, karpathy, tmp_path, capsys) -> None:
    out = tmp_path / "captions.json"
    rc = evaluate.main(["--model", str(tiny_model), "--karpathy-json", str(KARPATHY_JSON),
                        "--image-dir", str(IMAGE_DIR), "--split", "val", "--beam-size", "2",
                        "--limit", "6", "--max-caption-length", "8", "--json", "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1  # pycocoevalcap's chatter goes to stderr
    scores = json.loads(stdout[0])
    assert set(scores) == set(METRIC_KEYS)
    assert all(0.0 <= v <= 10.0 for v in scores.values())
    captions = json.loads(out.read_text())
    assert len(captions) == 6 and all(c["caption"] for c in captions)


def test_evaluate_unknown_split_fails_cleanly(tiny_model, capsys) -> None:
    rc = evaluate.main(["--model", str(tiny_model), "--karpathy-json", str(KARPATHY_JSON),
                        "--image-dir", str(IMAGE_DIR), "--split", "nosuchsplit"])
    assert rc == 1 and "nosuchsplit" in capsys.readouterr().err


def test_caption_json_attention_and_bad_files(tiny_model, karpathy, tmp_path, capsys) -> None:
    good = IMAGE_DIR / karpathy["images"][0]["filename"]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    rc = caption.main([str(good), str(tmp_path / "missing.jpg"), str(text), "--model", str(tiny_model),
                       "--json", "--beam-size", "2", "--max-caption-length", "5",
                       "--attention-dir", str(tmp_path / "att")])
    captured = capsys.readouterr()
    assert rc == 1
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert len(lines) == 1 and lines[0]["image"] == str(good)
    assert set(lines[0]) == {"image", "caption", "score"}
    assert "missing.jpg" in captured.err and "notes.jpg" in captured.err
    assert (tmp_path / "att" / f"{good.stem}.png").stat().st_size > 1000


def test_caption_missing_model_fails_cleanly(tmp_path, karpathy, capsys) -> None:
    good = IMAGE_DIR / karpathy["images"][0]["filename"]
    assert caption.main([str(good), "--model", str(tmp_path / "none.pt")]) == 1
    assert "none.pt" in capsys.readouterr().err
