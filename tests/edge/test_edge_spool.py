"""FrameSpool: atomic entries, corruption detection, oldest-first drops, restart reload."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest

from common.messages import FrameMetadata
from edge.daemon import make_frame_id
from edge.spool import FrameSpool, SpoolError, decode_entry, encode_entry

DEVICE = "cam-1"


def _frame(spool: FrameSpool, size: int = 1000) -> tuple[FrameMetadata, bytes]:
    seq = spool.allocate_seq()
    jpeg = bytes([seq % 256]) * size
    meta = FrameMetadata(
        device_id=DEVICE, frame_id=make_frame_id(datetime.now(timezone.utc), seq),
        captured_at=datetime.now(timezone.utc), seq=seq, width=4, height=4,
        sha256=hashlib.sha256(jpeg).hexdigest(),
    )
    return meta, jpeg


def _put(spool: FrameSpool, size: int = 1000) -> FrameMetadata:
    meta, jpeg = _frame(spool, size)
    spool.put(meta, jpeg)
    return meta


def test_entry_round_trip(tmp_path: Path) -> None:
    spool = FrameSpool(tmp_path, DEVICE)
    meta, jpeg = _frame(spool)
    assert decode_entry(encode_entry(meta, jpeg)) == (meta, jpeg)
    spool.put(meta, jpeg)
    assert spool.read(meta.frame_id) == (meta, jpeg)
    assert not list(tmp_path.rglob("*.tmp"))


def test_reload_keeps_order_and_seq_after_restart(tmp_path: Path) -> None:
    spool = FrameSpool(tmp_path, DEVICE)
    metas = [_put(spool) for _ in range(5)]
    assert spool.remove(metas[1].frame_id)
    assert not spool.remove(metas[1].frame_id)  # a second ack finds nothing
    spool.close()
    again = FrameSpool(tmp_path, DEVICE)
    assert [e.frame_id for e in again] == [m.frame_id for m in (metas[0], *metas[2:])]
    assert again.next_seq == 5
    for m in metas:  # all acked: the counter still survives
        again.remove(m.frame_id)
    again.close()
    assert FrameSpool(tmp_path, DEVICE).allocate_seq() == 5


def test_after_a_crash_seq_skips_ahead_and_never_repeats(tmp_path: Path) -> None:
    """seqs are reserved in blocks (one state write per SEQ_BLOCK frames, issue 9): a spool
    not closed (SIGKILL) restarts after the block, never at a seq already handed out."""
    from edge.spool import SEQ_BLOCK

    spool = FrameSpool(tmp_path, DEVICE)
    seqs = [spool.allocate_seq() for _ in range(SEQ_BLOCK + 3)]
    assert seqs == list(range(SEQ_BLOCK + 3))
    state = (tmp_path / "state.json").read_text()
    assert f'"next_seq": {2 * SEQ_BLOCK}' in state  # two state writes for 1003 frames
    again = FrameSpool(tmp_path, DEVICE)  # no close(): a crash
    assert again.allocate_seq() == 2 * SEQ_BLOCK


def test_interval_policy_fsyncs_only_frames_still_waiting(tmp_path: Path, wait_until) -> None:
    """Issue 9: a frame acked within fsync_interval_s costs no fsync; one still spooled then
    is fsynced by the spool's thread; "always" fsyncs each frame before put returns."""
    spool = FrameSpool(tmp_path / "a", DEVICE, fsync_interval_s=0.3)
    quick = _put(spool)
    assert spool.remove(quick.frame_id)
    slow = _put(spool)
    assert spool.fsyncs == 0
    assert wait_until(lambda: spool.fsyncs == 1, 5)
    assert slow.frame_id in spool
    spool.close()
    always = FrameSpool(tmp_path / "b", DEVICE, fsync="always")
    _put(always)
    assert always.fsyncs == 1
    with pytest.raises(ValueError, match="fsync"):
        FrameSpool(tmp_path / "c", DEVICE, fsync="never")  # type: ignore[arg-type]


def test_a_frame_written_here_is_published_from_memory(tmp_path: Path) -> None:
    """No read back of the file just written (issue 9); a spool loaded at start reads files."""
    spool = FrameSpool(tmp_path, DEVICE)
    meta, jpeg = _frame(spool)
    spool.put(meta, jpeg)
    path = next(iter(spool)).path
    path.write_bytes(b"changed on disk")
    assert spool.read(meta.frame_id) == (meta, jpeg)
    assert spool.remove(meta.frame_id) and spool.read(meta.frame_id) is None


def test_corrupt_and_half_written_entries_are_quarantined(tmp_path: Path, caplog) -> None:
    spool = FrameSpool(tmp_path, DEVICE)
    good, flipped, cut = (_put(spool) for _ in range(3))
    entries = {e.frame_id: e.path for e in spool}
    data = bytearray(entries[flipped.frame_id].read_bytes())
    data[-10] ^= 0xFF  # JPEG bytes no longer match sha256
    entries[flipped.frame_id].write_bytes(bytes(data))
    entries[cut.frame_id].write_bytes(entries[cut.frame_id].read_bytes()[:40])  # truncated
    (spool.entries_dir / ".000000000009_x.frame.tmp").write_bytes(b"half")  # SIGKILL mid-write
    caplog.set_level(logging.WARNING)
    again = FrameSpool(tmp_path, DEVICE)
    assert [e.frame_id for e in again] == [good.frame_id]
    assert again.corrupt == 2
    assert sorted(p.name for p in again.quarantine_dir.iterdir()) == sorted(
        entries[m.frame_id].name for m in (flipped, cut)
    )
    assert not list(again.entries_dir.glob(".*.tmp"))
    assert flipped.frame_id in caplog.text and "sha256" in caplog.text


def test_corruption_after_load_is_caught_at_read(tmp_path: Path) -> None:
    meta = _put(FrameSpool(tmp_path, DEVICE))
    spool = FrameSpool(tmp_path, DEVICE)  # loaded at start: read from the file, checked
    path = next(iter(spool)).path
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    assert spool.read(meta.frame_id) is None
    assert meta.frame_id not in spool and spool.corrupt == 1


def test_full_spool_drops_the_oldest_and_counts(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    spool = FrameSpool(tmp_path, DEVICE, max_frames=3)
    metas = [_put(spool) for _ in range(5)]
    assert [e.frame_id for e in spool] == [m.frame_id for m in metas[2:]]
    assert spool.dropped == 2
    for m in metas[:2]:
        assert f"{DEVICE}: frame {m.frame_id} dropped" in caplog.text
    assert len(list(spool.entries_dir.iterdir())) == 3


def test_byte_limit_drops_the_oldest(tmp_path: Path) -> None:
    spool = FrameSpool(tmp_path, DEVICE, max_bytes=1 << 16)
    metas = [_put(spool, size=20_000) for _ in range(4)]  # ~20 KB each, 64 KB cap: 3 fit
    assert spool.dropped == 1 and spool.total_bytes <= 1 << 16
    assert [e.frame_id for e in spool] == [m.frame_id for m in metas[1:]]
    with pytest.raises(SpoolError, match="larger than the whole spool"):
        _put(spool, size=70_000)


def test_spool_of_another_device_is_refused(tmp_path: Path) -> None:
    _put(FrameSpool(tmp_path, DEVICE))
    with pytest.raises(SpoolError, match="belongs to device"):
        FrameSpool(tmp_path, "cam-2")
