"""FrameSpool: segment entries, corruption detection, oldest-first drops, restart reload."""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from common.messages import FrameMetadata
from edge.daemon import make_frame_id
from edge.spool import FrameSpool, SpoolError, decode_entry, encode_entry, read_entries

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
    """A segment entry whose bytes no longer match its sha256 is quarantined (never sent), one
    cut off at the end of the segment (a crash mid-write) is cut away; the rest loads."""
    spool = FrameSpool(tmp_path, DEVICE)
    good, flipped, cut = (_put(spool) for _ in range(3))
    entries = {e.frame_id: e for e in spool}
    segment = entries[good.frame_id].path
    assert all(e.path == segment for e in entries.values())  # one segment holds them
    data = bytearray(segment.read_bytes())
    f = entries[flipped.frame_id]
    data[f.offset + f.size - 10] ^= 0xFF  # JPEG bytes no longer match sha256
    c = entries[cut.frame_id]
    segment.write_bytes(bytes(data[: c.offset + 40]))  # the last entry cut short
    caplog.set_level(logging.WARNING)
    again = FrameSpool(tmp_path, DEVICE)
    assert [e.frame_id for e in again] == [good.frame_id]
    assert again.corrupt == 1
    assert [p.name for p in again.quarantine_dir.iterdir()] == [f"{segment.stem}-{f.offset}.frame"]
    assert segment.stat().st_size == c.offset  # the half-written tail is gone
    assert flipped.frame_id in caplog.text and "sha256" in caplog.text
    assert "half-written spool entry" in caplog.text
    assert again.read(good.frame_id) is not None
    third = FrameSpool(tmp_path, DEVICE)  # the quarantined entry is not quarantined twice
    assert [e.frame_id for e in third] == [good.frame_id] and third.corrupt == 0


def test_entries_written_by_an_earlier_version_are_still_loaded(tmp_path: Path, caplog) -> None:
    """A spool of one file per frame (``entries/``, before segments) is sent as before: intact
    files load, a garbled one is quarantined, a leftover ``.tmp`` is deleted."""
    spool = FrameSpool(tmp_path, DEVICE)
    (good, jpeg), (flipped, jpeg2) = _frame(spool), _frame(spool)
    entries = tmp_path / "entries"
    (entries / f"{good.seq:012d}_{good.frame_id}.frame").write_bytes(encode_entry(good, jpeg))
    bad = bytearray(encode_entry(flipped, jpeg2))
    bad[-10] ^= 0xFF
    (entries / f"{flipped.seq:012d}_{flipped.frame_id}.frame").write_bytes(bytes(bad))
    (entries / ".000000000009_x.frame.tmp").write_bytes(b"half")  # SIGKILL mid-write
    new = _put(spool)
    spool.close()
    caplog.set_level(logging.WARNING)
    again = FrameSpool(tmp_path, DEVICE)
    assert [e.frame_id for e in again] == [good.frame_id, new.frame_id]
    assert again.corrupt == 1 and not list(entries.glob(".*.tmp"))
    assert again.read(good.frame_id) == (good, jpeg)
    assert again.remove(good.frame_id) and not list(entries.glob("*.frame"))
    assert "deleting half-written spool file" in caplog.text


def test_segments_rotate_and_are_deleted_once_every_entry_is_gone(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Issue 9: frames are appended to segment files; acks are recorded beside them (a restart
    does not send them again); a segment whose entries are all acked or dropped is deleted."""
    import edge.spool as spool_module

    monkeypatch.setattr(spool_module, "SEGMENT_MAX_FRAMES", 4)
    spool = FrameSpool(tmp_path, DEVICE)
    metas = [_put(spool) for _ in range(10)]
    segments = sorted(spool.segments_dir.glob("*.seg"))
    assert [p.name for p in segments] == ["000000000000.seg", "000000000004.seg",
                                          "000000000008.seg"]
    for m in metas[:3]:
        assert spool.remove(m.frame_id)
    assert segments[0].exists()  # metas[3] still needs it
    crashed = FrameSpool(tmp_path, DEVICE)  # loaded without close(): a crash
    assert [e.frame_id for e in crashed] == [m.frame_id for m in metas[3:]]
    assert spool.remove(metas[3].frame_id)
    assert not segments[0].exists() and not segments[0].with_suffix(".seg.done").exists()
    for m in metas[4:]:
        assert spool.remove(m.frame_id)
    assert not segments[1].exists()
    assert segments[2].exists()  # still the one being appended to
    spool.close()
    assert len(FrameSpool(tmp_path, DEVICE)) == 0
    assert not list(spool.segments_dir.iterdir())  # the empty segment went at load
    assert list(read_entries(tmp_path)) == []


def test_a_failed_write_leaves_no_entry_behind(tmp_path: Path, monkeypatch) -> None:
    """A write that fails (disk full) raises SpoolError and takes its bytes back: the segment
    loads as if the put never happened, and the next put goes on."""
    import edge.spool as spool_module

    spool = FrameSpool(tmp_path, DEVICE)
    first = _put(spool)
    real = os.pwrite
    monkeypatch.setattr(spool_module.os, "pwrite",
                        lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SpoolError, match="No space left"):
        _put(spool)
    monkeypatch.setattr(spool_module.os, "pwrite", real)
    last = _put(spool)
    assert [e.frame_id for e in spool] == [first.frame_id, last.frame_id]
    assert [e.frame_id for e in FrameSpool(tmp_path, DEVICE)] == [first.frame_id, last.frame_id]


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
    assert sorted(m.frame_id for m, _ in read_entries(tmp_path)) == sorted(
        m.frame_id for m in metas[2:])


def test_byte_limit_drops_the_oldest(tmp_path: Path) -> None:
    spool = FrameSpool(tmp_path, DEVICE, max_bytes=1 << 16)
    metas = [_put(spool, size=20_000) for _ in range(4)]  # ~20 KB each, 64 KB cap: 3 fit
    assert spool.dropped == 1 and spool.total_bytes <= 1 << 16
    assert [e.frame_id for e in spool] == [m.frame_id for m in metas[1:]]
    # segments of a small spool are small too: the dropped frame's bytes left the disk
    assert sum(p.stat().st_size for p in spool.segments_dir.iterdir()) <= 1 << 16
    with pytest.raises(SpoolError, match="larger than the whole spool"):
        _put(spool, size=70_000)


def test_spool_of_another_device_is_refused(tmp_path: Path) -> None:
    _put(FrameSpool(tmp_path, DEVICE))
    with pytest.raises(SpoolError, match="belongs to device"):
        FrameSpool(tmp_path, "cam-2")
