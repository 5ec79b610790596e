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
    again = FrameSpool(tmp_path, DEVICE)
    assert [e.frame_id for e in again] == [m.frame_id for m in (metas[0], *metas[2:])]
    assert again.next_seq == 5
    for m in metas:  # all acked: the counter still survives
        again.remove(m.frame_id)
    assert FrameSpool(tmp_path, DEVICE).allocate_seq() == 5


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
    spool = FrameSpool(tmp_path, DEVICE)
    meta = _put(spool)
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
