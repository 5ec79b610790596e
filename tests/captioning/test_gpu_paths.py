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
