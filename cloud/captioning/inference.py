"""The captioning interface the caption worker uses: ``Captioner.load(...).caption_images(...)``.

A ``Captioner`` holds a frozen encoder, a decoder and its word map, rebuilt from a checkpoint
(``cloud/models/default.pt`` unless told otherwise), and captions RGB uint8 images of any size
with the batched beam search (Xu et al. 2015; sgrvinod's tutorial ``caption.py``).

How it is fast on a CPU (docs/performance.md has the measurements):

* The encoder runs in micro-batches of ``encode_batch`` (4) images while the beam search
  decodes ``batch_size`` (32) at once. A batch of 32 through the encoder has activations of
  tens of MB that glibc maps fresh from the kernel (and unmaps) at every layer, about 1.3 M
  minor page faults per 64 images, which made batch 32 half as fast as batch 1; micro-batches
  stay under glibc's mmap threshold, so their memory is reused.
* When ``threads`` is set on a CPU, glibc's malloc is told (``mallopt``, once per process) to keep
  freed memory for reuse: one arena for all threads, allocations up to 32 MB from the heap and
  up to 1 GB of freed heap kept. Per-thread arenas otherwise create and unmap 64 MB heaps as the
  encoder's activations come and go: about 0.5 M page faults and 1.2 s of system time per 200
  images on 2 threads, gone with these settings (the issue measured the same with
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16G``; a user need not export anything). The
  resident memory stays near the peak of a batch instead of shrinking between batches.
* With ``threads`` set on a CPU the encoder runs in channels_last memory format (about 25%
  faster with EfficientNet-Lite). With one thread per op its outputs are bitwise equal to the
  default format's (``tests/captioning/test_throughput.py`` checks it on real images); with a
  team of threads per op they are not (differences of 4e-5, as between thread counts).
* ``threads`` (``framecap caption --threads``, ``WorkerConfig.threads``) is how many images are
  captioned in parallel: chunks of images go through load, encoder and beam search on that many
  Python threads, each torch op on one thread (torch's intra-op threads are set to 1). Torch's
  default (one OpenMP team of all cores per op) spins at a barrier after every op and collapsed
  7-30x on a busy 2-core machine; independent single-threaded chunks slow down only in
  proportion to the CPU they get. ``threads=None`` leaves torch's threads alone and captions on
  the calling thread (the web server's one-image attention requests).

Precision (``precision``; ``framecap caption --precision``, ``framecap evaluate --precision``):
``auto`` is float32 on a CPU (the captions of the default decoding are bitwise those of the
float32 model) and, on CUDA, bfloat16 autocast on a GPU that computes in bfloat16 natively
(Ampere and later), else float16 autocast: the choice of ``framecap train --precision``
(``train_utils.choose_precision``). Autocast covers the encoder and the decoder's steps; the
beam search adds its log-probabilities in float32. ``bf16`` may be asked on a CPU as well
(docs/performance.md gives its BLEU-4 and CIDEr against float32); ``fp16`` on a CPU is refused.
``int8`` (CPU only) is no autocast: the decoder is quantized to int8 (``quantize_decoder``), a
beam search 2-4x faster whose val BLEU-4 and CIDEr are within 0.0015 of float32's.

On CUDA the encoder runs in channels_last (its convolutions' fast layout on tensor cores) on a
whole chunk at once, and a chunk's images are preprocessed on the host into pinned memory and
copied to the GPU with ``non_blocking=True``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from cloud.captioning.beam_search import Hypothesis, beam_search
from cloud.captioning.checkpoint import CheckpointError, build_models, model_name, read_checkpoint
from cloud.captioning.models import ModelArgs
from cloud.captioning.train_utils import PRECISIONS, Precision, choose_precision

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parents[1] / "models" / "default.pt"

__all__ = ["DEFAULT_MODEL_PATH", "INFERENCE_PRECISIONS", "INT8", "PRECISIONS", "CaptionResult", "Captioner",
           "CheckpointError", "default_threads", "inference_precision", "quantize_decoder", "tune_malloc"]

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)

ENCODE_BATCH = 4  # images per encoder call on a CPU (see the module docstring)
MAX_DEFAULT_THREADS = 4  # past this the beam search of one chunk, not the encoder, is the limit


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_malloc_tuned = False


def tune_malloc() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring); once per process.

    Returns True when the settings were applied (now or before), False where the C library has
    no ``mallopt`` (not glibc) or refused one of them; the captioner then works as before, slower.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.debug("no mallopt in this C library: malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30)))
    if not applied:
        logger.warning("mallopt refused a setting: the encoder may page-fault more than it needs")
    _malloc_tuned = applied
    return applied


def default_threads() -> int:
    """Parallel captioning threads for ``framecap caption``: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cpus))


@dataclass
class CaptionResult(Generic[T]):
    """One item of ``Captioner.caption_stream``: its hypothesis, or the error that stopped it.

    Attributes:
        item: the item as given (e.g. a path).
        hypothesis: the best beam-search hypothesis; None when ``error`` is set.
        error: the ValueError raised while loading or checking the image (e.g. ImageLoadError).
        image: the RGB uint8 (H, W, 3) image when ``keep_images`` was asked, else None.
    """

    item: T
    hypothesis: Hypothesis | None = None
    error: ValueError | None = None
    image: np.ndarray | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# int8 is for captioning only: no autocast (dtype None); the decoder is quantized instead
INT8 = Precision("int8", None, False)
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")


def quantize_decoder(decoder: M) -> M:
    """The decoder with dynamic int8 quantization of its linear layers and LSTM cell (CPU).

    Weights are stored as int8 (per output channel for the linear layers, one scale per tensor
    for the LSTM cell); each call quantizes its input with a scale taken from the input itself
    and multiplies in int8 (fbgemm), so no calibration data is needed. The embedding stays
    float32. At batch 1 a beam-search step reads every weight once (31 MB in float32, more than
    the L3 cache of a small server), so reading a quarter of the bytes is most of the gain.
    PyTorch's eager-mode ``quantize_dynamic`` (Jacob et al. 2018, "Quantization and Training of
    Neural Networks for Efficient Integer-Arithmetic-Only Inference").

    Args:
        decoder: a float32 ``DecoderWithAttention`` on the CPU; it is left unchanged.

    Returns:
        A quantized copy, for inference only (no gradients).
    """
    import copy
    import warnings

    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    with warnings.catch_warnings():  # torch asks eager-mode users to move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copy.deepcopy(decoder).eval(), {
            torch.nn.Linear: per_channel_dynamic_qconfig,
            torch.nn.LSTMCell: default_dynamic_qconfig,
        }, dtype=torch.qint8)


def inference_precision(requested: str, device: torch.device) -> Precision:
    """The captioning precision for ``requested`` (auto, fp32, bf16, fp16 or int8) on ``device``.

    ``auto`` is fp16 autocast on a GPU and fp32 elsewhere. Unlike training (where ``auto`` picks
    bf16 on a GPU that has it, for its range), captioning in bf16 costs 0.005 val BLEU-4 and
    0.007 CIDEr, almost all of it in the encoder, while fp16 stays within 0.001 of fp32
    (docs/performance.md, "GPU"): fp16 runs on the same tensor cores. Explicit names go through
    ``train_utils.choose_precision``. The Precision's ``scaler`` means nothing here (no gradients).

    Raises:
        ValueError: an unknown name, ``fp16`` on a CPU (CPU autocast in float16 is slow and
            not what a GPU computes: use bf16 or fp32 there), ``int8`` on a GPU (fbgemm's int8
            kernels are CPU kernels), or ``bf16`` on a GPU without native bfloat16.
    """
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16: float16 autocast is for CUDA GPUs; "
                         "on a CPU use --precision int8, bf16, fp32 or auto (fp32)")
    if requested == "int8":
        if device.type != "cpu":
            raise ValueError(f"--precision int8: dynamic int8 quantization runs on a CPU, not on {device}; "
                             "on a GPU use --precision fp16, bf16 or auto")
        return INT8
    if requested == "auto" and device.type == "cuda":
        requested = "fp16"
    return choose_precision(requested, device)


class Captioner:
    """A loaded captioning model.

    Attributes:
        name: the model name written in caption records, e.g. "sat-efficientnet_lite0-flickr8k-v2".
        beam_size, max_caption_length, length_penalty, no_repeat_ngram_size: decoding settings
            (see beam_search); the last two default to the values stored in the checkpoint.
        batch_size: images per encoder/beam-search batch.
        precision: the autocast dtype of the encoder and decoder (``precision.dtype``; None:
            float32), from ``precision`` auto, fp32, bf16 or fp16 (see ``inference_precision``).
        channels_last: the encoder runs in channels_last memory format (CUDA; a CPU with
            ``threads`` set).
        pin_memory: chunks of images are built in pinned host memory and copied to the device
            without blocking (CUDA).
    """

    def __init__(self, ckpt: dict[str, Any], *, device: str = "auto", beam_size: int = 3,
                 max_caption_length: int = 30, source: str = "checkpoint",
                 pretrained_encoder: bool = True, length_penalty: float | None = None,
                 batch_size: int = 32, no_repeat_ngram_size: int | None = None,
                 threads: int | None = None, encode_batch: int = ENCODE_BATCH,
                 precision: str = "auto") -> None:
        """Build from a checkpoint dict; ``Captioner.load`` reads one from a file.

        Raises ValueError for a bad setting (sizes, threads, a precision this device cannot
        run, see ``inference_precision``) and CheckpointError for a checkpoint that does not fit.
        """
        if beam_size < 1 or max_caption_length < 1:
            raise ValueError("beam_size and max_caption_length must be >= 1")
        if batch_size < 1 or encode_batch < 1:
            raise ValueError("batch_size and encode_batch must be >= 1")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.device = resolve_device(device)
        self.precision: Precision = inference_precision(precision, self.device)
        encoder, decoder, word_map = build_models(ckpt, source, pretrained_encoder)
        self.encoder = encoder.to(self.device).eval()
        cuda = self.device.type == "cuda"
        self.pin_memory = cuda
        if cuda:  # preprocess() normalises where these live: on the host, into pinned batches
            self.encoder.mean, self.encoder.std = self.encoder.mean.cpu(), self.encoder.std.cpu()
        # On a CPU channels_last is bitwise equal to the default format with one thread per op
        # (checked by tests/captioning/test_throughput.py), not with a team: only when `threads`
        # sets that. On CUDA it is cuDNN's fast layout for convolutions in half precision.
        self.channels_last = cuda or (self.device.type == "cpu" and threads is not None)
        if self.channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.decoder = decoder.to(self.device).eval()
        if self.precision is INT8:
            self.decoder = quantize_decoder(self.decoder)
        self.word_map = word_map
        self.model_args: ModelArgs = decoder.args
        self.name: str = str(ckpt.get("name") or model_name(self.model_args))
        self.beam_size = beam_size
        self.max_caption_length = max_caption_length
        # the checkpoint may carry the decoding setting it was tuned with (export --length-penalty)
        self.length_penalty = float(ckpt.get("length_penalty", 0.0) if length_penalty is None else length_penalty)
        self.no_repeat_ngram_size = int(ckpt.get("no_repeat_ngram_size", 0)
                                        if no_repeat_ngram_size is None else no_repeat_ngram_size)
        self.batch_size = batch_size
        self.encode_batch = encode_batch if self.device.type == "cpu" else batch_size
        self.threads = threads
        if threads is not None and self.device.type == "cpu":
            # parallelism comes from `threads` chunks at once; a team of threads per op would
            # oversubscribe them (and spins at a barrier after each op on a busy machine)
            torch.set_num_threads(1)
            tune_malloc()

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto", beam_size: int = 3,
             max_caption_length: int = 30, threads: int | None = None, precision: str = "auto") -> Captioner:
        """Load a checkpoint (None: the committed default model).

        ``threads``: images captioned in parallel (see the module docstring); None keeps
        torch's thread setting and captions on the calling thread. ``precision``: auto, fp32,
        bf16 or fp16 (see ``inference_precision``).

        Raises FileNotFoundError for a missing file, CheckpointError (a ValueError) for a
        file that is not a captioning checkpoint or whose weights do not fit its model_args or
        word map, and ValueError for a precision this device cannot run.
        """
        path = Path(path) if path is not None else DEFAULT_MODEL_PATH
        ckpt = read_checkpoint(path)
        captioner = cls(ckpt, device=device, beam_size=beam_size, max_caption_length=max_caption_length,
                        source=str(path), threads=threads, precision=precision)
        logger.info("loaded captioning model %s from %s on %s (threads %s, precision %s)", captioner.name, path,
                    captioner.device, threads, captioner.precision.name)
        return captioner

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict[str, Any], **kwargs: Any) -> Captioner:
        """Build from an in-memory checkpoint dict (e.g. ``testing.tiny_checkpoint()``)."""
        return cls(ckpt, **kwargs)

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) images -> encoder_out (batch, grid, grid, encoder_dim).

        Runs the encoder ``encode_batch`` images at a time. Raises ValueError for an array that
        is not RGB uint8 HxWx3.
        """
        x = self.encoder.preprocess(images)  # (batch, 3, S, S)
        return self._encode_tensor(x)

    def _encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (batch, 3, S, S) -> float32 (batch, grid, grid, encoder_dim), in
        micro-batches, under the precision's autocast. ``x`` on the host is copied to the device
        without blocking when it is in pinned memory."""
        parts = []
        for start in range(0, x.size(0), self.encode_batch):
            part = x[start:start + self.encode_batch].to(self.device, non_blocking=self.pin_memory)  # (micro, 3, S, S)
            if self.channels_last:
                part = part.contiguous(memory_format=torch.channels_last)
            with self.precision.autocast(self.device):
                parts.append(self.encoder(part).float())  # (micro, grid, grid, encoder_dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _host_batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate preprocessed (1, 3, S, S) host tensors into one (n, 3, S, S) batch, in
        pinned memory when ``pin_memory`` (so that its copy to the GPU need not block)."""
        if not self.pin_memory:
            return torch.cat(inputs)
        batch = torch.empty((len(inputs), *inputs[0].shape[1:]), dtype=inputs[0].dtype, pin_memory=True)
        return torch.cat(inputs, out=batch)  # (n, 3, S, S), pinned

    def _caption_chunk(self, chunk: list[T], load: Callable[[T], np.ndarray], return_alphas: bool,
                       keep_images: bool) -> list[CaptionResult[T]]:
        """Load, encode and beam-search one chunk of items (on whichever thread calls it)."""
        with torch.inference_mode():  # thread-local: entered on the thread that computes
            results: list[CaptionResult[T]] = []
            inputs = []
            for item in chunk:
                result: CaptionResult[T] = CaptionResult(item)
                results.append(result)
                try:
                    image = load(item)
                    inputs.append(self.encoder.preprocess([image]))  # (1, 3, S, S)
                except ValueError as err:  # ImageLoadError, or not RGB uint8 HxWx3
                    result.error = err
                    continue
                if keep_images:
                    result.image = image
            if not inputs:
                return results
            encoder_out = self._encode_tensor(self._host_batch(inputs))  # (valid, grid, grid, encoder_dim)
            del inputs
            with self.precision.autocast(self.device):  # thread-local too: the decoder's steps
                hyps = iter(beam_search(self.decoder, encoder_out, self.word_map, self.beam_size,
                                        self.max_caption_length, self.length_penalty, return_alphas,
                                        no_repeat_ngram_size=self.no_repeat_ngram_size))
            for result in results:
                if result.error is None:
                    result.hypothesis = next(hyps)
            return results

    def caption_stream(self, items: Iterable[T], load: Callable[[T], np.ndarray], *,
                       return_alphas: bool = False, keep_images: bool = False,
                       chunk_size: int | None = None) -> Iterator[CaptionResult[T]]:
        """Caption items one chunk at a time, ``threads`` chunks in parallel, results in order.

        Only about ``threads + 1`` chunks of images are in memory at once, so a long list of
        files is never decoded all at once.

        Args:
            items: what to caption, e.g. paths; read lazily.
            load: item -> RGB uint8 (H, W, 3) image; a ValueError it raises (ImageLoadError)
                becomes that item's ``error`` and the others go on. Called on the worker threads.
            return_alphas: keep each word's attention weights in the hypotheses.
            keep_images: keep each loaded image in its result (to draw attention over it).
            chunk_size: items per chunk: the beam search's batch. Default ``batch_size``, or
                fewer when ``items`` has a length, so that each of the threads gets a chunk.

        Yields:
            one CaptionResult per item, in input order.
        """
        workers = self.threads or 1
        size = chunk_size or self.batch_size
        if chunk_size is None and isinstance(items, Sized):  # give every thread a chunk
            size = max(1, min(size, math.ceil(len(items) / workers)))
        chunks = _chunks(items, size)
        if workers == 1:  # on the calling thread
            for chunk in chunks:
                yield from self._caption_chunk(chunk, load, return_alphas, keep_images)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="caption")
        pending: deque[Future[list[CaptionResult[T]]]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(self._caption_chunk, chunk, load, return_alphas, keep_images))
                if len(pending) > workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def hypotheses(self, images: Sequence[np.ndarray], return_alphas: bool = False) -> list[Hypothesis]:
        """Beam-search hypotheses per image: ``batch_size`` images per beam search, split over
        ``threads`` so that each thread has work. Raises ValueError for an array that is not
        RGB uint8 HxWx3."""
        for i, image in enumerate(images):  # before any work, naming the image as the encoder would
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected RGB uint8 HxWx3, got {image.dtype} {image.shape}")
        out: list[Hypothesis] = []
        for result in self.caption_stream(images, _identity, return_alphas=return_alphas):
            if result.error is not None:
                raise result.error
            assert result.hypothesis is not None
            out.append(result.hypothesis)
        return out

    def caption_images(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Caption RGB uint8 HxWx3 images of any size.

        Returns (caption, score) per image, in order: the caption as lower-case words joined
        by spaces, the score its summed natural-log probability (<= 0; includes <end>).
        Raises ValueError for an array that is not RGB uint8 HxWx3.
        """
        if len(images) == 0:
            return []
        return [(" ".join(self.word_map.decode(h.tokens)), h.score) for h in self.hypotheses(images)]


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
