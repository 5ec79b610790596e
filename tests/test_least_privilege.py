"""Least privilege in the local stack (issue 8 item 7): one S3 identity per role, devices none.

Each service's S3 identity may do what its code does and nothing else (``S3_GRANTS``): the
ingest writes ``frames/``, the worker reads ``frames/`` and writes ``captions/`` and ``outbox/``,
web only reads, devices get no S3 keys at all. Checked against the real SeaweedFS.
"""

from __future__ import annotations

import pytest

from common.stack import S3_GRANTS, main
from common.storage import StorageError

pytestmark = pytest.mark.integration

FRAME = "frames/cam/2026/01/01/f1.jpg"
CAPTION = "captions/cam/2026/01/01/f1.json"
MARKER = "outbox/w1/captions/cam/2026/01/01/f1.json"


def _denied(call, *args, **kwargs) -> bool:
    """True if S3 refuses the call (AccessDenied / 403)."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except StorageError as err:
        assert "403" in str(err) or "AccessDenied" in str(err) or "denied" in str(err).lower(), err
        return True
    return False


@pytest.fixture
def seeded(stack_ns):
    admin = stack_ns.storage()
    for key in (FRAME, CAPTION, MARKER):
        admin.put(key, b"seed " + key.encode())
    return admin


def test_a_device_env_holds_no_s3_keys(stack_ns, capsys) -> None:
    dev = stack_ns.device("cam")
    stack = stack_ns.stack
    env = stack.env(dev)
    assert not [k for k in env if k.startswith("FRAMECAP_S3_")]
    assert env["FRAMECAP_MQTT_USERNAME"] == dev
    assert main(["env", "--user", dev, "--state-dir", str(stack.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "FRAMECAP_S3" not in out
    for role in ("admin", "ingest", "worker", "web"):
        key_id, secret = stack.s3_credentials(role)
        assert key_id not in out and secret not in out
    # each service's env carries its own identity, never the admin's
    admin_key = stack.s3_credentials("admin")[0]
    for role in ("ingest", "worker", "web"):
        env = stack.env(role)
        assert env["FRAMECAP_S3_ACCESS_KEY_ID"] == stack.s3_credentials(role)[0] != admin_key


def test_ingest_writes_frames_only(stack_ns, seeded) -> None:
    ingest = stack_ns.stack.storage(stack_ns.bucket, role="ingest", max_attempts=1)
    assert ingest.put_if_absent("frames/cam/2026/01/01/f2.jpg", b"new") is True
    assert ingest.put_if_absent(FRAME, b"other") is False  # 412, then it reads what is there
    assert ingest.head_metadata(FRAME) == {}
    assert seeded.get(FRAME) == b"seed " + FRAME.encode()
    assert _denied(ingest.put, CAPTION, b"forged caption")
    assert _denied(ingest.put, MARKER, b"forged marker")
    assert _denied(ingest.put, "captions/frames/x.json", b"a '*' grant would match this")
    assert _denied(ingest.delete, CAPTION)
    assert _denied(ingest.delete, MARKER)
    assert _denied(ingest.get, CAPTION)
    assert _denied(ingest.list_keys, "frames/")
    assert _denied(ingest.ensure_bucket)  # only admin checks or creates buckets
    assert seeded.get(CAPTION) == b"seed " + CAPTION.encode()


def test_worker_cannot_write_frames(stack_ns, seeded) -> None:
    worker = stack_ns.stack.storage(stack_ns.bucket, role="worker", max_attempts=1)
    assert _denied(worker.put, FRAME, b"overwritten")
    assert _denied(worker.put_if_absent, "frames/cam/2026/01/01/new.jpg", b"forged")
    assert _denied(worker.delete, FRAME)
    assert seeded.get(FRAME) == b"seed " + FRAME.encode()
    assert not seeded.exists("frames/cam/2026/01/01/new.jpg")
    # what it does: read frames, list, write captions and outbox markers, delete markers
    assert worker.get(FRAME) == b"seed " + FRAME.encode()
    assert list(worker.list_keys("frames/")) == [FRAME]
    assert list(worker.list_keys("captions/")) == [CAPTION]
    assert list(worker.list_keys("outbox/")) == [MARKER]
    worker.put("captions/cam/2026/01/01/f2.json", b"{}")
    worker.put("outbox/w1/captions/cam/2026/01/01/f2.json", b"")
    worker.delete(MARKER)
    assert not seeded.exists(MARKER)
    assert worker.get("captions/cam/2026/01/01/f2.json") == b"{}"


def test_web_cannot_write_at_all(stack_ns, seeded) -> None:
    web = stack_ns.stack.storage(stack_ns.bucket, role="web", max_attempts=1)
    for key in (FRAME, CAPTION, MARKER, "frames/cam/x.jpg", "captions/cam/x.json"):
        assert _denied(web.put, key, b"forged")
    for key in (FRAME, CAPTION, MARKER):
        assert _denied(web.delete, key)
        assert seeded.get(key) == b"seed " + key.encode()
    assert web.get(FRAME) == b"seed " + FRAME.encode()
    assert web.get(CAPTION) == b"seed " + CAPTION.encode()
    assert list(web.list_keys("captions/")) == [CAPTION]
    assert _denied(web.list_keys, "outbox/")


def test_grants_are_named_per_bucket_so_other_buckets_are_out_of_reach(stack_ns, seeded) -> None:
    """The ingest's identity granted in one test bucket cannot write another bucket the stack
    never granted; a worker cannot create buckets."""
    stack = stack_ns.stack
    other = f"{stack_ns.bucket}-x"
    stack.storage(other).ensure_bucket()  # admin
    ingest_cfg = stack.s3_config(stack_ns.bucket, role="ingest")
    from common.storage import ObjectStore

    foreign = ObjectStore(ingest_cfg.model_copy(update={"bucket": other}), max_attempts=1)
    assert _denied(foreign.put, "frames/cam/2026/01/01/f1.jpg", b"x")
    assert set(S3_GRANTS) == {"ingest", "worker", "web"}
