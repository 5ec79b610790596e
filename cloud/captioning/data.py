"""Datasets and the length-bucketed batch sampler that ``framecap train`` reads.

``CaptionDataset`` serves (features or image, caption, caption length) per caption from the
folder written by ``framecap data prepare``. ``BucketBatchSampler`` makes batches of captions
of similar length (less padding, fewer wasted LSTM steps) and shards each global batch over
the DDP ranks, as ``DistributedSampler`` would: every rank builds the same epoch plan from the
same seed and takes its own slice of each global batch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cloud.captioning.images import load_image
from cloud.captioning.vocab import WordMap

logger = logging.getLogger(__name__)


class CaptionDataset(Dataset):
    """Captions of one split; item i is caption i % captions_per_image of image i // cpi.

    Items: (features (num_pixels, encoder_dim) float16 or image (3, S, S) float,
    caption (max_len + 2,) long padded with <pad>, caption length (,) long incl. <start>/<end>).
    """

    def __init__(self, data_dir: str | Path, split: str, use_features: bool = True,
                 preprocess=None, limit_images: int | None = None) -> None:
        data_dir = Path(data_dir)
        try:
            encoded = json.loads((data_dir / f"{split}.json").read_text())
            self.meta = json.loads((data_dir / "meta.json").read_text())
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err.filename}: run 'framecap data prepare' first") from err
        self.word_map = WordMap.load(data_dir / "word_map.json")
        self.images: list[str] = encoded["images"][:limit_images]
        self.references: list[list[str]] = encoded["references"][: len(self.images)]
        captions = encoded["captions"][: len(self.images)]
        self.cpi = len(captions[0])
        flat = [c for caps in captions for c in caps]
        self.lengths = torch.tensor([len(c) for c in flat], dtype=torch.long)  # (num_captions,)
        width = int(self.lengths.max())
        self.captions = torch.full((len(flat), width), self.word_map.pad, dtype=torch.long)
        for i, c in enumerate(flat):
            self.captions[i, : len(c)] = torch.tensor(c)
        self.features: torch.Tensor | None = None
        self.preprocess = preprocess
        self.image_dir = Path(self.meta["image_dir"])
        if use_features:
            path = data_dir / f"{split}_features.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no feature cache; run 'framecap data prepare --cache-features'")
            array = np.load(path, mmap_mode="r")[: len(self.images)]
            self.features = torch.from_numpy(np.array(array))  # (num_images, num_pixels, encoder_dim)

    def __len__(self) -> int:
        return len(self.captions)

    def image_input(self, image_index: int) -> torch.Tensor:
        """Cached features (num_pixels, encoder_dim) or the preprocessed image (3, S, S)."""
        if self.features is not None:
            return self.features[image_index]
        image = load_image(self.image_dir / self.images[image_index])
        return self.preprocess([image])[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_input(i // self.cpi), self.captions[i], self.lengths[i]


class ImageDataset(Dataset):
    """One item per image of a split (for decoding): (index, features or image)."""

    def __init__(self, captions: CaptionDataset) -> None:
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.captions.image_input(i)


def collate_captions(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack items and trim the captions to the longest in the batch."""
    inputs, captions, lengths = zip(*batch, strict=True)
    lengths_t = torch.stack(lengths)  # (batch,)
    return torch.stack(inputs), torch.stack(captions)[:, : int(lengths_t.max())], lengths_t


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of captions of similar length, shuffled, sharded over ranks.

    Each epoch: shuffle the units (captions, or images with all their captions when
    ``captions_per_image`` > 1), cut them into pools of ``pool_batches`` global batches, sort
    each pool by length (an image's length: the sum of its captions'), cut into global batches
    of ``batch_size * world_size`` captions, shuffle the batches, and give rank r every
    world_size-th unit of each global batch. Grouping by image (as ruotianluo's
    ``seq_per_img``) lets the decoder project each image's features once for its captions.
    The last incomplete global batch is dropped when world_size > 1 so that every rank takes
    the same number of steps.
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, pool_batches: int = 50, shuffle: bool = True,
                 captions_per_image: int = 1) -> None:
        self.cpi = captions_per_image
        if batch_size % self.cpi:
            raise ValueError(f"batch_size {batch_size} must be a multiple of captions_per_image {self.cpi}")
        per_unit = lengths.view(-1, self.cpi)  # (units, cpi)
        self.unit_lengths = per_unit.sum(dim=1).tolist()
        self.units_per_batch = batch_size // self.cpi
        self.world_size, self.rank = world_size, rank
        self.seed, self.pool_batches, self.shuffle = seed, pool_batches, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch plan: lists of unit indices, identical on every rank."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.unit_lengths)))
        if self.shuffle:
            rng.shuffle(order)
        global_size = self.units_per_batch * self.world_size
        pool = global_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=lambda i: self.unit_lengths[i])
            batches += [chunk[j:j + global_size] for j in range(0, len(chunk), global_size)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:  # after the shuffle, so 1 and N processes see the same plan
            batches = [b for b in batches if len(b) == global_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            units = batch[self.rank:: self.world_size]
            yield [u * self.cpi + j for u in units for j in range(self.cpi)]

    def __len__(self) -> int:
        return len(self.global_batches())
