"""common.storage against the real SeaweedFS S3 (and one unreachable endpoint)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from pydantic import SecretStr

from common.config import S3Config
from common.messages import FrameMetadata
from common.stack import pick_port
from common.storage import (
    BucketNotFoundError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    is_permanent,
    make_s3_client,
)
from common.topics import frame_key


def _frame(device_id: str = "cam1", frame_id: str = "f000001") -> tuple[str, bytes, FrameMetadata]:
    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    captured_at = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone.utc)
    meta = FrameMetadata(device_id=device_id, frame_id=frame_id, captured_at=captured_at, seq=7,
                         width=640, height=480, sha256=hashlib.sha256(jpeg).hexdigest())
    return frame_key(device_id, frame_id, captured_at), jpeg, meta


def test_put_if_absent_keeps_the_first_bytes_and_metadata(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.storage()
    key, jpeg, meta = _frame()
    assert store.put_if_absent(key, jpeg, metadata=meta.to_s3_metadata(), content_type="image/jpeg")
    assert not store.put_if_absent(key, b"other bytes", metadata={"seq": "99"})
    got = store.get_object(key)
    assert got.body == jpeg
    assert got.content_type == "image/jpeg"
    assert FrameMetadata.from_s3_metadata(got.metadata) == meta


def test_frame_metadata_round_trips_through_s3_metadata(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.storage()
    key, jpeg, meta = _frame("dev.9_x-1", "2026-03-04T05.06.07Z-42")
    store.put(key, jpeg, metadata=meta.to_s3_metadata())
    back = FrameMetadata.from_s3_metadata(store.head_metadata(key))
    assert back == meta
    back.check_payload(store.get(key))


def test_list_keys_pages_through_every_key_in_order(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.storage()
    keys = [f"frames/cam1/2026/01/01/f{i:04d}.jpg" for i in range(23)]
    for k in keys:
        store.put(k, b"x")
    store.put("captions/cam1/2026/01/01/f0000.json", b"{}")
    assert list(store.list_keys("frames/", page_size=5)) == keys
    assert list(store.list_keys("frames/", start_after=keys[19], page_size=2)) == keys[20:]
    assert list(store.list_keys("captions/")) == ["captions/cam1/2026/01/01/f0000.json"]
    assert list(store.list_keys("nothing/")) == []


def test_missing_objects_and_buckets(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.storage()
    assert not store.exists("frames/none.jpg")
    with pytest.raises(ObjectNotFoundError) as info:
        store.get("frames/none.jpg")
    assert info.value.bucket == stack_ns.bucket and info.value.key == "frames/none.jpg"
    assert f"s3://{stack_ns.bucket}/frames/none.jpg" in str(info.value)
    with pytest.raises(ObjectNotFoundError):
        store.head_metadata("frames/none.jpg")
    store.delete("frames/none.jpg")  # deleting what is absent is fine

    fresh = stack_ns.stack.storage(f"{stack_ns.bucket}-new")
    with pytest.raises(BucketNotFoundError) as missing:  # not "object not found": the bucket
        list(fresh.list_keys("frames/"))
    assert missing.value.permanent and "s3.create_bucket" in missing.value.hint
    with pytest.raises(BucketNotFoundError):
        fresh.get("frames/none.jpg")
    with pytest.raises(BucketNotFoundError):
        fresh.probe()
    assert fresh.ensure_bucket() is True
    assert fresh.ensure_bucket() is False
    assert fresh.probe() is False


def test_probe_creates_a_missing_bucket_when_allowed(stack_ns) -> None:  # noqa: ANN001
    store = stack_ns.stack.storage(f"{stack_ns.bucket}-probe")
    assert store.probe(create_bucket=True) is True
    assert store.probe(create_bucket=True) is False and store.ensure_bucket() is False


@pytest.mark.parametrize(("field", "value", "code", "hint"), [
    ("secret_access_key", "wrong-secret", "SignatureDoesNotMatch", "s3.secret_access_key"),
    ("access_key_id", "NOSUCHKEY", "InvalidAccessKeyId", "s3.access_key_id"),
])
def test_wrong_credentials_are_permanent_and_named(stack_ns, field: str, value: str, code: str,  # noqa: ANN001
                                                   hint: str) -> None:
    config = stack_ns.s3_config().model_copy(update={field: SecretStr(value)})
    store = ObjectStore(config, max_attempts=1)
    for call in (store.probe, lambda: store.put_if_absent("frames/a/2026/01/01/b.jpg", b"x"),
                 lambda: list(store.list_keys("outbox/"))):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.permanent and info.value.code == code
        assert hint in info.value.hint and value not in str(info.value)
    with pytest.raises(StorageError) as head:  # a HEAD answer has no body: 403 alone
        store.head_metadata("frames/a/2026/01/01/b.jpg")
    assert head.value.permanent and head.value.code == "403"


def test_missing_credentials_are_permanent(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "FRAMECAP_S3_ACCESS_KEY_ID", "FRAMECAP_S3_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = ObjectStore(S3Config(endpoint_url=f"http://127.0.0.1:{pick_port()}", bucket="bkt"),
                        max_attempts=1)
    with pytest.raises(StorageError) as info:
        store.probe()
    assert info.value.permanent and info.value.code == "NoCredentialsError"
    assert "$FRAMECAP_S3_ACCESS_KEY_ID" in info.value.hint


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(("err", "permanent"), [
    (_client_error("SlowDown", 503), False),
    (_client_error("InternalError", 500), False),
    (_client_error("ServiceUnavailable", 503), False),
    (_client_error("RequestTimeout", 400), False),
    (_client_error("TooManyRequests", 429), False),
    (_client_error("PreconditionFailed", 412), False),
    (EndpointConnectionError(endpoint_url="http://x"), False),
    (_client_error("AccessDenied", 403), True),
    (_client_error("InvalidAccessKeyId", 403), True),
    (_client_error("NoSuchBucket", 404), True),
    (_client_error("PermanentRedirect", 301), True),
    (_client_error("InvalidArgument", 400), True),
    (NoCredentialsError(), True),
])
def test_what_can_heal_and_what_cannot(err: Exception, permanent: bool) -> None:
    assert is_permanent(err) is permanent


def test_errors_say_what_was_being_done() -> None:
    assert StorageError("list_objects_v2", "b", "outbox/", "x").action == "listing outbox/"
    assert StorageError("put_object(If-None-Match)", "b", "frames/k", "x").action == "writing frames/k"
    assert StorageError("head_bucket", "b", None, "x").action == "checking the bucket"


def test_unreachable_endpoint_raises_storage_error_without_secrets() -> None:
    config = S3Config(endpoint_url=f"http://127.0.0.1:{pick_port()}", bucket="framecap",
                      access_key_id=SecretStr("AKIDEXAMPLE"), secret_access_key=SecretStr("s3cr3t-value"))
    store = ObjectStore(config, connect_timeout_s=0.5, read_timeout_s=0.5, max_attempts=1)
    with pytest.raises(StorageError) as info:
        store.put_if_absent("frames/a/2026/01/01/b.jpg", b"x")
    assert "s3://framecap/frames/a/2026/01/01/b.jpg" in str(info.value)
    assert "s3cr3t-value" not in str(info.value) and "s3cr3t-value" not in repr(store)
    assert info.value.__cause__ is not None
    assert not info.value.permanent  # an outage: worth retrying


def test_client_uses_the_configured_region_and_path_style() -> None:
    config = S3Config(endpoint_url="http://127.0.0.1:1", region="eu-west-1", path_style=True,
                      access_key_id=SecretStr("a"), secret_access_key=SecretStr("b"))
    client = make_s3_client(config, read_timeout_s=7)
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.read_timeout == 7
