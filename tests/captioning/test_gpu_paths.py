"""GPU code paths checked on the CPU (issue 8, item 17): what a CUDA run needs, without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloud.captioning.caption import save_attention_png


class OnGpu(torch.Tensor):
    """A CPU tensor that behaves as a CUDA one where it matters here: ``numpy()`` refuses
    (as torch does for a cuda tensor) until ``cpu()`` returns a plain tensor."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. "
                            "Use Tensor.cpu() to copy the tensor to host memory first.")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_stand_in_refuses_numpy_like_a_cuda_tensor() -> None:
    alphas = torch.rand(3, 4).as_subclass(OnGpu)
    with pytest.raises(TypeError, match="cuda"):
        (alphas * 2).numpy()
    assert isinstance((alphas * 2).cpu().numpy(), np.ndarray)


def test_attention_png_from_alphas_on_a_gpu(tmp_path: Path) -> None:
    """``caption --attention-dir`` on CUDA: the beam search's alphas live on the GPU."""
    alphas = torch.softmax(torch.rand(3, 49), dim=1).as_subclass(OnGpu)  # 2 words + <end>
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    save_attention_png(tmp_path / "a.png", image, ["a", "dog"], alphas, 7)
    assert (tmp_path / "a.png").stat().st_size > 0


# -- training precision, TF32, device --------------------------------------------------------


@pytest.mark.parametrize(("requested", "device", "bf16", "expected"), [
    ("auto", "cuda:0", True, ("bf16", torch.bfloat16, False)),  # Ampere and later
    ("auto", "cuda:0", False, ("fp16", torch.float16, True)),  # older GPUs: fp16 + GradScaler
    ("auto", "cpu", True, ("fp32", None, False)),
    ("fp32", "cuda:0", True, ("fp32", None, False)),
    ("bf16", "cpu", False, ("bf16", torch.bfloat16, False)),
    ("fp16", "cuda:0", True, ("fp16", torch.float16, True)),
])
def test_precision_follows_bf16_support(requested: str, device: str, bf16: bool, expected: tuple) -> None:
    from cloud.captioning.train_utils import choose_precision

    asked: list[bool] = []

    def bf16_supported() -> bool:
        asked.append(True)
        return bf16

    precision = choose_precision(requested, torch.device(device), bf16_supported)
    assert (precision.name, precision.dtype, precision.scaler) == expected
    assert not asked or device.startswith("cuda")  # a CPU never asks CUDA


def test_bf16_asked_on_a_gpu_without_it_is_refused() -> None:
    from cloud.captioning.train_utils import choose_precision

    with pytest.raises(ValueError, match="bf16.*fp16"):
        choose_precision("bf16", torch.device("cuda:0"), lambda: False)


def test_bf16_support_does_not_count_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud.captioning import train_utils

    calls: list[dict] = []

    def is_bf16_supported(**kw: bool) -> bool:
        calls.append(kw)
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert train_utils.cuda_bf16_supported() is False
    assert calls == [{"including_emulation": False}]


def test_autocast_runs_the_forward_in_the_chosen_dtype() -> None:
    from cloud.captioning.train_utils import BF16, FP32

    layer = torch.nn.Linear(4, 3)
    with BF16.autocast(torch.device("cpu")):
        assert layer(torch.rand(2, 4)).dtype == torch.bfloat16
    with FP32.autocast(torch.device("cpu")):
        assert layer(torch.rand(2, 4)).dtype == torch.float32


def test_tf32_is_enabled_for_a_gpu_only() -> None:
    from cloud.captioning.train_utils import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert enable_tf32(torch.device("cpu")) is False
        assert torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32(torch.device("cuda:0")) is True
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(("arg", "local_rank", "world", "cuda", "expected"), [
    ("cuda:1", 0, 1, True, "cuda:1"),  # --device cuda:1 is honoured
    ("cuda", 1, 2, True, "cuda:1"),  # torchrun: one GPU per process
    ("cuda", 0, 1, True, "cuda:0"),
    ("auto", 1, 2, True, "cuda:1"),
    ("auto", 0, 1, False, "cpu"),
    ("cpu", 1, 2, True, "cpu"),
])
def test_train_device(arg: str, local_rank: int, world: int, cuda: bool, expected: str) -> None:
    from cloud.captioning.train_utils import train_device

    assert train_device(arg, local_rank, world, cuda) == torch.device(expected)


def test_one_gpu_named_for_several_processes_is_refused() -> None:
    from cloud.captioning.train_utils import train_device

    with pytest.raises(ValueError, match="--device cuda.*CUDA_VISIBLE_DEVICES"):
        train_device("cuda:1", 0, 2, True)


@pytest.mark.parametrize(("n", "world"), [(0, 2), (1, 2), (7, 2), (8, 3), (10, 4), (5, 1)])
def test_val_shards_cover_every_image_once_and_unshard_in_order(n: int, world: int) -> None:
    from cloud.captioning.train_utils import shard, unshard

    shards = [shard(n, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced: no rank waits long
    assert unshard([[f"caption {i}" for i in s] for s in shards]) == [f"caption {i}" for i in range(n)]
