"""Unit tests of IngestService.handle with a fake store and a fake MQTT client."""

from __future__ import annotations

import threading

import pytest
from cloud_fakes import FakeMqtt, FakeStore, jpeg_bytes, metadata_for

from cloud.ingest import IngestService, _Inbound
from cloud.service import Stopping as _Stopping
from common.config import IngestConfig
from common.messages import FrameAck

KEY = "frames/cam1/2026/01/31/f000001.jpg"


def make_service() -> tuple[IngestService, FakeStore, FakeMqtt]:
    store, client = FakeStore(), FakeMqtt()
    service = IngestService(IngestConfig(), store=store, client_id="test-ingest")
    service._client = client  # type: ignore[assignment]
    return service, store, client


def inbound(payload: bytes, props, mid: int = 1, topic: str = "framecap/cam1/frames") -> _Inbound:
    return _Inbound(topic, payload, list(props), mid=mid, qos=1, generation=0)


def test_stores_once_then_acks_then_publishes_frame_ack() -> None:
    service, store, client = make_service()
    payload = jpeg_bytes()
    props = metadata_for(payload).to_user_properties()
    service.handle(inbound(payload, props, mid=7))
    service.handle(inbound(payload, props, mid=8))  # a redelivery
    assert list(store.objects) == [KEY]
    body, meta, content_type = store.objects[KEY]
    assert body == payload and content_type == "image/jpeg"
    assert meta == metadata_for(payload).to_s3_metadata()
    assert [e[0] for e in client.events] == ["ack", "publish", "ack", "publish"]
    assert client.acks() == [("ack", 7, 1), ("ack", 8, 1)]
    ack = FrameAck.from_json(client.published("/acks")[0][2])
    assert (ack.device_id, ack.frame_id, ack.key) == ("cam1", "f000001", KEY)
    assert service.counters["stored"] == 1 and service.counters["duplicates"] == 1


def test_other_bytes_under_the_same_key_are_a_conflict_and_kept_out() -> None:
    service, store, client = make_service()
    first, second = jpeg_bytes(seed=1), jpeg_bytes(seed=2)
    service.handle(inbound(first, metadata_for(first).to_user_properties()))
    service.handle(inbound(second, metadata_for(second).to_user_properties(), mid=2))
    assert store.objects[KEY][0] == first
    assert service.counters["conflicts"] == 1
    assert len(client.acks()) == 2


def test_invalid_frame_is_counted_acked_and_not_stored() -> None:
    service, store, client = make_service()
    service.handle(inbound(b"\x00garbage", [], mid=3))
    payload = jpeg_bytes()
    service.handle(inbound(payload, metadata_for(payload).to_user_properties(), mid=4))
    assert service.counters["invalid"] == 1
    assert service.counters["invalid.missing_metadata"] == 1
    assert client.acks() == [("ack", 3, 1), ("ack", 4, 1)]
    assert len(client.published("/acks")) == 1
    assert list(store.objects) == [KEY]


def test_a_frame_refused_for_its_own_bytes_is_rejected_to_its_device() -> None:
    """The device is told (FrameAck with ``rejected``), so it drops the frame instead of
    resending it for ever; not for a message without metadata (no frame to name) nor for an
    unknown schema version (an upgraded ingest will take it)."""
    service, store, client = make_service()
    payload = jpeg_bytes()
    corrupt = payload[:-200] + b"\x00" * 200  # its sha256 no longer matches
    service.handle(inbound(corrupt, metadata_for(payload).to_user_properties(), mid=5))
    service.handle(inbound(b"\x00garbage", [], mid=6))
    newer = [(k, "9" if k == "fc-schema" else v) for k, v in metadata_for(payload).to_user_properties()]
    service.handle(inbound(payload, newer, mid=7))
    assert service.counters["invalid"] == 3 and not store.objects
    assert client.acks() == [("ack", 5, 1), ("ack", 6, 1), ("ack", 7, 1)]  # PUBACKs: no redelivery
    published = client.published("/acks")
    assert [topic for _, topic, *_ in published] == ["framecap/cam1/acks"]
    ack = FrameAck.from_json(published[0][2])
    assert (ack.device_id, ack.frame_id, ack.key) == ("cam1", "f000001", None)
    assert ack.rejected is not None and ack.rejected.startswith("sha256_mismatch: ")
    assert service.counters["rejections_published"] == 1
    assert "acks_published" not in service.counters


def test_rejections_are_budgeted_per_device() -> None:
    from cloud.ingest import RejectionBudget

    now = [0.0]
    budget = RejectionBudget(per_s=2.0, burst=5, devices=2, clock=lambda: now[0])
    assert [budget.take("cam1") for _ in range(7)] == [True] * 5 + [False] * 2  # a burst of 5
    assert budget.take("cam2")  # another device has its own budget
    now[0] += 1.0  # 2 a second come back
    assert [budget.take("cam1") for _ in range(3)] == [True, True, False]
    budget.take("cam3")  # a third device: the least recently refused (cam2) is forgotten
    now[0] += 100.0
    assert [budget.take("cam1") for _ in range(6)] == [True] * 5 + [False]  # never over the burst


def test_a_flood_of_bad_frames_draws_a_bounded_number_of_rejections() -> None:
    service, store, client = make_service()
    payload = jpeg_bytes()
    corrupt = payload[:-200] + b"\x00" * 200
    for mid in range(1, 81):  # 80 corrupt frames at once, each its own frame_id
        meta = metadata_for(payload).model_copy(update={"frame_id": f"f{mid:06d}"})
        service.handle(inbound(corrupt, meta.to_user_properties(), mid=mid))
    assert service.counters["invalid"] == 80 and len(client.acks()) == 80  # all PUBACKed
    from cloud.ingest import REJECTIONS_BURST

    assert len(client.published("/acks")) == service.counters["rejections_published"]
    assert REJECTIONS_BURST <= service.counters["rejections_published"] < 80
    assert service.counters["rejections_suppressed"] == 80 - service.counters["rejections_published"]


def test_s3_outage_is_retried_and_nothing_is_acked_before_the_put() -> None:
    service, store, client = make_service()
    store.fail_next = 2
    payload = jpeg_bytes()
    service.handle(inbound(payload, metadata_for(payload).to_user_properties()))
    assert list(store.objects) == [KEY]
    assert service.counters["s3_errors"] == 2
    assert [e[0] for e in client.events] == ["ack", "publish"]


def test_stop_during_an_outage_leaves_the_frame_unacked() -> None:
    service, store, client = make_service()
    store.fail_next = 10**6
    payload = jpeg_bytes()
    threading.Timer(0.3, service._stop.set).start()
    with pytest.raises(_Stopping):
        service.handle(inbound(payload, metadata_for(payload).to_user_properties()))
    assert client.events == [] and store.objects == {}


def test_a_message_from_an_earlier_connection_is_not_acked() -> None:
    service, store, client = make_service()
    payload = jpeg_bytes()
    item = inbound(payload, metadata_for(payload).to_user_properties())
    service._on_connected(True)  # reconnected after the message arrived: its mid is stale
    service.handle(item)
    assert client.acks() == []
    assert list(store.objects) == [KEY]


def test_frames_are_stored_in_parallel_and_pubacked_in_arrival_order() -> None:
    """Issue 9: a slow S3 put of one frame does not hold the next frame's put; the PUBACKs
    still go in the order the PUBLISHes came (MQTT 5.0, 4.6), each after its frame is stored."""
    release = threading.Event()
    second_stored = threading.Event()

    class SlowFirst(FakeStore):
        def put_if_absent(self, key, body, **kw):  # type: ignore[no-untyped-def]
            if key.endswith("f000001.jpg"):
                assert release.wait(5)
            created = super().put_if_absent(key, body, **kw)
            if key.endswith("f000002.jpg"):
                second_stored.set()
            return created

    store, client = SlowFirst(), FakeMqtt()
    service = IngestService(IngestConfig(), store=store, client_id="test-ingest", io_threads=4)
    service._client = client  # type: ignore[assignment]
    from concurrent.futures import ThreadPoolExecutor

    service._pool = ThreadPoolExecutor(4)
    threads = [threading.Thread(target=service._run), threading.Thread(target=service._ack_loop)]
    for thread in threads:
        thread.start()
    try:
        for mid, frame_id in ((1, "f000001"), (2, "f000002")):
            payload = jpeg_bytes(seed=mid)
            with service._lock:
                service._busy += 1
            service._queue.put(inbound(payload, metadata_for(payload, frame_id=frame_id)
                                       .to_user_properties(), mid=mid))
        assert second_stored.wait(5)  # stored while the first put still hangs
        assert client.acks() == []  # but not acked before the first
        release.set()
        deadline = threading.Event()
        for _ in range(100):
            if len(client.acks()) == 2:
                break
            deadline.wait(0.05)
        assert client.acks() == [("ack", 1, 1), ("ack", 2, 1)]
        assert len(client.published("/acks")) == 2
    finally:
        release.set()
        service._queue.put(None)
        for thread in threads:
            thread.join(5)
        service._pool.shutdown()
    assert service.counters["stored"] == 2 and service._busy == 0


def test_a_rejection_reason_carries_no_control_characters() -> None:
    """The device logs the reason: a newline from a frame's own metadata must not forge a line."""
    from cloud.validation import InvalidFrame

    service, _, client = make_service()
    service._publish_rejection(InvalidFrame("bad_metadata", "seq: 'x\nINFO forged'\x00", "cam1", "f1"))
    ack = FrameAck.from_json(client.published("/acks")[0][2])
    assert ack.rejected == "bad_metadata: seq: 'x?INFO forged'?"
