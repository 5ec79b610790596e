"""Unit tests of common/topics.py and common/messages.py: the MQTT and S3 contract."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.messages import (
    SCHEMA_VERSION,
    AlertMessage,
    AlertRuleRef,
    CaptionRecord,
    FrameAck,
    FrameMetadata,
    MessageError,
)
from common.topics import (
    MAX_ID_LENGTH,
    InvalidIdError,
    Topics,
    caption_key,
    frame_key,
    parse_frame_key,
    validate_id,
    validate_prefix,
)

UTC = timezone.utc
T0 = datetime(2026, 1, 31, 23, 59, 59, 123456, tzinfo=UTC)
BAD_IDS = [
    "", "../etc", "..", "a..b", "a/b", "/abs", "cam+1", "cam#", "cam\x00", "cam\n", "cam\t",
    ".hidden", "-dash", "_under", "caf\u00e9", "cam 1", "x" * (MAX_ID_LENGTH + 1), "$SYS", "a\\b",
]


def _meta(**overrides: object) -> FrameMetadata:
    jpeg = b"\xff\xd8 not really a jpeg \xff\xd9"
    fields = dict(device_id="cam1", frame_id="f1", captured_at=T0, seq=3, width=64, height=48,
                  sha256=hashlib.sha256(jpeg).hexdigest())
    fields.update(overrides)
    return FrameMetadata(**fields)  # type: ignore[arg-type]


# --- ids, topics, keys --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["cam1", "A", "dev.9_x-1", "x" * MAX_ID_LENGTH, "2026-01-31T12.00.00Z"])
def test_safe_ids_pass(value: str) -> None:
    assert validate_id(value, "device_id") == value


@pytest.mark.parametrize("value", BAD_IDS)
def test_ids_that_could_escape_are_refused_with_a_reason(value: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(value, "device_id")
    assert "device_id" in str(info.value)


@pytest.mark.parametrize("value", [None, 5, b"cam1", ["cam1"]])
def test_non_string_ids_are_refused(value: object) -> None:
    with pytest.raises(InvalidIdError, match="must be a string"):
        validate_id(value)


@given(st.text(max_size=200))
def test_validate_id_accepts_only_topic_and_key_safe_strings(value: str) -> None:
    try:
        validate_id(value)
    except InvalidIdError:
        return
    assert not set(value) & set("/+#\x00\n\r\\ ")
    assert ".." not in value and 0 < len(value) <= MAX_ID_LENGTH and value.isascii()


@pytest.mark.parametrize("prefix", ["framecap", "site-1/framecap", "a.b_c"])
def test_valid_prefixes(prefix: str) -> None:
    assert Topics(prefix).frames("cam1") == f"{prefix}/cam1/frames"


@pytest.mark.parametrize("prefix", ["", "/framecap", "framecap/", "a//b", "a/+/b", "#", "$SYS", "a/../b", "fc\n"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_prefix(prefix)


def test_topics_build_and_parse() -> None:
    t = Topics("framecap")
    assert [t.frames("c"), t.acks("c"), t.captions("c"), t.status("c")] == [
        "framecap/c/frames", "framecap/c/acks", "framecap/c/captions", "framecap/c/status"]
    assert t.all_devices("frames") == "framecap/+/frames"
    assert t.shared("ingest", "frames") == "$share/ingest/framecap/+/frames"
    assert t.parse("framecap/cam-1/captions") == ("cam-1", "captions")
    assert t.alerts("c") == "framecap/c/alerts" and t.all_devices("alerts") == "framecap/+/alerts"
    assert t.parse("framecap/cam-1/alerts") == ("cam-1", "alerts")
    with pytest.raises(InvalidIdError):
        t.alerts("a/b")
    for bad in ["framecap/a/b/frames", "other/cam/frames", "framecap/cam/video", "framecap/../frames",
                "framecap/+/frames", "framecap/cam/frames/"]:
        with pytest.raises(InvalidIdError):
            t.parse(bad)
    with pytest.raises(InvalidIdError):
        t.topic("cam", "nope")
    with pytest.raises(InvalidIdError):
        t.frames("a/b")
    with pytest.raises(InvalidIdError):
        t.shared("bad/group", "frames")


def test_keys_use_the_utc_date_and_round_trip() -> None:
    local = datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))  # 2026-02-28 in UTC
    key = frame_key("cam1", "f9", local)
    assert key == "frames/cam1/2026/02/28/f9.jpg"
    assert caption_key("cam1", "f9", local) == "captions/cam1/2026/02/28/f9.json"
    parsed = parse_frame_key(key)
    assert (parsed.device_id, parsed.year, parsed.month, parsed.day, parsed.frame_id) == ("cam1", 2026, 2, 28, "f9")
    assert parsed.caption_key == "captions/cam1/2026/02/28/f9.json"
    with pytest.raises(InvalidIdError):
        frame_key("cam1", "f9", datetime(2026, 1, 1))  # naive
    with pytest.raises(InvalidIdError):
        frame_key("../x", "f9", T0)


@pytest.mark.parametrize("key", [
    "frames/cam1/2026/1/01/f.jpg", "frames/cam1/2026/01/01/f.png", "frames/../2026/01/01/f.jpg",
    "frames/cam1/2026/01/01/..jpg", "captions/cam1/2026/01/01/f.jpg", "frames/cam1/2026/01/01/f.jpg\n",
    "frames/ca+m/2026/01/01/f.jpg", "frames/cam1/2026/01/01/a/b.jpg",
])
def test_bad_frame_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidIdError):
        parse_frame_key(key)


@pytest.mark.parametrize("key", [
    "frames/cam1/2026/13/01/f.jpg", "frames/cam1/2026/02/30/f.jpg", "frames/cam1/2026/00/10/f.jpg",
    "frames/cam1/2025/02/29/f.jpg", "frames/cam1/2026/04/31/f.jpg", "frames/cam1/0000/01/01/f.jpg",
])
def test_impossible_dates_in_frame_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidIdError, match="not a date"):
        parse_frame_key(key)
    assert parse_frame_key(key, check_date=False).date_error() is not None
    assert parse_frame_key("frames/cam1/2024/02/29/f.jpg").date_error() is None  # a leap day


# --- messages -----------------------------------------------------------------------------


def test_frame_metadata_round_trips_through_user_properties_and_s3_metadata() -> None:
    meta = _meta()
    props = meta.to_user_properties()
    assert all(name.startswith("fc-") for name, _ in props)
    assert FrameMetadata.from_user_properties([*props, ("other", "x")]) == meta
    s3 = {k.upper(): v for k, v in meta.to_s3_metadata().items()}  # case as some servers send it
    assert FrameMetadata.from_s3_metadata(s3) == meta
    assert meta.schema_version == SCHEMA_VERSION == 1


def test_frame_metadata_is_normalised_to_utc() -> None:
    meta = _meta(captured_at=datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))))
    assert meta.captured_at == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert meta.flat()["captured-at"] == "2026-01-01T00:00:00.000000Z"
    old = _meta(captured_at=datetime(999, 1, 2, tzinfo=UTC))
    assert old.flat()["captured-at"] == "0999-01-02T00:00:00.000000Z"
    assert FrameMetadata.from_s3_metadata(old.to_s3_metadata()) == old


@pytest.mark.parametrize(("change", "reason"), [
    ({"fc-schema": "2"}, "schema version"),
    ({"fc-device-id": "../cam"}, "device_id"),
    ({"fc-frame-id": "a/b"}, "frame_id"),
    ({"fc-captured-at": "2026-01-01T00:00:00"}, "captured_at"),
    ({"fc-seq": "-1"}, "seq"),
    ({"fc-width": "0"}, "width"),
    ({"fc-sha256": "XYZ"}, "sha256"),
])
def test_bad_frame_metadata_is_refused_with_the_field(change: dict[str, str], reason: str) -> None:
    props = dict(_meta().to_user_properties())
    props.update(change)
    with pytest.raises(MessageError, match=reason):
        FrameMetadata.from_user_properties(list(props.items()))


def test_an_unknown_schema_version_is_reported_before_missing_fields() -> None:
    v2 = [("fc-schema", "2"), ("fc-device-id", "cam1"), ("fc-frame-id", "f1")]  # other fields
    with pytest.raises(MessageError, match="schema version '2'"):
        FrameMetadata.from_user_properties(v2)
    with pytest.raises(MessageError, match="schema version"):
        FrameMetadata.from_s3_metadata({"schema": "2"})


def test_missing_repeated_or_absent_properties_are_refused() -> None:
    props = _meta().to_user_properties()
    with pytest.raises(MessageError, match="lacks fc|lacks sha256"):
        FrameMetadata.from_user_properties(props[:-1])
    with pytest.raises(MessageError, match="twice"):
        FrameMetadata.from_user_properties([*props, props[0]])
    with pytest.raises(MessageError):
        FrameMetadata.from_user_properties(None)


def test_check_payload_compares_the_hash() -> None:
    meta = _meta()
    meta.check_payload(b"\xff\xd8 not really a jpeg \xff\xd9")
    with pytest.raises(MessageError, match="sha256"):
        meta.check_payload(b"other")


def test_json_messages_round_trip_and_check_their_version() -> None:
    record = CaptionRecord(frame_id="f1", device_id="cam1", captured_at=T0, caption="a dog runs",
                           score=-3.2, model="sat-effnet", frame_key=frame_key("cam1", "f1", T0),
                           caption_key=caption_key("cam1", "f1", T0))
    assert CaptionRecord.from_json(record.to_json()).to_json() == record.to_json()  # NaN -> null
    ack = FrameAck(device_id="cam1", frame_id="f1", key=frame_key("cam1", "f1", T0))
    assert FrameAck.from_json(ack.to_json().decode()) == ack
    data = json.loads(record.to_json())
    for version in (2, None, "1", 0):
        data["schema_version"] = version
        with pytest.raises(MessageError, match="schema version"):
            CaptionRecord.from_json(json.dumps(data))
    data["schema_version"] = 1
    data["extra"] = "x"
    with pytest.raises(MessageError):
        CaptionRecord.from_json(json.dumps(data))


@pytest.mark.parametrize("payload", [
    b"", b"\xff\xfe\x00", b"[]", b"null", b'"text"', b"[" * 100_000,
    b'{"schema_version": 1, "seq": ' + b"9" * 5000 + b"}",
    b'{"schema_version": 1, "frame_id": "f", "device_id": "cam1", "captured_at": "0001-01-01T00:00:00+01:00",'
    b' "caption": "", "score": null, "model": "m", "frame_key": "k", "caption_key": "k"}',
])
def test_hostile_json_payloads_raise_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError):
        CaptionRecord.from_json(payload)


_names = st.sampled_from(["fc-schema", "fc-device-id", "fc-frame-id", "fc-captured-at", "fc-seq",
                          "fc-width", "fc-height", "fc-sha256", "fc-x", "other"])
_values = st.one_of(st.text(max_size=80), st.sampled_from(["1", "0", "-1", "cam1", "f1", "0" * 64,
                    "2026-01-31T12:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(_names, st.text(max_size=20)), _values), max_size=12))
def test_fuzz_frame_metadata_decoder_raises_only_message_error(props: list[tuple[str, str]]) -> None:
    try:
        meta = FrameMetadata.from_user_properties(props)
    except MessageError:
        return
    assert FrameMetadata.from_user_properties(meta.to_user_properties()) == meta


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=20)


_FIELDS = ["schema_version", "frame_id", "device_id", "captured_at", "caption", "score", "model",
           "frame_key", "caption_key", "error"]
_record_like = st.fixed_dictionaries({}, optional={
    f: st.one_of(_json, st.just(1), st.just("cam1"), st.just("2026-01-31T12:00:00Z")) for f in _FIELDS})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode()),
                 _record_like.map(lambda v: json.dumps(v).encode())))
def test_fuzz_caption_record_decoder_raises_only_message_error(payload: bytes) -> None:
    try:
        record = CaptionRecord.from_json(payload)
    except MessageError:
        return
    assert CaptionRecord.from_json(record.to_json()).to_json() == record.to_json()  # NaN -> null


def test_alert_message_round_trips_and_refuses_bad_fields() -> None:
    alert = AlertMessage(
        rule=AlertRuleRef(id="trucks", name="Trucks at night"), device_id="cam1", frame_id="f1",
        captured_at=T0, caption="a truck parked on a street", matched_words=["truck"],
        frame_key=frame_key("cam1", "f1", T0), caption_key=caption_key("cam1", "f1", T0),
        url="https://cams.example.org/frames/cam1/f1",
    )
    data = json.loads(alert.to_json())
    assert data["schema_version"] == SCHEMA_VERSION and data["rule"] == {"id": "trucks", "name": "Trucks at night"}
    assert data["captured_at"].startswith("2026-01-31T23:59:59.123456")
    assert set(data) == {"schema_version", "rule", "device_id", "frame_id", "captured_at", "caption",
                         "matched_words", "frame_key", "caption_key", "url"}
    assert AlertMessage.from_json(alert.to_json()) == alert
    for change in ({"device_id": "../x"}, {"frame_id": "a/b"}, {"captured_at": "2026-01-01T00:00:00"},
                   {"rule": {"id": "r"}}, {"extra": 1}, {"schema_version": 2}):
        with pytest.raises(MessageError):
            AlertMessage.from_json(json.dumps({**data, **change}))


_PAIR_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_PAIR_TEXT, _PAIR_TEXT), max_size=12))
def test_user_properties_pack_to_the_bytes_paho_packs(pairs: list[tuple[str, str]]) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from common.mqtt import UserProperties

    ours = UserProperties(pairs)
    theirs = Properties(PacketTypes.PUBLISH)
    if pairs:
        theirs.UserProperty = list(pairs)
    assert ours.pack() == theirs.pack()
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(ours.pack())
    assert getattr(back, "UserProperty", []) == pairs
    assert ours.isEmpty() == theirs.isEmpty()
    if pairs:
        assert str(ours) == str(theirs) and ours.json() == theirs.json()


def test_user_properties_over_the_utf8_string_limit_are_refused() -> None:
    from common.mqtt import UserProperties

    with pytest.raises(ValueError, match="over 65535 bytes"):
        UserProperties([("frame_id", "é" * 40000)])
    for bad in ("a\0b", "cam1\n", "x\x7f", "y\x85z"):
        with pytest.raises(ValueError, match="control character"):
            UserProperties([("frame_id", bad)])
    assert UserProperties([("k", "é✓ \u00a0 tab-free")]).pack()
    assert len(UserProperties([("k", "v" * 65535)]).pack()) == 1 + 3 + 2 + 1 + 2 + 65535


def test_frame_ack_is_stored_or_rejected_and_a_stored_ack_reads_as_before() -> None:
    from common.messages import FrameAck

    stored = FrameAck(device_id="cam1", frame_id="f1", key="frames/cam1/2026/01/31/f1.jpg")
    # byte for byte the ack of the versions before rejections (extra="forbid" there)
    assert json.loads(stored.to_json()) == {"schema_version": 1, "device_id": "cam1", "frame_id": "f1",
                                            "key": "frames/cam1/2026/01/31/f1.jpg"}
    rejected = FrameAck(device_id="cam1", frame_id="f1", rejected="undecodable: no image")
    assert json.loads(rejected.to_json()) == {"schema_version": 1, "device_id": "cam1", "frame_id": "f1",
                                              "rejected": "undecodable: no image"}
    assert FrameAck.from_json(rejected.to_json()) == rejected
    for bad in ({}, {"key": "k", "rejected": "r"}):
        body = {"schema_version": 1, "device_id": "cam1", "frame_id": "f1", **bad}
        with pytest.raises(MessageError, match="either a key"):
            FrameAck.from_json(json.dumps(body))
