"""Two ingest replicas racing on one frame, against the real SeaweedFS (issue 8, item 18).

A frame can reach two ingest replicas at once (a redelivery after one replica's session
dropped, an edge resend while the first copy is still being stored). Both then put the same
key with ``If-None-Match: *``; S3 answers one 200 and the other 412 Precondition Failed, or
(AWS, while the first write is still in progress) 409 ConditionalRequestConflict, which
``ObjectStore.put_if_absent`` retries. Whatever the interleaving, exactly one put reports that
it stored the object, and the object holds the winner's bytes.

SeaweedFS serialises conditional writes to a key: over hundreds of races here (1 kB to 8 MB
bodies, 2 to 4 writers) it answered 412 to every loser and never 409. So the 409 answer is
injected (a botocore ``before-call`` hook answers a PutObject with AWS's 409, as botocore's
own Stubber does), and the retry that follows goes to the real server, racing the other replica.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from cloud_fakes import FakeMqtt, jpeg_bytes, metadata_for

from cloud.ingest import IngestService, _Inbound
from common.config import IngestConfig
from common.storage import ObjectStore, StorageError
from common.topics import frame_key

ROUNDS = 40


def _record_answers(store: ObjectStore, answers: Counter[str]) -> None:
    """Count every HTTP answer to the store's PutObject calls (botocore retries included):
    "200", "412", "409"..."""
    lock = threading.Lock()

    def after_call(http_response: Any, **_: Any) -> None:
        with lock:
            answers[str(http_response.status_code)] += 1

    store.client.meta.events.register("after-call.s3.PutObject", after_call)


class Conflicts:
    """Makes a store's next ``armed`` PutObject calls answer 409 ConditionalRequestConflict
    without reaching the server (what AWS S3 answers while another conditional write of the
    key is in progress)."""

    def __init__(self, store: ObjectStore) -> None:
        self.armed = 0
        store.client.meta.events.register("before-call.s3.PutObject", self._answer)

    def _answer(self, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if self.armed <= 0:
            return None
        self.armed -= 1
        error = {"Code": "ConditionalRequestConflict",
                 "Message": "A conflicting conditional operation is currently in progress against this resource."}
        return AWSResponse("", 409, {}, None), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 409}}


def _race(calls: list[Any]) -> list[Any]:
    """Run ``calls`` (no arguments) at the same moment, one thread each; their results."""
    barrier = threading.Barrier(len(calls))

    def run(call: Any) -> Any:
        barrier.wait(timeout=10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.fixture
def replicas(stack_ns) -> tuple[ObjectStore, ObjectStore]:  # noqa: ANN001
    """Two stores with the ingest role's S3 identity, each with its own client and pool."""
    stack_ns.ensure_bucket()
    return (stack_ns.stack.storage(stack_ns.bucket, role="ingest"),
            stack_ns.stack.storage(stack_ns.bucket, role="ingest"))


def test_two_stores_racing_on_one_key_store_exactly_one_and_keep_the_winners_bytes(replicas) -> None:  # noqa: ANN001
    first, second = replicas
    answers: Counter[str] = Counter()
    for store in replicas:
        _record_answers(store, answers)
    for n in range(ROUNDS):
        key = f"frames/cam/2026/01/01/race-{n}-{uuid.uuid4().hex[:6]}.jpg"
        bodies = [b"first replica " + bytes([n]) * 2000, b"second replica " + bytes([n]) * 2000]
        created = _race([
            partial(first.put_if_absent, key, bodies[0], metadata={"replica": "0"}),
            partial(second.put_if_absent, key, bodies[1], metadata={"replica": "1"}),
        ])
        assert sorted(created) == [False, True], (n, created)
        winner = created.index(True)
        stored = first.get_object(key)
        assert stored.body == bodies[winner], n
        assert stored.metadata.get("replica") == str(winner), n
    assert answers["200"] == ROUNDS  # one write per key got through, never two
    assert set(answers) <= {"200", "409", "412"}, answers
    print(f"PutObject answers over {ROUNDS} races: {dict(answers)}")


@pytest.mark.parametrize("conflicted", [(1, 0), (1, 1), (2, 1)], ids=["one-409", "both-409", "two-and-one-409"])
def test_a_409_conflict_is_retried_and_the_race_still_stores_exactly_one(replicas, conflicted) -> None:  # noqa: ANN001
    first, second = replicas
    answers: Counter[str] = Counter()
    conflicts = [Conflicts(store) for store in replicas]
    for store in replicas:
        _record_answers(store, answers)
    rounds = ROUNDS // 2
    for n in range(rounds):
        key = f"frames/cam/2026/01/01/conflict-{n}-{uuid.uuid4().hex[:6]}.jpg"
        bodies = [b"first replica " + bytes([n]) * 2000, b"second replica " + bytes([n]) * 2000]
        for conflict, armed in zip(conflicts, conflicted, strict=True):
            conflict.armed = armed
        created = _race([partial(first.put_if_absent, key, bodies[0]), partial(second.put_if_absent, key, bodies[1])])
        assert sorted(created) == [False, True], (n, created)
        assert first.get(key) == bodies[created.index(True)], n
        assert [c.armed for c in conflicts] == [0, 0]  # every injected 409 was answered and retried
    assert answers["409"] == rounds * sum(conflicted)
    assert answers["200"] == rounds


def test_a_conflict_that_lasts_past_the_retries_is_an_error_and_writes_nothing(replicas) -> None:  # noqa: ANN001
    store = replicas[0]
    Conflicts(store).armed = 3
    key = f"frames/cam/2026/01/01/stuck-{uuid.uuid4().hex[:6]}.jpg"
    with pytest.raises(StorageError, match="ConditionalRequestConflict|conflict"):
        store.put_if_absent(key, b"never stored")
    assert not store.exists(key)
    assert store.put_if_absent(key, b"stored") is True  # the next delivery stores it


def test_two_ingest_replicas_racing_on_one_frame_store_it_once_and_both_ack(stack_ns) -> None:  # noqa: ANN001
    stack_ns.ensure_bucket()
    services, clients = [], []
    reader = stack_ns.stack.storage(stack_ns.bucket)
    for n in range(2):
        client = FakeMqtt()
        service = IngestService(IngestConfig(), store=stack_ns.stack.storage(stack_ns.bucket, role="ingest"),
                                client_id=f"race-ingest-{n}")
        service._client = client  # type: ignore[assignment]
        services.append(service)
        clients.append(client)
    for n in range(ROUNDS):
        payload = jpeg_bytes(seed=n)
        meta = metadata_for(payload, frame_id=f"r{uuid.uuid4().hex[:8]}")
        item = _Inbound("framecap/cam1/frames", payload, list(meta.to_user_properties()), mid=n + 1, qos=1,
                        generation=0)
        _race([partial(service.handle, item) for service in services])
        key = frame_key("cam1", meta.frame_id, meta.captured_at)
        assert reader.get(key) == payload
    stored = [s.counters["stored"] for s in services]
    duplicates = [s.counters["duplicates"] for s in services]
    assert sum(stored) == ROUNDS and sum(duplicates) == ROUNDS, (stored, duplicates)
    assert sum(s.counters.get("conflicts", 0) for s in services) == 0
    for client in clients:  # each replica acked every delivery it got, and told the edge
        assert client.acks() == [("ack", n + 1, 1) for n in range(ROUNDS)]
        assert len(client.published("/acks")) == ROUNDS
