"""Unit tests of CaptionWorker with a fake store, captioner and MQTT client."""

from __future__ import annotations

import time

import cv2
import numpy as np
from cloud_fakes import CAPTURED_AT, FakeCaptioner, FakeMqtt, FakeStore, jpeg_bytes, metadata_for

from cloud.worker import CaptionWorker, decode_image
from common.config import WorkerConfig
from common.messages import CaptionRecord
from common.topics import parse_frame_key

FRAME = "frames/cam1/2026/01/31/f000001.jpg"
CAPTION = "captions/cam1/2026/01/31/f000001.json"


def make_worker(
    captioner: FakeCaptioner | None = None, **config: object
) -> tuple[CaptionWorker, FakeStore, FakeMqtt]:
    store, client = FakeStore(), FakeMqtt()
    worker = CaptionWorker(
        WorkerConfig(**config), captioner or FakeCaptioner(), store=store, client_id="test-worker"
    )
    worker._client = client  # type: ignore[assignment]
    return worker, store, client


def put_frame(
    store: FakeStore, key: str = FRAME, body: bytes | None = None, meta: bool = True
) -> None:
    body = jpeg_bytes() if body is None else body
    metadata = metadata_for(body).to_s3_metadata() if meta else {}
    store.objects[key] = (body, metadata, "image/jpeg")


def record(store: FakeStore, key: str = CAPTION) -> CaptionRecord:
    return CaptionRecord.from_json(store.objects[key][0])


def test_a_frame_is_captioned_written_and_published() -> None:
    worker, store, client = make_worker()
    put_frame(store)
    worker.process_batch([FRAME])
    rec = record(store)
    assert rec.caption == "a picture 64 wide" and rec.score == -1.5 and rec.error is None
    assert (rec.device_id, rec.frame_id, rec.frame_key, rec.caption_key) == (
        "cam1",
        "f000001",
        FRAME,
        CAPTION,
    )
    assert rec.captured_at == CAPTURED_AT and rec.model == "fake-captioner"
    [(_, topic, payload, qos)] = client.published()
    assert topic == "framecap/cam1/captions" and qos == 1 and payload == store.objects[CAPTION][0]
    assert worker.counters["captioned"] == 1


def test_a_frame_without_metadata_is_captioned_from_its_key() -> None:
    worker, store, _ = make_worker()
    put_frame(store, meta=False)
    worker.process_batch([FRAME])
    assert record(store).captured_at is None and record(store).caption


def test_a_non_image_object_gets_an_error_record() -> None:
    worker, store, client = make_worker()
    store.objects[FRAME] = (b"%PDF-1.4 not an image", {}, "application/pdf")
    worker.process_batch([FRAME])
    rec = record(store)
    assert rec.caption == "" and rec.score is None and "not an image" in (rec.error or "")
    assert worker.counters["errors"] == 1 and len(client.published()) == 1


def test_an_impossible_date_in_the_key_gets_an_error_record() -> None:
    worker, store, _ = make_worker()
    key = "frames/cam1/2026/13/45/f1.jpg"
    put_frame(store, key)
    worker.process_batch([key])
    assert "not a date" in (record(store, "captions/cam1/2026/13/45/f1.json").error or "")


def test_a_key_outside_the_contract_is_logged_once_and_skipped() -> None:
    worker, store, _ = make_worker()
    put_frame(store, "frames/loose.jpg")
    put_frame(store, "frames/cam1/2026/01/31/bad+id.jpg")
    assert worker.scan() == 0
    assert worker.scan() == 0
    assert worker.counters["bad_keys"] == 2
    assert not any(k.startswith("captions/") for k in store.objects)


def test_an_existing_caption_is_skipped_and_never_rewritten() -> None:
    worker, store, client = make_worker()
    put_frame(store)
    store.objects[CAPTION] = (b"{}", {}, "application/json")
    assert worker.scan() == 0  # the listing sees the caption
    worker.process_batch([FRAME])  # a notification checks again
    assert store.objects[CAPTION][0] == b"{}" and client.published() == []
    assert worker.counters["skipped"] == 1
    assert not [k for k in store.objects if k.startswith("outbox/")]  # its marker went again
    assert not worker._open_markers


def test_a_frame_waits_one_s3_round_trip_not_three() -> None:
    """Issue 9: caption exists?, the object and the outbox marker are asked for at once."""
    import threading

    delay = 0.2

    class SlowStore(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.most = self.now = 0
            self.count_lock = threading.Lock()

        def _slow(self) -> None:
            with self.count_lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(delay)
            with self.count_lock:
                self.now -= 1

        def exists(self, key):  # type: ignore[no-untyped-def]
            self._slow()
            return super().exists(key)

        def get_object(self, key):  # type: ignore[no-untyped-def]
            self._slow()
            return super().get_object(key)

        def put(self, key, body, **kw):  # type: ignore[no-untyped-def]
            self._slow()
            return super().put(key, body, **kw)

        def put_if_absent(self, key, body, **kw):  # type: ignore[no-untyped-def]
            self._slow()
            return super().put_if_absent(key, body, **kw)

    store = SlowStore()
    worker = CaptionWorker(WorkerConfig(), FakeCaptioner(), store=store, client_id="test-worker")
    put_frame(store)
    started = time.monotonic()
    job = worker._prepare(FRAME)
    assert job is not None and job.image is not None and job.marker in store.objects
    assert store.most == 3 and time.monotonic() - started < 2.5 * delay


def test_scan_queues_each_missing_frame_once() -> None:
    worker, store, _ = make_worker()
    for i in range(3):
        put_frame(store, f"frames/cam1/2026/01/31/f{i}.jpg")
    store.objects["captions/cam1/2026/01/31/f0.json"] = (b"{}", {}, "application/json")
    assert worker.scan() == 2
    assert worker.scan() == 0  # already queued
    assert not worker.request("frames/cam1/2026/01/31/f1.jpg")
    assert worker.backlog == 2


def _ready(worker: CaptionWorker, n: int, start: int = 0) -> None:
    """Put ``n`` fetched frames in front of the model (what the fetch stage does)."""
    from cloud.worker import _Job
    from common.topics import parse_frame_key

    for i in range(start, start + n):
        key = f"frames/cam1/2026/01/31/f{i}.jpg"
        worker._ready.put(_Job(key, parse_frame_key(key)))


def test_an_idle_model_takes_a_lone_frame_at_once_despite_max_wait() -> None:
    """Issue 9: adaptive batching; max_wait_s 0.5 cost a lone frame 0.5 s before."""
    worker, _, _ = make_worker(batch_size=4, max_wait_s=0.5)
    _ready(worker, 1)
    started = time.monotonic()
    assert len(worker._next_batch()) == 1
    assert time.monotonic() - started < 0.1
    assert worker._next_batch() == []


def test_a_batch_takes_what_was_fetched_meanwhile_up_to_batch_size() -> None:
    worker, _, _ = make_worker(batch_size=4, max_wait_s=0.5)
    _ready(worker, 6)
    started = time.monotonic()
    assert len(worker._next_batch()) == 4
    assert len(worker._next_batch()) == 2
    assert time.monotonic() - started < 0.1  # nothing being fetched: no wait


def test_a_batch_waits_for_frames_being_fetched_at_most_max_wait() -> None:
    import threading

    worker, _, _ = make_worker(batch_size=4, max_wait_s=0.3)
    _ready(worker, 1)
    with worker._lock:
        worker._fetching = 2  # two frames on their way
    def arrive() -> None:
        time.sleep(0.05)
        _ready(worker, 1, start=1)
    threading.Thread(target=arrive).start()
    started = time.monotonic()
    assert len(worker._next_batch()) == 2  # waited for the fetched one, then for max_wait
    waited = time.monotonic() - started
    assert 0.25 <= waited < 1.0


def test_the_model_runs_while_the_previous_batch_is_written() -> None:
    """Issue 9: S3 writes of one batch overlap the model's next batch."""
    import threading

    release = threading.Event()
    writing = threading.Event()

    class SlowStore(FakeStore):
        def put_if_absent(self, key, body, **kw):  # type: ignore[no-untyped-def]
            if key.startswith("captions/"):  # the record writes (markers are written this way too)
                writing.set()
                release.wait(5)
            return super().put_if_absent(key, body, **kw)

    captioner = FakeCaptioner()
    store = SlowStore()
    worker = CaptionWorker(WorkerConfig(batch_size=1, list_interval_s=60), captioner, store=store,
                           client_id="test-worker")
    keys = [f"frames/cam1/2026/01/31/f{i}.jpg" for i in range(3)]
    for key in keys:
        put_frame(store, key)
    worker.start(mqtt_enabled=False)
    try:
        for key in keys:
            worker.request(key)
        assert writing.wait(5)
        deadline = time.monotonic() + 5
        while len(captioner.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(captioner.batches) >= 2  # the second batch ran while the first is written
        release.set()
        while worker.counters.get("captioned", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.counters.get("captioned") == 3
    finally:
        release.set()
        worker.stop()
    assert not [k for k in store.objects if k.startswith("outbox/")]


def test_a_listing_never_takes_the_marker_of_a_frame_being_captioned() -> None:
    """The marker is written before the model runs; a listing then must not republish it
    (its record does not exist yet) nor delete it."""
    worker, store, client = make_worker()
    put_frame(store)
    job = worker._prepare(FRAME)
    assert job is not None and job.marker is not None and job.marker in store.objects
    worker.scan()  # the first listing: own markers would be due
    assert job.marker in store.objects and client.published() == []
    worker._caption([job])
    worker._write_batch([job])
    assert record(store).caption and len(client.published()) == 1


def test_the_model_gets_one_batch_and_a_failing_image_gets_an_error_record() -> None:
    captioner = FakeCaptioner(fail_on_red=True)
    worker, store, _ = make_worker(captioner)
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 2] = 255  # BGR: red
    ok, red_jpeg = cv2.imencode(".jpg", red)
    keys = [f"frames/cam1/2026/01/31/f{i}.jpg" for i in range(3)]
    put_frame(store, keys[0])
    put_frame(store, keys[1], red_jpeg.tobytes(), meta=False)
    put_frame(store, keys[2])
    worker.process_batch(keys)
    assert captioner.batches == [3, 1, 1, 1]  # the batch, then one by one
    errors = [record(store, f"captions/cam1/2026/01/31/f{i}.json").error for i in range(3)]
    assert errors[0] is None and errors[2] is None and "cannot stand red" in (errors[1] or "")


def test_s3_outage_while_captioning_is_retried() -> None:
    worker, store, _ = make_worker()
    put_frame(store)
    store.fail_next = 2
    worker.process_batch([FRAME])
    assert record(store).caption and worker.counters["s3_errors"] == 2


def test_decode_image_gives_rgb_and_refuses_garbage() -> None:
    bgr = np.zeros((8, 10, 3), np.uint8)
    bgr[..., 0] = 255  # blue
    ok, png = cv2.imencode(".png", bgr)
    rgb = decode_image(png.tobytes(), max_pixels=1000)
    assert rgb.shape == (8, 10, 3) and rgb[0, 0].tolist() == [0, 0, 255]
    for bad in (b"", b"\xff\xd8\xff", jpeg_bytes()[:300]):
        try:
            decode_image(bad, max_pixels=10**6)
        except ValueError:
            continue
        raise AssertionError(f"decoded {bad[:10]!r}")


def test_worker_runs_on_listings_alone() -> None:
    from datetime import datetime, timezone

    today = f"{datetime.now(timezone.utc):%Y/%m/%d}"
    worker, store, _ = make_worker(list_interval_s=0.2, max_wait_s=0.05)
    worker._client = None
    put_frame(store)
    worker.start(mqtt_enabled=False)
    try:
        # appears after the first listing (a full one); a periodic one lists only recent days
        put_frame(store, f"frames/cam2/{today}/late.jpg")
        deadline = time.monotonic() + 5
        while worker.counters.get("captioned", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert worker.counters["captioned"] == 2
    assert f"captions/cam2/{today}/late.json" in store.objects


class _Message:
    def __init__(self, payload: bytes, topic: str = "framecap/cam1/acks") -> None:
        self.payload, self.topic = payload, topic


def test_a_frame_ack_queues_its_key_and_garbage_is_ignored() -> None:
    from common.messages import FrameAck

    worker, _, _ = make_worker()
    worker._on_ack(_Message(b"\x00\x01 not json"))
    worker._on_ack(_Message(b'{"schema_version": 9}'))
    ack = FrameAck(device_id="cam1", frame_id="f000001", key=FRAME)
    worker._on_ack(_Message(ack.to_json()))
    worker._on_ack(_Message(ack.to_json()))  # twice: queued once
    assert worker.backlog == 1 and worker.counters["notified"] == 2
    assert worker._queue.get_nowait() == FRAME
    # a rejection (the ingest refused the frame): nothing stored, nothing to caption
    worker._on_ack(_Message(FrameAck(device_id="cam1", frame_id="f000002",
                                     rejected="undecodable: OpenCV cannot decode the JPEG").to_json()))
    assert worker.backlog == 1 and worker._queue.empty() and worker.counters["rejections_seen"] == 1
    assert worker.counters["notified"] == 2


def test_a_caption_publish_the_broker_refuses_keeps_its_outbox_marker(
    stack_ns, wait_until, caplog  # type: ignore[no-untyped-def]
) -> None:
    """Issue 8 item 1: a worker whose account may not publish captions (here the ingest's
    account: the ACL refuses with PUBACK 135) keeps the marker, so the caption is published
    again later instead of being lost; the refusal is logged at ERROR once for the topic."""
    import logging
    from datetime import datetime, timezone

    caplog.set_level(logging.INFO)
    config = WorkerConfig(mqtt=stack_ns.mqtt_config("ingest"), s3=stack_ns.s3_config(),
                          list_interval_s=0.3, max_wait_s=0.05)
    store = stack_ns.storage()
    client_id = stack_ns.client_id("worker")
    worker = CaptionWorker(config, FakeCaptioner(), store=store, client_id=client_id)
    today = f"{datetime.now(timezone.utc):%Y/%m/%d}"  # a periodic listing lists recent days only
    frame, caption = f"frames/cam1/{today}/f000001.jpg", f"captions/cam1/{today}/f000001.json"
    marker = f"outbox/{client_id}/{caption}"
    worker.start()
    try:
        assert worker.wait_connected(10)
        store.put(frame, jpeg_bytes(), content_type="image/jpeg")
        assert wait_until(lambda: worker.counters.get("publish_refused", 0) >= 1, 15)
        assert store.exists(caption)
        # a later listing publishes it again (refused again: the marker still stays)
        assert wait_until(lambda: worker.counters.get("republished", 0) >= 1
                          and worker.counters.get("publish_refused", 0) >= 2, 15)
        worker._clear_outbox()
        assert store.exists(marker)
    finally:
        worker.stop()
    topic = stack_ns.topics.captions("cam1")
    errors = [r.getMessage() for r in caplog.records
              if r.name == "common.mqtt" and r.levelno >= logging.ERROR and topic in r.getMessage()]
    assert len(errors) == 1 and "not authorized" in errors[0]


def test_frames_fetched_but_not_captioned_at_stop_leave_no_marker() -> None:
    worker, store, _ = make_worker()
    put_frame(store)
    assert worker._slots.acquire(timeout=1)
    free = worker._slots._value
    job = worker._prepare(FRAME)
    assert job is not None and job.marker in store.objects
    worker._ready.put(job)
    worker._drop_fetched()
    assert job.marker not in store.objects and not worker._open_markers
    assert worker._slots._value == free + 1 and worker.backlog == 0


def test_an_earlier_runs_marker_for_a_written_caption_is_published_not_deleted() -> None:
    """A worker killed after writing a record and before its PUBACK leaves its marker. When the
    restarted worker (same client_id) meets that frame again (a redelivered ack), it finds the
    caption written and the marker there: it must publish the record, not delete the marker
    (which would lose the caption for the device)."""
    store = FakeStore()
    worker = CaptionWorker(WorkerConfig(), FakeCaptioner(), store=store, client_id="test-worker")
    put_frame(store)
    frame = parse_frame_key(FRAME)
    record = CaptionRecord(frame_id=frame.frame_id, device_id=frame.device_id, captured_at=None,
                           caption="a dog", score=-1.0, model="m", frame_key=FRAME,
                           caption_key=frame.caption_key)
    store.put(frame.caption_key, record.to_json())
    marker = worker._outbox.marker(frame.caption_key)
    store.put(marker, b"")  # the earlier run's marker
    published: list[tuple[str, bytes, str]] = []
    worker._publish_caption = lambda device_id, body, m: published.append((device_id, body, m))  # type: ignore[method-assign]
    assert worker._prepare(FRAME) is None
    assert published == [(frame.device_id, record.to_json(), marker)]
    assert marker in store.objects  # the PUBACK deletes it, not this
    # without an earlier marker, a frame already captioned is skipped and leaves no marker
    store.delete(marker)
    published.clear()
    assert worker._prepare(FRAME) is None
    assert published == [] and marker not in store.objects
