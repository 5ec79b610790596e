"""Per-word attention maps of a frame: Show, Attend and Tell's Fig. 2 for any stored caption.

Xu et al. 2015 (arXiv:1502.03044, Sec. 4 and Fig. 2): at the step that emits word t the
decoder attends over the encoder's grid with soft weights ``alpha_t`` (they sum to 1 over the
``h x w`` grid). For a frame and its STORED caption, :class:`AttentionService` recomputes them
by teacher forcing that caption through the same model's decoder (``<start> w1 .. wn``; a
word outside the word map goes in as ``<unk>``), so the map shown is the one of the caption
the worker wrote, not of a new beam search. Results are cached in memory (LRU) and as JSON
files keyed by a hash of (model name, frame key, caption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cloud.captioning.inference import DEFAULT_MODEL_PATH, Captioner
from cloud.validation import decode_image
from cloud.web.model import CaptionDoc

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
"""Attention results kept in memory (each a few KB of JSON)."""
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_CAPTION_WORDS = 200
"""Longest caption teacher-forced (the model writes at most 30 words)."""


def cache_key(model: str, frame_key: str, caption: str) -> str:
    """SHA-256 hex of (model name, frame key, caption): the name of a cached result."""
    return hashlib.sha256(json.dumps([model, frame_key, caption]).encode()).hexdigest()


class AttentionService:
    """Attention maps of stored captions, computed with a captioning model loaded on first use.

    Thread-safe: one computation at a time (the model is shared), cache reads in parallel.

    Args:
        model_path: the captioning checkpoint (None: the committed default model); it should be
            the model that wrote the captions (``model_matches`` in each result says whether).
        cache_dir: where to keep results as JSON files (created); None: memory only.
        device: torch device for the model ("cpu", "cuda", "auto").
        threads: torch intra-op threads, set (process-wide) when the model loads; None leaves
            torch's default. One thread holds up on a busy 2-core machine (LOCAL-STACK.md).
        cache_size: results kept in the in-memory LRU.
        max_pixels: frames with more pixels are refused (ValueError).

    Attributes:
        computed: results computed by the model (not served from a cache), for tests and metrics.
    """

    def __init__(self, model_path: Path | None = None, *, cache_dir: Path | None = None,
                 device: str = "cpu", threads: int | None = 1,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = device
        self.threads = threads
        self.cache_size = cache_size
        self.max_pixels = max_pixels
        self.computed = 0
        self._captioner: Captioner | None = None
        self._load_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded."""
        return self._captioner is not None

    def captioner(self) -> Captioner:
        """The model, loaded on first call (FileNotFoundError / CheckpointError if it cannot be)."""
        if self._captioner is None:
            with self._load_lock:
                if self._captioner is None:
                    if self.threads is not None:
                        torch.set_num_threads(self.threads)
                    started = time.monotonic()
                    self._captioner = Captioner.load(self.model_path, device=self.device)
                    logger.info("attention: loaded %s in %.1f s", self._captioner.name,
                                time.monotonic() - started)
        return self._captioner

    @property
    def model_name(self) -> str:
        """The loaded model's name (loads it)."""
        return self.captioner().name

    def attention(self, doc: CaptionDoc, jpeg: bytes) -> dict[str, Any]:
        """The attention map of each word of ``doc.caption`` over the frame ``jpeg``.

        Returns a JSON-able dict: ``words`` (the caption's words), ``alphas`` (per word, the
        h*w weights over the encoder grid, row-major, summing to 1), ``grid`` ([h, w]),
        ``in_vocabulary`` (per word; False: it went through the decoder as ``<unk>``),
        ``model`` (the loaded model's name), ``model_matches`` (``doc.model == model``) and
        ``image_size`` ([width, height] of the frame in pixels).

        Raises:
            ValueError: ``doc`` is an error record (no caption), or ``jpeg`` does not decode.
            FileNotFoundError / CheckpointError: the model cannot be loaded.
        """
        words = doc.caption.split()
        if doc.error is not None or not words:
            why = f" (error record: {doc.error})" if doc.error else ""
            raise ValueError(f"frame {doc.device_id}/{doc.frame_id} has no caption{why}, "
                             "so it has no attention maps")
        if len(words) > MAX_CAPTION_WORDS:
            raise ValueError(f"frame {doc.device_id}/{doc.frame_id}: caption of {len(words)} words "
                             f"is longer than {MAX_CAPTION_WORDS}")
        captioner = self.captioner()
        key = cache_key(captioner.name, doc.frame_key, doc.caption)
        result = self._cached(key)
        if result is None:
            with self._compute_lock:  # a second request for the same frame waits, then hits
                result = self._cached(key)
                if result is None:
                    result = self._compute(doc, jpeg, words, captioner)
                    self._store(key, result)
        return {**result, "model_matches": doc.model == captioner.name}

    def _compute(self, doc: CaptionDoc, jpeg: bytes, words: list[str],
                 captioner: Captioner) -> dict[str, Any]:
        try:
            image = decode_image(jpeg, self.max_pixels)  # (H, W, 3) RGB uint8
        except ValueError as err:
            raise ValueError(f"frame {doc.device_id}/{doc.frame_id}: the JPEG does not decode "
                             f"({err})") from err
        started = time.monotonic()
        alphas, grid = self.teacher_forced_alphas(image, words)
        self.computed += 1
        logger.info("attention of frame %s/%s (%d words) in %.0f ms", doc.device_id, doc.frame_id,
                    len(words), 1000 * (time.monotonic() - started))
        word_map = captioner.word_map.word_to_index
        return {
            "words": words,
            "alphas": [[round(float(a), 6) for a in row] for row in alphas],
            "grid": list(grid),
            "in_vocabulary": [w.lower() in word_map for w in words],
            "model": captioner.name,
            "image_size": [int(image.shape[1]), int(image.shape[0])],
        }

    @torch.inference_mode()
    def teacher_forced_alphas(self, image: np.ndarray, words: list[str]) -> tuple[np.ndarray, tuple[int, int]]:
        """Alphas of ``words`` on an RGB uint8 (H, W, 3) image by teacher forcing (no cache).

        The caption ``<start> w1 .. wn <end>`` goes through the decoder's training-time
        forward pass; row t of the result is alpha at the step that emits word t.

        Returns:
            alphas (len(words), h*w) float32, each row summing to 1, and the grid (h, w).
        """
        captioner = self.captioner()
        word_map = captioner.word_map
        encoder_out = captioner.encode([image])  # (1, h, w, encoder_dim)
        grid = (int(encoder_out.size(1)), int(encoder_out.size(2)))
        tokens = word_map.encode([w.lower() for w in words], max_len=len(words))  # <start> w1 .. wn <end>
        captions = torch.tensor([tokens], dtype=torch.long, device=captioner.device)  # (1, n+2)
        lengths = torch.tensor([len(tokens)], dtype=torch.long, device=captioner.device)  # (1,)
        _, alphas, _ = captioner.decoder(encoder_out, captions, lengths)  # (1, n+1, h*w)
        return alphas[0, :len(words)].float().cpu().numpy(), grid  # (n, h*w): without <end>

    def _cached(self, key: str) -> dict[str, Any] | None:
        with self._cache_lock:
            result = self._cache.get(key)
            if result is not None:
                self._cache.move_to_end(key)
                return result
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            result = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning("attention: ignoring unreadable cache file %s: %s", path, err)
            return None
        if not isinstance(result, dict) or not {"words", "alphas", "grid"} <= set(result):
            logger.warning("attention: ignoring cache file %s: not an attention result", path)
            return None
        self._remember(key, result)
        return result

    def _remember(self, key: str, result: dict[str, Any]) -> None:
        with self._cache_lock:
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _store(self, key: str, result: dict[str, Any]) -> None:
        self._remember(key, result)
        if self.cache_dir is None:
            return
        path = self.cache_dir / f"{key}.json"
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(result, separators=(",", ":")))
            tmp.replace(path)
        except OSError as err:  # a full or read-only disk costs a recomputation later, no more
            logger.warning("attention: cannot write cache file %s: %s", path, err)


def render_overlay(jpeg: bytes, alphas_row: list[float], grid: list[int] | tuple[int, int],
                   *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """One word's attention drawn over the frame, as PNG bytes (as in Xu et al. 2015, Fig. 2).

    The ``h x w`` weights are upsampled (bicubic) to the frame's size and scaled to [0, 1] by
    their maximum; the frame is darkened where the word did not look.

    Raises:
        ValueError: the JPEG does not decode, or ``alphas_row`` does not have ``h * w`` values.
    """
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or len(alphas_row) != h * w:
        raise ValueError(f"alphas_row has {len(alphas_row)} values, grid {h}x{w} needs {h * w}")
    image = decode_image(jpeg, max_pixels)  # (H, W, 3) RGB uint8
    cells = np.asarray(alphas_row, dtype=np.float32).reshape(h, w)  # (h, w)
    upsampled = cv2.resize(cells, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)  # (H, W)
    alpha = np.clip(upsampled.astype(np.float32), 0.0, None)  # (H, W)
    alpha /= max(float(alpha.max()), 1e-12)
    out = image.astype(np.float32) * (0.25 + 0.75 * alpha[..., None])  # (H, W, 3)
    ok, png = cv2.imencode(".png", cv2.cvtColor(out.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the overlay as PNG")
    return png.tobytes()
