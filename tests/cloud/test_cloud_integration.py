"""The ingest and the caption worker against the real local mosquitto (passwords + ACL) and
SeaweedFS: frames stored exactly once and acked, bad payloads counted and skipped, objects
dropped into frames/ captioned, non-images given error records."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import cv2
import numpy as np
import pytest
from cloud_fakes import IMAGES, jpeg_bytes
from mqtt_subacks import SubackWatch

from cloud.ingest import IngestService
from cloud.validation import jpeg_dimensions
from cloud.worker import CaptionWorker
from common.config import IngestConfig, WorkerConfig
from common.messages import CaptionRecord, FrameAck, FrameMetadata
from common.topics import Topics, frame_key

pytestmark = pytest.mark.integration
NOW = datetime(2026, 1, 31, 12, 0, 0, tzinfo=timezone.utc)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def real_jpeg(index: int = 0) -> bytes:
    paths = sorted(IMAGES.glob("*.jpg"))
    if not paths:
        pytest.skip(f"no images in {IMAGES}")
    return paths[index].read_bytes()


def frame_props(payload: bytes, device_id: str, frame_id: str, **override: object) -> list:
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    height, width = image.shape[:2] if image is not None else (1, 1)
    fields = {
        "device_id": device_id,
        "frame_id": frame_id,
        "captured_at": NOW,
        "seq": 0,
        "width": width,
        "height": height,
        "sha256": hashlib.sha256(payload).hexdigest(),
    } | override
    return FrameMetadata(**fields).to_user_properties()


def start_ingest(stack, prefix: str, **fields: object) -> IngestService:
    config = IngestConfig(
        mqtt=stack.mqtt_config("ingest", topic_prefix=prefix),
        s3=stack.s3_config(),
        share_group="ingest",
        **fields,
    )
    service = IngestService(config, client_id=f"ingest-{prefix}")
    with SubackWatch() as subacks:
        service.start()
        assert service.wait_connected(10)
        subacks.wait_for(service)  # the broker has the subscriptions (SUBACK)
    return service


def test_frame_published_twice_is_stored_once_acked_and_acknowledged(cloud_stack, prefix, device):
    topics = Topics(prefix)
    frame_id = "f-" + uuid.uuid4().hex[:8]
    payload = real_jpeg(0)
    cam = device("cam1")
    cam.listen(topics.acks("cam1"))
    service = start_ingest(cloud_stack, prefix)
    try:
        props = frame_props(payload, "cam1", frame_id)
        for _ in range(2):
            cam.client.publish(topics.frames("cam1"), payload, qos=1, user_properties=props)
        wait_for(
            lambda: service.counters.get("stored", 0) + service.counters.get("duplicates", 0) >= 2,
            what="both copies handled",
        )
        wait_for(lambda: len(cam.messages(topics.acks("cam1"))) >= 2, what="the FrameAcks")
    finally:
        service.stop()
    assert service.counters["stored"] == 1 and service.counters["duplicates"] == 1
    key = frame_key("cam1", frame_id, NOW)
    stored = cloud_stack.storage().get_object(key)
    assert stored.body == payload and stored.content_type == "image/jpeg"
    assert FrameMetadata.from_s3_metadata(stored.metadata).frame_id == frame_id
    ack = FrameAck.from_json(cam.messages(topics.acks("cam1"))[0])
    assert (ack.device_id, ack.frame_id, ack.key) == ("cam1", frame_id, key)
    # Both messages were PUBACKed after the put: a restart with the same session gets nothing.
    # A new frame published after the restart is queued behind anything the broker still held
    # for the session, so once it is handled a redelivery would have been handled before it.
    again = start_ingest(cloud_stack, prefix)
    try:
        later = "f-" + uuid.uuid4().hex[:8]
        cam.client.publish(topics.frames("cam1"), payload, qos=1,
                           user_properties=frame_props(payload, "cam1", later))
        wait_for(lambda: again.counters.get("stored", 0) >= 1, what="the frame sent after the restart")
    finally:
        again.stop()
    assert again.counters.get("received", 0) == 1 and again.counters.get("duplicates", 0) == 0


def test_invalid_payloads_are_counted_and_skipped(cloud_stack, prefix, device):
    topics = Topics(prefix)
    run = uuid.uuid4().hex[:8]
    good = real_jpeg(1)
    big = jpeg_bytes(320, 240, seed=3)  # noise: far over the 40 kB cap below
    assert len(big) > 40_000 > len(good)
    truncated = good[: len(good) // 2]
    w, h = jpeg_dimensions(good)
    noise = np.random.default_rng(0).bytes(5000)
    cam = device("cam1")
    service = start_ingest(cloud_stack, prefix, max_payload_bytes=40_000)
    bad = [
        (noise, frame_props(noise, "cam1", f"noise-{run}", width=10, height=10)),
        (truncated, frame_props(truncated, "cam1", f"trunc-{run}", width=w, height=h)),
        (good, []),
        (
            good,
            [
                (k, "7" if k == "fc-schema" else v)
                for k, v in frame_props(good, "cam1", f"v7-{run}")
            ],
        ),
        (good, frame_props(good, "cam2", f"other-{run}")),
        (big, frame_props(big, "cam1", f"big-{run}")),
    ]
    try:
        for payload, props in bad:
            cam.client.publish(topics.frames("cam1"), payload, qos=1, user_properties=props)
        cam.client.publish(
            topics.frames("cam1"),
            good,
            qos=1,
            user_properties=frame_props(good, "cam1", f"good-{run}"),
        )
        wait_for(lambda: service.counters.get("stored", 0) == 1, what="the valid frame")
    finally:
        service.stop()
    counts = service.counters
    expected = {
        "not_jpeg",
        "truncated_jpeg",
        "missing_metadata",
        "schema_version",
        "device_mismatch",
        "too_large",
    }
    assert {k.split(".", 1)[1] for k in counts if k.startswith("invalid.")} == expected
    assert counts["invalid"] == 6
    store = cloud_stack.storage()
    assert store.exists(frame_key("cam1", f"good-{run}", NOW))
    assert not store.exists(frame_key("cam1", f"big-{run}", NOW))


def test_worker_captions_a_dropped_image_and_records_a_non_image(
    cloud_stack, prefix, device, captioner
):
    topics = Topics(prefix)
    run = uuid.uuid4().hex[:8]
    image_key = f"frames/dev9/2026/01/31/drop-{run}.jpg"
    junk_key = f"frames/dev9/2026/01/31/junk-{run}.jpg"
    s3 = cloud_stack.storage().client  # plain boto3, as another tool would
    s3.put_object(Bucket=cloud_stack.bucket, Key=image_key, Body=real_jpeg(2))
    s3.put_object(Bucket=cloud_stack.bucket, Key=junk_key, Body=b"this is not a picture")
    dev = device("dev9")
    dev.listen(topics.captions("dev9"))
    config = WorkerConfig(
        mqtt=cloud_stack.mqtt_config("worker", topic_prefix=prefix),
        s3=cloud_stack.s3_config(),
        max_wait_s=0.1,
        list_interval_s=60,
    )
    worker = CaptionWorker(config, captioner, client_id=f"worker-{prefix}")
    worker.start()
    store = cloud_stack.storage()
    image_caption = f"captions/dev9/2026/01/31/drop-{run}.json"
    junk_caption = f"captions/dev9/2026/01/31/junk-{run}.json"
    try:
        wait_for(
            lambda: store.exists(image_caption) and store.exists(junk_caption),
            60,
            "both caption records",
        )
        wait_for(
            lambda: len(dev.messages(topics.captions("dev9"))) >= 2, 10, "captions at the device"
        )
    finally:
        worker.stop()
    good = CaptionRecord.from_json(store.get(image_caption))
    assert good.caption and good.error is None and good.score is not None
    assert good.captured_at is None and good.frame_key == image_key and good.model == captioner.name
    junk = CaptionRecord.from_json(store.get(junk_caption))
    assert junk.caption == "" and junk.error and "not an image" in junk.error
    sent = {CaptionRecord.from_json(m).frame_key for m in dev.messages(topics.captions("dev9"))}
    assert {image_key, junk_key} <= sent


def test_ingest_then_worker_over_mqtt_notification(cloud_stack, prefix, device, captioner):
    """A frame published by a device comes back as a caption, found through the FrameAck
    (the listing interval is far longer than the test)."""
    topics = Topics(prefix)
    frame_id = "n-" + uuid.uuid4().hex[:8]
    cam = device("cam1")
    cam.listen(topics.captions("cam1"))
    worker = CaptionWorker(
        WorkerConfig(
            mqtt=cloud_stack.mqtt_config("worker", topic_prefix=prefix),
            s3=cloud_stack.s3_config(),
            max_wait_s=0.1,
            list_interval_s=3600,
        ),
        captioner,
        client_id=f"worker-{prefix}",
    )
    with SubackWatch() as subacks:
        worker.start()
        assert worker.wait_connected(10)
        subacks.wait_for(worker)  # it hears the FrameAcks
    ingest = start_ingest(cloud_stack, prefix)
    wait_for(lambda: "listed" in worker.counters, 10, "the first listing")  # done before the frame
    payload = real_jpeg(3)
    try:
        cam.client.publish(
            topics.frames("cam1"),
            payload,
            qos=1,
            user_properties=frame_props(payload, "cam1", frame_id),
        )
        wait_for(lambda: cam.messages(topics.captions("cam1")), 60, "the caption")
    finally:
        ingest.stop()
        worker.stop()
    record = CaptionRecord.from_json(cam.messages(topics.captions("cam1"))[0])
    assert record.frame_id == frame_id and record.captured_at == NOW and record.caption
    assert worker.counters.get("notified", 0) >= 1
    stored = cloud_stack.storage().get(record.caption_key)
    assert stored == cam.messages(topics.captions("cam1"))[0]  # the same JSON in S3 and MQTT


def test_s3_outage_holds_frames_unacked_until_s3_returns(cloud_stack, prefix, device):
    """SeaweedFS killed: the frame is neither acked nor dropped; after the restart it is
    stored once and acknowledged. Runs last here: it restarts the session's SeaweedFS."""
    topics = Topics(prefix)
    frame_id = "o-" + uuid.uuid4().hex[:8]
    payload = real_jpeg(4)
    cam = device("cam1")
    cam.listen(topics.acks("cam1"))
    service = start_ingest(cloud_stack, prefix)
    try:
        cloud_stack.kill_seaweedfs()
        cam.client.publish(
            topics.frames("cam1"),
            payload,
            qos=1,
            user_properties=frame_props(payload, "cam1", frame_id),
        )
        wait_for(lambda: service.counters.get("s3_errors", 0) >= 2, 30, "failed puts")
        assert service.counters.get("stored", 0) == 0 and not cam.messages(topics.acks("cam1"))
        cloud_stack.start_seaweedfs()
        wait_for(lambda: service.counters.get("stored", 0) == 1, 60, "the put after the outage")
        wait_for(lambda: cam.messages(topics.acks("cam1")), 10, "the FrameAck")
    finally:
        service.stop()
        if not cloud_stack.seaweedfs.running():
            cloud_stack.start_seaweedfs()
    assert cloud_stack.storage().get(frame_key("cam1", frame_id, NOW)) == payload
