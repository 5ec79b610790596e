"""The default model's captions and scores on real images, pinned before the beam search was
made to keep image features once per image (issue 9): a faster search must not change them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.captioning.beam_search import beam_search
from cloud.captioning.images import load_image

IMAGE_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "flickr8k" / "images"

# The first eight Flickr8k val images (Karpathy split), as tests/captioning/conftest.py reads them.
FILES = ["1022454332_6af2c1449a.jpg", "103106960_e8a41d64f8.jpg", "1032122270_ea6f0beedb.jpg",
         "1034276567_49bb87c51c.jpg", "1045521051_108ebc19be.jpg", "1056249424_ef2a2e041c.jpg",
         "107582366_d86f2d3347.jpg", "1077546505_a4f6c4daa9.jpg"]

# (beam, length_penalty, no_repeat_ngram_size) -> (caption, score) per image, computed with the
# per-beam beam search of commit f815471 on features encoded one image at a time.
PINNED: dict[tuple[int, float, int], list[tuple[str, float]]] = {
    (3, 1.0, 2): [  # the default decoding (the checkpoint's length penalty and n-gram ban)
        ("two people are playing in the water on a lake", -4.84936),
        ("a boy in a red shirt is playing on a baseball", -4.48246),
        ("two dogs are running in a field", -1.88981),
        ("a young boy is eating a baby with a little boy", -8.32877),
        ("a man is sitting on a train", -5.24887),
        ("two children are playing in the water", -2.47712),
        ("a group of people are sitting at a table", -3.31291),
        ("a little boy is jumping into a pool", -1.58294),
    ],
    (3, 0.0, 0): [
        ("two people are playing in the water on a lake", -4.84936),
        ("a boy in a red shirt is playing on a baseball", -4.48246),
        ("two dogs are running in a field", -1.88981),
        ("a little boy is eating a baby with a baby", -6.02336),
        ("a man is sitting on a train", -5.24887),
        ("two children are playing in the water", -2.47712),
        ("a group of people are sitting at a table", -3.31291),
        ("a little boy is jumping into a pool", -1.58294),
    ],
    (1, 0.0, 0): [
        ("a boy is standing on a dock in a lake", -5.37054),
        ("a boy in a red shirt is playing on a baseball", -4.48246),
        ("a black and white dog and a dog are running in a field", -4.49723),
        ("a boy is eating a baby with a baby", -6.23868),
        ("a man is sitting on a train", -5.24887),
        ("two children are playing in a field", -3.13969),
        ("a man is sitting at a table in a bar", -5.18633),
        ("a little boy is jumping into a pool", -1.58294),
    ],
    (5, 1.0, 2): [
        ("two people are playing in the water on a lake", -4.84936),
        ("a boy in a red shirt is playing on a baseball", -4.48246),
        ("two dogs are running in a field", -1.88981),
        ("a boy in a blue shirt is eating with a baby", -7.59272),
        ("a man and a woman is sitting on a train", -7.07501),
        ("two children are playing in the water", -2.47712),
        ("a group of people are sitting at a table", -3.31291),
        ("a little boy is jumping into a pool", -1.58294),
    ],
}


@pytest.fixture(scope="module")
def pinned_images() -> list[np.ndarray]:
    if not all((IMAGE_DIR / name).is_file() for name in FILES):
        pytest.skip(f"Flickr8k images not found in {IMAGE_DIR}")
    return [load_image(IMAGE_DIR / name) for name in FILES]


@pytest.fixture(scope="module")
def default_captioner():
    from cloud.captioning.inference import DEFAULT_MODEL_PATH, Captioner

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no committed default model")
    return Captioner.load(None, device="cpu")


@pytest.mark.parametrize("decoding", list(PINNED), ids=lambda d: "beam{}-lp{}-ngram{}".format(*d))
def test_beam_search_gives_the_pinned_captions_and_scores(default_captioner, pinned_images, decoding) -> None:
    beam, length_penalty, ngram = decoding
    encoder_out = torch.cat([default_captioner.encode([image]) for image in pinned_images])
    hyps = beam_search(default_captioner.decoder, encoder_out, default_captioner.word_map, beam, 30,
                       length_penalty, return_alphas=True, no_repeat_ngram_size=ngram)
    got = [" ".join(default_captioner.word_map.decode(h.tokens)) for h in hyps]
    assert got == [caption for caption, _ in PINNED[decoding]]
    for hyp, (_, score) in zip(hyps, PINNED[decoding], strict=True):
        assert hyp.score == pytest.approx(score, abs=1e-4)
        assert hyp.alphas is not None and hyp.alphas.shape == (len(hyp.tokens) + 1, 49)
        assert torch.allclose(hyp.alphas.sum(dim=1), torch.ones(len(hyp.tokens) + 1), atol=1e-4)


def test_caption_images_gives_the_pinned_default_captions(default_captioner, pinned_images) -> None:
    got = default_captioner.caption_images(pinned_images)
    assert [caption for caption, _ in got] == [caption for caption, _ in PINNED[(3, 1.0, 2)]]
    for (_, score), (_, pinned) in zip(got, PINNED[(3, 1.0, 2)], strict=True):
        assert score == pytest.approx(pinned, abs=1e-4)


def _repeat_bans_reference(seqs: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """The per-row Python loop the vectorised ban replaced."""
    if size < 1 or seqs.size(1) < size:
        return []
    bans = []
    for row, seq in enumerate(seqs[:, 1:].tolist()):
        prefix = tuple(seq[len(seq) - size + 1:]) if size > 1 else ()
        for i in range(len(seq) - size + 1):
            if tuple(seq[i:i + size - 1]) == prefix:
                bans.append((row, seq[i + size - 1]))
    return bans


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_vectorised_repeat_bans_equal_the_loop(size: int) -> None:
    from cloud.captioning.beam_search import _repeat_bans

    generator = torch.Generator().manual_seed(size)
    for length in range(1, 9):
        seqs = torch.randint(4, 8, (16, length), generator=generator)  # few words: many repeats
        seqs[:, 0] = 1  # <start>
        assert _repeat_bans(seqs, size) == _repeat_bans_reference(seqs, size)
