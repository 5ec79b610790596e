"""The fast captioning path (issue 9): parallel chunks, streaming, threads, channels_last."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.captioning import caption
from cloud.captioning.images import ImageLoadError, load_image
from cloud.captioning.inference import Captioner, CaptionResult, default_threads
from cloud.captioning.testing import make_tiny_checkpoint, tiny_checkpoint

from .conftest import IMAGE_DIR


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Captioner(threads=...) sets torch's threads for the process; give the next tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(karpathy: dict) -> list[Path]:
    return [IMAGE_DIR / i["filename"] for i in karpathy["images"] if i["split"] == "val"][:10]


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_channels_last_encoder_is_bitwise_equal_to_the_default_format(real_images, micro_batch: int) -> None:
    """With threads set the encoder runs in channels_last only because, one thread per op, it changes nothing."""
    captioner = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", threads=1, encode_batch=micro_batch)
    assert captioner.channels_last
    plain = copy.deepcopy(captioner.encoder).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        for start in range(0, len(real_images), micro_batch):
            images = real_images[start:start + micro_batch]
            x = captioner.encoder.preprocess(images)  # (micro_batch, 3, S, S)
            assert torch.equal(captioner.encode(images), plain(x))
    assert not Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu").channels_last  # threads=None


def test_threads_caption_the_same_in_order_with_one_op_thread(real_images) -> None:
    serial = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", batch_size=3)
    expected = serial.caption_images(real_images)
    parallel = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", batch_size=3, threads=3)
    assert torch.get_num_threads() == 1  # parallelism is the chunks, not a team per op
    got = parallel.caption_images(real_images)
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_encoder_runs_in_micro_batches(real_images, monkeypatch) -> None:
    captioner = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", batch_size=8, encode_batch=3)
    sizes: list[int] = []
    forward = captioner.encoder.forward
    monkeypatch.setattr(captioner.encoder, "forward", lambda x: sizes.append(x.size(0)) or forward(x))
    assert len(captioner.caption_images(real_images)) == 8
    assert sizes == [3, 3, 2]


def test_caption_stream_reports_bad_items_in_place_and_reads_lazily(files: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    items = [*files[:3], bad, tmp_path / "missing.jpg", *files[3:]]
    consumed: list[Path] = []

    def lazily() -> Iterator[Path]:
        for item in items:
            consumed.append(item)
            yield item

    captioner = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", threads=2)
    stream = captioner.caption_stream(lazily(), load_image, chunk_size=2, keep_images=True)
    first = next(stream)
    assert first.item == files[0] and first.hypothesis is not None
    assert len(consumed) <= 2 * 3 + 1  # threads + 1 chunks ahead at most (+1 to see a chunk's end)
    results: list[CaptionResult[Path]] = [first, *stream]
    assert [r.item for r in results] == items
    assert isinstance(results[3].error, ImageLoadError) and "bad.jpg" in str(results[3].error)
    assert isinstance(results[4].error, ImageLoadError) and "missing.jpg" in str(results[4].error)
    for r in results[:3] + results[5:]:
        assert r.error is None and r.hypothesis is not None
        assert isinstance(r.image, np.ndarray) and r.image.ndim == 3


def test_caption_images_still_raises_for_an_array_that_is_not_rgb() -> None:
    captioner = Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", threads=2)
    with pytest.raises(ValueError, match="image 1: expected RGB uint8"):
        captioner.caption_images([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)])


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        Captioner.from_checkpoint_dict(tiny_checkpoint(), device="cpu", threads=0)
    assert 1 <= default_threads() <= 4


def test_caption_cli_threads_give_the_same_lines(files: list[Path], tmp_path: Path, capsys) -> None:
    model = make_tiny_checkpoint(tmp_path / "tiny.pt")
    paths = [str(p) for p in files[:5]]
    outputs = []
    for threads in ("1", "2"):
        assert caption.main([*paths, "--model", str(model), "--threads", threads, "--batch-size", "2",
                             "--max-caption-length", "6"]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0] == outputs[1]
    assert [line.split("\t")[0] for line in outputs[0]] == paths
    assert caption.main([*paths, "--model", str(model), "--threads", "0"]) == 1
    assert "--threads" in capsys.readouterr().err


def test_default_model_captions_the_same_with_threads(real_images) -> None:
    from cloud.captioning.inference import DEFAULT_MODEL_PATH

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no committed default model")
    serial = Captioner.load(None, device="cpu").caption_images(real_images)
    parallel = Captioner.load(None, device="cpu", threads=2).caption_images(real_images)
    assert [c for c, _ in parallel] == [c for c, _ in serial]
    assert [s for _, s in parallel] == pytest.approx([s for _, s in serial], abs=1e-4)


def test_worker_config_threads_reach_the_captioner(tmp_path: Path) -> None:
    from cloud.worker import load_captioner
    from common.config import WorkerConfig

    assert WorkerConfig().threads == 1  # one core for the model unless the operator says otherwise
    captioner = load_captioner(WorkerConfig(model=make_tiny_checkpoint(tmp_path / "tiny.pt"), device="cpu", threads=2))
    assert isinstance(captioner, Captioner) and captioner.threads == 2
    assert torch.get_num_threads() == 1
