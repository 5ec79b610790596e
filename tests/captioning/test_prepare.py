"""``framecap data prepare`` on real Flickr8k images, and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cloud.captioning.prepare import main
from cloud.captioning.vocab import SPECIAL_TOKENS, WordMap

from .conftest import IMAGE_DIR


def run_prepare(json_path, image_dir, out, *extra) -> int:
    return main(["prepare", "--karpathy-json", str(json_path), "--image-dir", str(image_dir),
                 "--output-dir", str(out), *extra])


def test_prepare_writes_word_map_captions_and_features(small_karpathy_json, tmp_path) -> None:
    out = tmp_path / "prep"
    assert run_prepare(small_karpathy_json, IMAGE_DIR, out, "--min-word-freq", "2",
                       "--captions-per-image", "3", "--cache-features") == 0
    word_map = WordMap.load(out / "word_map.json")
    assert all(t in word_map.word_to_index for t in SPECIAL_TOKENS)
    train = json.loads((out / "train.json").read_text())
    assert len(train["images"]) == 24 and all(len(c) == 3 for c in train["captions"])
    assert all(c[0] == word_map.start and c[-1] == word_map.end for caps in train["captions"] for c in caps)
    assert len(train["references"][0]) == 5
    features = np.load(out / "val_features.npy")
    assert features.shape == (8, 49, 1280) and features.dtype == np.float16
    assert np.isfinite(features).all() and features.astype(np.float32).std() > 0


def test_missing_images_stop_early_with_count(small_karpathy_json, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    data = json.loads(small_karpathy_json.read_text())
    for entry in data["images"][2:]:
        shutil.copy(IMAGE_DIR / entry["filename"], images / entry["filename"])
    assert run_prepare(small_karpathy_json, images, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "2 of 32 images missing" in err and data["images"][0]["filename"] in err
    assert not (tmp_path / "out" / "word_map.json").exists()


def test_unreadable_image_is_named(small_karpathy_json, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(IMAGE_DIR, images, ignore=lambda d, names: [n for n in names if n not in {
        e["filename"] for e in json.loads(small_karpathy_json.read_text())["images"]}])
    bad = json.loads(small_karpathy_json.read_text())["images"][5]["filename"]
    (images / bad).write_bytes(b"\xff\xd8 truncated")
    assert run_prepare(small_karpathy_json, images, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "1 unreadable" in err and bad in err


@pytest.mark.parametrize("content", ["{not json", json.dumps({"images": [{"filename": "x.jpg"}]})])
def test_malformed_json(tmp_path, capsys, content) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert run_prepare(path, IMAGE_DIR, tmp_path / "out") == 1
    assert "bad.json" in capsys.readouterr().err
