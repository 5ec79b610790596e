"""Per-word attention maps (cloud.web.attention) with the committed default model on real
Flickr8k images: teacher-forced alphas against the beam search's own alphas."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from cloud.captioning.beam_search import Hypothesis
from cloud.validation import decode_image
from cloud.web.attention import AttentionService, cache_key, render_overlay
from cloud.web.model import CaptionDoc

pytestmark = pytest.mark.slow

IMAGES = ("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg")


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> AttentionService:
    """One default-model service for the session (loaded once), caching on disk."""
    return AttentionService(cache_dir=tmp_path_factory.mktemp("attention-cache"), threads=1)


@pytest.fixture(scope="session")
def jpegs(shared_dir: Path) -> list[bytes]:
    paths = [shared_dir / "data" / "flickr8k" / "images" / name for name in IMAGES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"Flickr8k images absent: {missing}")
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="session")
def beam(service: AttentionService, jpegs: list[bytes]) -> list[Hypothesis]:
    """The model's own beam-search captions of the images, with their alphas."""
    captioner = service.captioner()
    images = [decode_image(j, 10**8) for j in jpegs]
    return captioner.hypotheses(images, return_alphas=True)


def make_doc(caption: str, *, frame: str = "f1", model: str = "sat-efficientnet_lite0-flickr8k-v2",
             error: str | None = None) -> CaptionDoc:
    return CaptionDoc(device_id="cam1", frame_id=frame, captured_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
                      caption=caption, score=-8.0 if not error else None, model=model,
                      frame_key=f"frames/cam1/2026/01/02/{frame}.jpg",
                      caption_key=f"captions/cam1/2026/01/02/{frame}.json", error=error)


def beam_caption(service: AttentionService, hyp: Hypothesis) -> str:
    return " ".join(service.captioner().word_map.decode(hyp.tokens))


def test_own_caption_alphas_equal_beam_search_alphas(service: AttentionService, jpegs: list[bytes],
                                                     beam: list[Hypothesis]) -> None:
    caption = beam_caption(service, beam[0])
    result = service.attention(make_doc(caption, frame="own"), jpegs[0])
    assert json.loads(json.dumps(result)) == result  # JSON-able as it is
    words = caption.split()
    assert result["words"] == words and len(words) >= 3
    assert result["grid"] == [7, 7]
    assert result["model"] == service.model_name and result["model_matches"] is True
    image = decode_image(jpegs[0], 10**8)
    assert result["image_size"] == [image.shape[1], image.shape[0]]
    alphas = np.array(result["alphas"])  # (words, 49)
    assert alphas.shape == (len(words), 49)
    np.testing.assert_allclose(alphas.sum(axis=1), 1.0, atol=1e-4)
    assert beam[0].alphas is not None
    reference = beam[0].alphas.numpy()[:len(words)]  # beam search: one row per word, then <end>
    np.testing.assert_allclose(alphas, reference, atol=1e-5)
    # attention moves over the image as the words go: not one map repeated
    assert np.abs(alphas - alphas[0]).max() > 0.01


def test_other_caption_and_other_image_give_other_maps(service: AttentionService, jpegs: list[bytes],
                                                       beam: list[Hypothesis]) -> None:
    own = beam_caption(service, beam[0])
    words = own.split()
    other = " ".join(["a", "dog", "runs", "on", "the", "beach"] + words[6:])
    alt = np.array(service.attention(make_doc(other, frame="other-caption"), jpegs[0])["alphas"])
    ref = beam[0].alphas.numpy()[:len(words)] if beam[0].alphas is not None else None
    assert ref is not None
    n = min(len(alt), len(ref))
    # the first word is attended to before any word is read: only later steps differ
    np.testing.assert_allclose(alt[0], ref[0], atol=1e-5)
    assert np.abs(alt[1:n] - ref[1:n]).max() > 0.01
    np.testing.assert_allclose(alt.sum(axis=1), 1.0, atol=1e-4)
    second = np.array(service.attention(make_doc(own, frame="image-2"), jpegs[1])["alphas"])
    assert np.abs(second - np.array(service.attention(make_doc(own, frame="own"), jpegs[0])["alphas"])).max() > 0.01


def test_cache_hits_do_not_recompute(service: AttentionService, jpegs: list[bytes], tmp_path: Path) -> None:
    doc = make_doc("a man rides a bike", frame="cached", model="some-other-model")
    before = service.computed
    first = service.attention(doc, jpegs[1])
    assert service.computed == before + 1
    assert first["model_matches"] is False  # computed with the loaded model all the same
    again = service.attention(doc, jpegs[1])
    assert service.computed == before + 1 and again == first
    # a fresh service on the same cache directory reads the JSON file: no model load at all
    assert service.cache_dir is not None
    fresh = AttentionService(cache_dir=service.cache_dir)
    fresh._captioner = service._captioner  # same model, so that only the cache is exercised
    assert fresh.attention(doc, jpegs[1]) == first and fresh.computed == 0
    key = cache_key(service.model_name, doc.frame_key, doc.caption)
    assert (service.cache_dir / f"{key}.json").is_file()
    # another caption of the same frame is another entry
    service.attention(make_doc("a man rides a horse", frame="cached"), jpegs[1])
    assert service.computed == before + 2


def test_unknown_words_go_through_as_unk(service: AttentionService, jpegs: list[bytes]) -> None:
    result = service.attention(make_doc("a zzyzx dog runs", frame="unk"), jpegs[0])
    assert result["words"] == ["a", "zzyzx", "dog", "runs"]
    assert result["in_vocabulary"] == [True, False, True, True]
    same = service.attention(make_doc("a <unk> dog runs", frame="unk"), jpegs[0])
    np.testing.assert_allclose(result["alphas"], same["alphas"], atol=1e-6)


def test_bad_input_is_a_clear_value_error(service: AttentionService, jpegs: list[bytes]) -> None:
    with pytest.raises(ValueError, match="does not decode"):
        service.attention(make_doc("a dog", frame="garbage"), b"not a jpeg at all")
    with pytest.raises(ValueError, match="does not decode"):
        service.attention(make_doc("a dog", frame="truncated"), jpegs[0][:200])
    with pytest.raises(ValueError, match="no caption.*error record: decode failed"):
        service.attention(make_doc("", frame="err", error="decode failed"), jpegs[0])


def test_render_overlay_is_a_png_of_the_frame(jpegs: list[bytes]) -> None:
    grid = [7, 7]
    row = [0.0] * 49
    row[0] = 1.0  # all attention on the top-left cell
    png = render_overlay(jpegs[0], row, grid)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import cv2

    out = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert out is not None
    image = decode_image(jpegs[0], 10**8)
    assert out.shape == image.shape
    h, w = out.shape[:2]
    top_left = out[: h // 7, : w // 7].astype(float) / np.maximum(image[: h // 7, : w // 7, ::-1], 1)
    bottom_right = out[-h // 7:, -w // 7:].astype(float) / np.maximum(image[-h // 7:, -w // 7:, ::-1], 1)
    assert top_left.mean() > 2 * bottom_right.mean()
    with pytest.raises(ValueError, match="needs 49"):
        render_overlay(jpegs[0], [1.0] * 48, grid)
