"""Unit tests of the ingest's frame validation (no network)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from cloud_fakes import jpeg_bytes, metadata_for
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.validation import InvalidFrame, jpeg_dimensions, validate_frame
from common.topics import Topics

TOPICS = Topics()
LIMITS = {"topics": TOPICS, "max_payload_bytes": 64 * 1024, "max_pixels": 640 * 480}


def check(topic: str, payload: bytes, props: list[tuple[str, str]], **limits: int):
    return validate_frame(topic, payload, props, **(LIMITS | limits))


def reason_of(topic: str, payload: bytes, props: list[tuple[str, str]], **limits: int) -> str:
    with pytest.raises(InvalidFrame) as info:
        check(topic, payload, props, **limits)
    return info.value.reason


def test_valid_frame_gets_its_contract_key() -> None:
    payload = jpeg_bytes()
    meta = metadata_for(payload)
    frame = check("framecap/cam1/frames", payload, meta.to_user_properties())
    assert frame.key == "frames/cam1/2026/01/31/f000001.jpg"
    assert frame.metadata == meta


def test_jpeg_dimensions_reads_the_header() -> None:
    assert jpeg_dimensions(jpeg_bytes(width=37, height=23)) == (37, 23)
    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        jpeg_dimensions(png.tobytes())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_jpeg_dimensions_never_crashes_on_random_bytes(data: bytes) -> None:
    try:
        width, height = jpeg_dimensions(b"\xff\xd8" + data)
    except ValueError:
        return
    assert 0 <= width < 65536 and 0 <= height < 65536


def _props_with(meta_props: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == name else v) for k, v in meta_props]


def test_each_bad_input_has_its_reason() -> None:
    payload = jpeg_bytes()
    props = metadata_for(payload).to_user_properties()
    topic = "framecap/cam1/frames"
    rng_bytes = np.random.default_rng(1).bytes(2000)
    cases = {
        "bad_topic": ("framecap/../frames", payload, props),
        "missing_metadata": (topic, payload, []),
        "schema_version": (topic, payload, _props_with(props, "fc-schema", "2")),
        "bad_metadata": (topic, payload, _props_with(props, "fc-width", "wide")),
        "device_mismatch": ("framecap/cam2/frames", payload, props),
        "sha256_mismatch": (topic, payload + b"x", props),
        "not_jpeg": (topic, rng_bytes, metadata_for(rng_bytes).to_user_properties()),
        "size_mismatch": (topic, payload, metadata_for(payload, width=65).to_user_properties()),
    }
    truncated = payload[: len(payload) // 2]
    cases["truncated_jpeg"] = (topic, truncated, metadata_for(truncated).to_user_properties())
    for expected, (t, p, pr) in cases.items():
        assert reason_of(t, p, pr) == expected, expected
    assert reason_of(topic, payload, props, max_payload_bytes=len(payload) - 1) == "too_large"
    assert reason_of(topic, payload, props, max_pixels=64 * 48 - 1) == "too_many_pixels"


def test_unsafe_ids_are_refused_with_ids_for_the_log() -> None:
    payload = jpeg_bytes()
    for bad in ("../x", "a/b", "a+b", "a#b", "a\x00b", "x" * 300):
        props = _props_with(metadata_for(payload).to_user_properties(), "fc-frame-id", bad)
        with pytest.raises(InvalidFrame) as info:
            check("framecap/cam1/frames", payload, props)
        assert info.value.reason == "bad_metadata"
        assert info.value.device_id == "cam1"
    for topic in (
        "framecap/+/frames",
        "framecap/a/b/frames",
        "framecap/cam1/acks",
        "other/cam1/frames",
    ):
        assert reason_of(topic, payload, metadata_for(payload).to_user_properties()) == "bad_topic"


def test_a_hacked_header_cannot_make_the_decoder_allocate() -> None:
    """A JPEG whose header (and metadata) claim 16000x16000 is refused before any decode."""
    payload = bytearray(jpeg_bytes())
    i = payload.index(b"\xff\xc0")
    payload[i + 5 : i + 9] = (16000).to_bytes(2, "big") * 2
    meta = metadata_for(bytes(payload), width=16000, height=16000)
    reason = reason_of("framecap/cam1/frames", bytes(payload), meta.to_user_properties())
    assert reason == "too_many_pixels"


@settings(max_examples=200, deadline=None)
@given(
    topic=st.text(max_size=40),
    payload=st.binary(max_size=256),
    props=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=10),
)
def test_validation_raises_only_invalid_frame(topic: str, payload: bytes, props) -> None:
    try:
        check(topic, payload, props)
    except InvalidFrame as bad:
        assert bad.reason
    else:  # pragma: no cover - random input never is a valid frame
        pytest.fail("random input accepted")


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["fc-seq", "fc-width", "fc-captured-at", "fc-sha256", "fc-device-id"]),
    st.text(max_size=30),
)
def test_fuzzed_metadata_fields_never_crash(name: str, value: str) -> None:
    payload = jpeg_bytes()
    props = _props_with(metadata_for(payload).to_user_properties(), name, value)
    try:
        check("framecap/cam1/frames", payload, props)
    except InvalidFrame as bad:
        assert bad.reason in {"bad_metadata", "device_mismatch", "sha256_mismatch", "size_mismatch"}


def test_odd_sizes_pass_the_scaled_decode_and_a_broken_scan_is_refused() -> None:
    """The ingest checks the JPEG with a 1/8-scale grey decode (issue 9): sizes that are not
    multiples of 8 pass; a JPEG whose scan header is destroyed does not decode."""
    for width, height in ((65, 49), (9, 17), (1, 1)):
        payload = jpeg_bytes(width, height)
        check("framecap/cam1/frames", payload,
              metadata_for(payload, width=width, height=height).to_user_properties())
    payload = bytearray(jpeg_bytes())
    sos = payload.index(b"\xff\xda")
    payload[sos + 2 : sos + 12] = b"\xff" * 10  # the scan header is garbage
    broken = bytes(payload)
    assert reason_of("framecap/cam1/frames", broken,
                     metadata_for(broken).to_user_properties()) == "undecodable"
