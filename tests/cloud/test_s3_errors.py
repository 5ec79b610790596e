"""What the ingest and the worker do with S3 errors that no retry heals (issue 8, items 9 and 10):
unit tests with a fake store, then the real SeaweedFS (wrong secret, missing bucket)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cloud_fakes import FakeCaptioner, FakeMqtt, FakeStore, jpeg_bytes, metadata_for
from pydantic import SecretStr

from cloud.ingest import IngestService, _Inbound
from cloud.service import Stopping, run_until_signal
from cloud.worker import CaptionWorker
from common.config import IngestConfig, S3Config, WorkerConfig
from common.storage import StorageError

REPO = Path(__file__).resolve().parents[2]
KEY = "frames/cam1/2026/01/31/f000001.jpg"
DENIED = StorageError("put_object(If-None-Match)", "fake", KEY, "AccessDenied (HTTP 403): denied",
                      code="AccessDenied", permanent=True)


def _ingest(create_bucket: bool = False) -> tuple[IngestService, FakeStore, FakeMqtt]:
    store, client = FakeStore(), FakeMqtt()
    config = IngestConfig(s3=S3Config(create_bucket=create_bucket))
    service = IngestService(config, store=store, client_id="test-ingest")  # type: ignore[arg-type]
    service._client = client  # type: ignore[assignment]
    return service, store, client


def _frame(mid: int = 1) -> _Inbound:
    payload = jpeg_bytes()
    return _Inbound("framecap/cam1/frames", payload, metadata_for(payload).to_user_properties(),
                    mid=mid, qos=1, generation=0)


def test_a_permanent_error_stops_the_ingest_at_once_and_leaves_the_frame_unacked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, store, client = _ingest()
    failures: list[StorageError] = []
    service.on_failure(failures.append)
    store.fail_next, store.fail_with = 1000, DENIED
    with caplog.at_level(logging.ERROR), pytest.raises(Stopping):
        service.handle(_frame())
    assert len(store.calls) == 1  # asked once: no retry loop
    assert failures == [DENIED] and service.failure is DENIED
    assert client.acks() == [] and client.published() == []
    assert "asking again will not help" in caplog.text and "AccessDenied" in caplog.text
    assert "check its policy" in caplog.text


def test_an_outage_is_still_retried_until_s3_answers() -> None:
    service, store, client = _ingest()
    store.fail_next = 2  # plain StorageError: not permanent
    service.handle(_frame())
    assert service.failure is None and len(client.acks()) == 1 and service.counters["stored"] == 1


def test_a_missing_bucket_is_created_when_allowed_and_the_frame_stored() -> None:
    service, store, client = _ingest(create_bucket=True)
    store.bucket_exists = False
    service.handle(_frame())
    assert store.buckets_created == 1 and KEY in store.objects
    assert service.failure is None and len(client.acks()) == 1


def test_a_missing_bucket_without_create_bucket_stops_with_the_hint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, store, client = _ingest(create_bucket=False)
    store.bucket_exists = False
    with caplog.at_level(logging.ERROR), pytest.raises(Stopping):
        service.handle(_frame())
    assert store.buckets_created == 0 and client.acks() == []
    assert service.failure is not None and service.failure.code == "NoSuchBucket"
    assert "s3.create_bucket: true" in caplog.text


def _worker(**config: object) -> tuple[CaptionWorker, FakeStore]:
    store = FakeStore()
    worker = CaptionWorker(WorkerConfig(**config), FakeCaptioner(), store=store,  # type: ignore[arg-type]
                           client_id="test-worker")
    worker._client = FakeMqtt()  # type: ignore[assignment]
    return worker, store


def test_the_worker_names_the_listing_that_failed(caplog: pytest.LogCaptureFixture) -> None:
    worker, store = _worker(list_interval_s=60.0)
    store.fail_next = 1
    store.fail_with = StorageError("list_objects_v2", "fake", "outbox/", "ConnectTimeoutError")
    worker._stop.clear()
    thread = threading.Thread(target=worker._list_loop, daemon=True)
    with caplog.at_level(logging.ERROR):
        thread.start()
        assert _wait(lambda: "S3 unavailable" in caplog.text)
        worker._stop.set()
        thread.join(5)
    assert "while listing outbox/" in caplog.text and "listing frames/" not in caplog.text


def test_a_permanent_listing_error_stops_the_worker() -> None:
    worker, store = _worker(list_interval_s=60.0)
    store.fail_next = 1
    store.fail_with = StorageError("list_objects_v2", "fake", "outbox/", "SignatureDoesNotMatch",
                                   code="SignatureDoesNotMatch", permanent=True)
    worker._stop.clear()
    worker._list_loop()  # returns: the worker has failed
    assert worker.failure is store.fail_with and worker._stop.is_set()
    assert "s3.secret_access_key" in worker.failure.hint


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the real SeaweedFS ---------------------------------------------------------------------


def test_ingest_with_a_wrong_secret_exits_at_start_naming_the_cause(stack_ns, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``framecap ingest`` with a wrong S3 secret: exit 1 at start with the cause, no retry loop
    and no "started"."""
    bucket = stack_ns.ensure_bucket()
    key_id, _ = stack_ns.stack.s3_credentials()
    config = tmp_path / "ingest.yaml"
    config.write_text(f"mqtt:\n  host: 127.0.0.1\n  port: {stack_ns.stack.mqtt_port}\n"
                      f"  username: ingest\ns3:\n  endpoint_url: {stack_ns.stack.s3_endpoint}\n"
                      f"  bucket: {bucket}\n")
    env = {"PATH": "/usr/bin:/bin", "FRAMECAP_MQTT_PASSWORD": stack_ns.stack.password("ingest"),
           "FRAMECAP_S3_ACCESS_KEY_ID": key_id, "FRAMECAP_S3_SECRET_ACCESS_KEY": "wrong-secret-value"}
    done = subprocess.run([sys.executable, "-m", "common.cli", "ingest", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot start" in done.stderr and "SignatureDoesNotMatch" in done.stderr
    assert "$FRAMECAP_S3_SECRET_ACCESS_KEY" in done.stderr
    assert "wrong-secret-value" not in done.stderr and "started" not in done.stderr


def test_worker_with_a_wrong_key_id_exits_at_start_naming_the_cause(
    stack_ns, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    config = WorkerConfig(mqtt=stack_ns.mqtt_config("worker"),
                          s3=stack_ns.s3_config().model_copy(
                              update={"access_key_id": SecretStr("NOSUCHKEYID")}))
    worker = CaptionWorker(config, FakeCaptioner(), client_id=stack_ns.client_id("worker"))
    assert run_until_signal(worker, "worker") == 1
    err = capsys.readouterr().err
    assert "cannot start" in err and "InvalidAccessKeyId" in err and "s3.access_key_id" in err
    assert worker._client is None  # never connected to the broker


def test_a_missing_bucket_at_start(stack_ns) -> None:  # type: ignore[no-untyped-def]
    """create_bucket off: the ingest does not start, and says why; on: it creates the bucket."""
    missing = stack_ns.stack.s3_config(f"{stack_ns.bucket}-missing")
    service = IngestService(IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=missing),
                            client_id=stack_ns.client_id("ingest"))
    with pytest.raises(StorageError) as info:
        service.start()
    assert info.value.permanent and info.value.code == "NoSuchBucket"
    assert "s3.create_bucket: true" in info.value.hint and service._client is None

    allowed = missing.model_copy(update={"create_bucket": True})
    service = IngestService(IngestConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=allowed),
                            client_id=stack_ns.client_id("ingest"))
    service.start()
    try:
        assert stack_ns.stack.storage(allowed.bucket).ensure_bucket() is False  # it exists now
    finally:
        service.stop(timeout=2)


def test_a_bucket_deleted_under_a_running_worker_is_created_again(stack_ns, wait_until) -> None:  # type: ignore[no-untyped-def]
    """The bucket vanishes (first start racing SeaweedFS, or deleted): with create_bucket the
    worker's next listing creates it instead of retrying NoSuchBucket forever."""
    s3 = stack_ns.s3_config(create_bucket=True)
    store = stack_ns.storage()
    worker = CaptionWorker(WorkerConfig(mqtt=stack_ns.mqtt_config("worker"), s3=s3,
                                        list_interval_s=0.5),
                           FakeCaptioner(), client_id=stack_ns.client_id("worker"))
    worker.start(mqtt_enabled=False)
    try:
        assert wait_until(lambda: "listed" in worker.counters, 10)  # a first pass is done
        store.client.delete_bucket(Bucket=s3.bucket)
        assert wait_until(lambda: _bucket_exists(store), 20), "the worker did not create the bucket"
        assert worker.failure is None
    finally:
        worker.stop(timeout=5)


def _bucket_exists(store) -> bool:  # type: ignore[no-untyped-def]
    return any(b["Name"] == store.bucket for b in store.client.list_buckets().get("Buckets", []))
