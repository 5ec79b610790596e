"""Fixtures for the captioning tests: real Flickr8k images and captions from ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.captioning.images import load_image

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
FLICKR = SHARED / "data" / "flickr8k"
KARPATHY_JSON = FLICKR / "dataset_flickr8k.json"
IMAGE_DIR = FLICKR / "images"


def _require_data() -> None:
    if not KARPATHY_JSON.is_file():
        pytest.skip(f"Flickr8k not found at {KARPATHY_JSON}")


@pytest.fixture(scope="session")
def karpathy() -> dict:
    _require_data()
    return json.loads(KARPATHY_JSON.read_text())


@pytest.fixture(scope="session")
def small_karpathy_json(karpathy: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Karpathy JSON with the first 24 train and 8 val images of Flickr8k."""
    train = [i for i in karpathy["images"] if i["split"] == "train"][:24]
    val = [i for i in karpathy["images"] if i["split"] == "val"][:8]
    path = tmp_path_factory.mktemp("karpathy") / "small.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": train + val}))
    return path


@pytest.fixture(scope="session")
def real_images(karpathy: dict) -> list[np.ndarray]:
    """Eight real val images as RGB uint8 arrays."""
    val = [i for i in karpathy["images"] if i["split"] == "val"][:8]
    return [load_image(IMAGE_DIR / i["filename"]) for i in val]


@pytest.fixture(scope="session")
def encoder():
    from cloud.captioning.models import Encoder

    return Encoder("efficientnet_lite0").eval()


@pytest.fixture(scope="session")
def overfit_model(karpathy: dict, encoder):
    """A small decoder trained on 4 real images x 1 caption each until it knows them.

    Returns (decoder, word_map, encoder_out (4, 7, 7, 1280), target captions as word lists).
    """
    from cloud.captioning.models import DecoderWithAttention, ModelArgs
    from cloud.captioning.vocab import WordMap

    items = [i for i in karpathy["images"] if i["split"] == "train"][:4]
    targets = [i["sentences"][0]["tokens"] for i in items]
    word_map = WordMap.build(targets, min_word_freq=1)
    with torch.inference_mode():
        x = encoder.preprocess([load_image(IMAGE_DIR / i["filename"]) for i in items])
        encoder_out = encoder(x).clone()  # (4, 7, 7, 1280)
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=len(word_map), encoder_proj_dim=64, attention_dim=64, embed_dim=32,
                     decoder_dim=64, dropout=0.0, feature_dropout=0.0)
    decoder = DecoderWithAttention(args)
    encoded = [word_map.encode(t, 50) for t in targets]
    lengths = torch.tensor([len(e) for e in encoded])
    captions = torch.zeros(4, int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        captions[i, : len(e)] = torch.tensor(e)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=5e-3)
    losses = []
    for _ in range(250):
        scores, _, decode_lengths = decoder(encoder_out, captions, lengths)
        mask = torch.arange(scores.size(1))[None] < decode_lengths[:, None]
        loss = torch.nn.functional.cross_entropy(scores[mask], captions[:, 1:][mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    decoder.eval()
    return decoder, word_map, encoder_out, targets, losses
