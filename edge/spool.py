"""The edge's bounded on-disk spool of frames not yet acknowledged by the cloud.

A frame is written here *before* it is published and removed only when the ingest's ack
arrives, so a crash, a reboot or a lost broker never loses a sampled frame; the only loss is a
full spool, which drops the oldest frames, counts them (:attr:`FrameSpool.dropped`) and logs
each one.

On-disk format (``directory``)::

    state.json                    {"format": 1, "device_id": ..., "next_seq": N}
    segments/{seq:012d}.seg       entries appended one after another (named by the first seq)
    segments/{seq:012d}.seg.done  byte offsets of its entries acked or dropped, one a line
    entries/{seq:012d}_{frame_id}.frame   one entry a file (written before segments; still read)
    quarantine/                   entries found corrupt at load or read (newest QUARANTINE_KEEP kept)

Each entry (a ``.frame`` file, or one record of a segment) is::

    b"FCSPOOL1"                   8-byte magic with format version
    header length                 4 bytes, unsigned big-endian
    header                        UTF-8 JSON {"metadata": FrameMetadata JSON, "jpeg_bytes": n}
    JPEG                          n bytes, whose SHA-256 is metadata.sha256

Segments (issue 9): a frame costs one ``pwrite`` at the end of the current segment, and its
ack one short line appended to the segment's ``.done`` file, instead of creating, renaming and
deleting a file per frame (about 0.6 ms of CPU per frame on the 2-core bench machine). A
segment takes at most :data:`SEGMENT_MAX_FRAMES` entries or :data:`SEGMENT_MAX_BYTES` bytes
(a quarter of ``max_bytes`` if that is less, so a small spool stays near its bound on disk),
then the next one starts; a segment none of whose entries is still spooled is deleted, so the
disk holds the frames not yet acked plus the acked ones that share a segment with them. A
spool written by an earlier framecap (``entries/``) is loaded and sent as before.

Crash safety: an entry half-written at the end of a segment (SIGKILL or a power cut during
the write) is cut off at load, as a leftover ``.tmp`` file of ``entries/`` is deleted; an entry
that is garbled or whose bytes do not match its sha256 is logged and copied to
``quarantine/``, never sent. An ack whose ``.done`` line was lost (a power cut) only means
the frame is sent again; the ingest stores it once and acks it again.

Durability (``fsync``, issue 9): a killed process loses nothing either way (the page cache
outlives it); the policy decides what a power cut may lose.

- ``"interval"`` (default): an entry still spooled ``fsync_interval_s`` after it was written is
  fsynced (its segment, then the directory) by a background thread. Most frames are acked long
  before: they never cost an fsync. A power cut loses at most the frames of the last
  ``fsync_interval_s`` not yet acked.
- ``"always"``: each entry is fsynced before :meth:`FrameSpool.put` returns (and the ``.done``
  file after each removal): nothing acknowledged to the caller is lost.

``state.json`` holds ``next_seq``, a bound no seq handed out reaches: seqs are reserved in blocks
of :data:`SEQ_BLOCK` (one fsynced state write per block, not per frame), and a clean
:meth:`FrameSpool.close` writes the exact next seq. So seq (and the frame_ids built from it)
keeps counting up for the life of the spool; after a crash it skips the rest of a block.

The spool keeps the JPEGs it wrote in memory (at most :data:`CACHE_BYTES`) until they are
acked, so publishing a frame does not read back the file it has just written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.messages import FrameMetadata, MessageError

logger = logging.getLogger(__name__)

MAGIC = b"FCSPOOL1"
HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
STATE_FORMAT = 1
QUARANTINE_KEEP = 100
SEQ_BLOCK = 1000  # seqs reserved per fsynced state write
CACHE_BYTES = 16 << 20  # JPEGs kept in memory for publishing, bytes
SEGMENT_MAX_FRAMES = 128  # entries per segment file at most
SEGMENT_MAX_BYTES = 8 << 20  # a segment past this size takes no more entries, bytes
FSYNC_INTERVAL_S = 1.0  # "interval" policy: fsync entries still spooled after this, seconds
FsyncPolicy = Literal["interval", "always"]
_ENTRY_RE = re.compile(r"^(?P<seq>\d{12})_(?P<frame_id>[A-Za-z0-9._-]+)\.frame$")
_SEGMENT_RE = re.compile(r"^\d{12}\.seg$")


class SpoolError(RuntimeError):
    """The spool cannot take a frame (too large for it) or its directory is unusable."""


class CorruptEntryError(ValueError):
    """A spool file that cannot be trusted (the message says why)."""


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled frame: its metadata, the file that holds it, its size in bytes and, in a
    segment, its byte offset there (None: a file of its own, as earlier versions wrote)."""

    metadata: FrameMetadata
    path: Path
    size: int
    offset: int | None = None

    @property
    def frame_id(self) -> str:
        return self.metadata.frame_id

    @property
    def seq(self) -> int:
        return self.metadata.seq


class _Segment:
    """A segment file: where the next entry goes (``size``), how many entries it holds
    (``count``) and how many of them are still spooled (``live``); file descriptors opened
    when needed and closed with the segment (owned by the spool's lock)."""

    def __init__(self, path: Path, size: int = 0, count: int = 0, live: int = 0) -> None:
        self.path = path
        self.done_path = path.with_name(path.name + ".done")
        self.size = size
        self.count = count
        self.live = live
        self.fd: int | None = None  # read and write
        self.done_fd: int | None = None  # append

    def file(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self.fd

    def mark_done(self, offset: int, sync: bool) -> None:
        """Record that the entry at ``offset`` is acked or dropped. Raises OSError."""
        if self.done_fd is None:
            self.done_fd = os.open(self.done_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o644)
        os.write(self.done_fd, b"%d\n" % offset)
        if sync:
            os.fsync(self.done_fd)

    def close(self) -> None:
        for fd in (self.fd, self.done_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.done_fd = None


def _entry_end(data: bytes | memoryview, offset: int) -> int:
    """Where the entry starting at ``offset`` ends, from its header; raises CorruptEntryError
    (bad magic or header) or EOFError (the bytes stop before the entry does)."""
    start = offset + len(MAGIC) + HEADER_LEN.size
    if len(data) < start:
        if bytes(data[offset:]) != MAGIC[: len(data) - offset]:
            raise CorruptEntryError("bad magic (not a spool entry, or an unknown format)")
        raise EOFError
    if bytes(data[offset:offset + len(MAGIC)]) != MAGIC:
        raise CorruptEntryError("bad magic (not a spool entry, or an unknown format)")
    (header_len,) = HEADER_LEN.unpack_from(data, offset + len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise CorruptEntryError(f"garbled header ({header_len} bytes announced)")
    if len(data) < start + header_len:
        raise EOFError
    try:
        jpeg_len = int(json.loads(bytes(data[start:start + header_len]))["jpeg_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptEntryError(f"bad header: {err}") from err
    if jpeg_len < 0:
        raise CorruptEntryError(f"bad header: jpeg_bytes {jpeg_len}")
    end = start + header_len + jpeg_len
    if len(data) < end:
        raise EOFError
    return end


def read_entries(directory: Path) -> Iterator[tuple[FrameMetadata, bytes]]:
    """Every entry of the spool in ``directory`` that is intact and not acked or dropped, in
    no particular order; reads only (no repair, no quarantine). For tools and tests."""
    directory = Path(directory)
    for path in sorted((directory / "entries").glob("*.frame")):
        with contextlib.suppress(OSError, CorruptEntryError):
            yield decode_entry(path.read_bytes())
    for path in sorted((directory / "segments").glob("*.seg")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        done = _read_done(path.with_name(path.name + ".done"))
        offset = 0
        while offset < len(data):
            try:
                end = _entry_end(data, offset)
            except (EOFError, CorruptEntryError):
                nxt = data.find(MAGIC, offset + 1)
                if nxt < 0:
                    break
                offset = nxt
                continue
            if offset not in done:
                with contextlib.suppress(CorruptEntryError):
                    yield decode_entry(data[offset:end])
            offset = end


def _read_done(path: Path) -> set[int]:
    """The offsets a ``.done`` file lists (a torn last line is ignored)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return set()
    done = set()
    for line in text.split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            done.add(int(line))
    return done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    Writes ``.{name}.tmp`` and renames it over ``path``; with ``sync`` (a power cut too) it
    fsyncs the file before the rename and the directory after.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    # os.open/os.write: no buffered file object (its fstat, isatty ioctl and lseek per file)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    """fsync a file written earlier; a file gone meanwhile (acked) needs none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_entry(metadata: FrameMetadata, jpeg: bytes) -> bytes:
    """The bytes of a ``.frame`` file (see the module doc)."""
    # the same bytes as json.dumps({"metadata": ..., "jpeg_bytes": n}, separators=(",", ":")):
    # pydantic's JSON is compact already, so it is not parsed and dumped again
    header = b'{"metadata":%s,"jpeg_bytes":%d}' % (metadata.model_dump_json().encode(), len(jpeg))
    return b"".join((MAGIC, HEADER_LEN.pack(len(header)), header, jpeg))


def decode_entry(data: bytes) -> tuple[FrameMetadata, bytes]:
    """Parse and check a ``.frame`` file's bytes.

    Raises:
        CorruptEntryError: bad magic, truncated, bad header JSON or metadata, wrong length,
            or JPEG bytes whose SHA-256 differs from the metadata's.
    """
    if not data.startswith(MAGIC):
        raise CorruptEntryError("bad magic (not a spool entry, or an unknown format)")
    start = len(MAGIC) + HEADER_LEN.size
    if len(data) < start:
        raise CorruptEntryError("truncated before the header")
    (header_len,) = HEADER_LEN.unpack_from(data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or len(data) < start + header_len:
        raise CorruptEntryError(f"truncated or garbled header ({header_len} bytes announced)")
    try:
        header = json.loads(data[start : start + header_len])
        metadata = FrameMetadata.model_validate(header["metadata"])
        jpeg_len = int(header["jpeg_bytes"])
    except (ValueError, KeyError, TypeError) as err:  # JSON, pydantic and MessageError are ValueErrors
        raise CorruptEntryError(f"bad header: {err}") from err
    jpeg = data[start + header_len :]
    if len(jpeg) != jpeg_len:
        raise CorruptEntryError(f"JPEG is {len(jpeg)} bytes, header says {jpeg_len}")
    try:
        metadata.check_payload(jpeg)
    except MessageError as err:
        raise CorruptEntryError(str(err)) from err
    return metadata, jpeg


class FrameSpool:
    """A bounded, crash-safe FIFO of frames on disk; thread-safe.

    Args:
        directory: the spool directory (created, with ``entries/`` and ``quarantine/``).
        device_id: for log lines and to refuse a spool made by another device.
        max_frames: most entries kept; beyond it the oldest is dropped.
        max_bytes: most bytes of entry files kept; beyond it the oldest are dropped.
        fsync: ``"interval"`` or ``"always"`` (see the module doc).
        fsync_interval_s: with ``"interval"``, fsync entries still spooled this long after
            they were written, seconds.

    Raises:
        SpoolError: the directory cannot be created or belongs to another device_id.
        ValueError: an unknown ``fsync`` policy or a negative interval.
    """

    def __init__(self, directory: Path, device_id: str, *, max_frames: int = 10000,
                 max_bytes: int = 1 << 30, fsync: FsyncPolicy = "interval",
                 fsync_interval_s: float = FSYNC_INTERVAL_S) -> None:
        if fsync not in ("interval", "always"):
            raise ValueError(f"fsync must be 'interval' or 'always', got {fsync!r}")
        if fsync_interval_s < 0:
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.directory = Path(directory)
        self.device_id = device_id
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.entries_dir = self.directory / "entries"
        self.segments_dir = self.directory / "segments"
        self.quarantine_dir = self.directory / "quarantine"
        self.state_path = self.directory / "state.json"
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, SpoolEntry] = OrderedDict()  # frame_id -> entry, by seq
        self._bytes = 0
        self.dropped = 0  # oldest entries dropped because the spool was full
        self.corrupt = 0  # entries quarantined as corrupt
        self.removed = 0  # entries removed on ack
        self.fsyncs = 0  # entry files fsynced (not counting state.json and directories)
        self._cache: OrderedDict[str, bytes] = OrderedDict()  # frame_id -> JPEG, oldest first
        self._cache_bytes = 0
        self._unsynced: OrderedDict[str, float] = OrderedDict()  # frame_id -> written at
        self._sync_wake = threading.Event()
        self._sync_idle = True  # the fsync thread waits with no deadline (or is not started)
        self._puts = 0  # entries put under the "interval" policy
        self._puts_seen = 0  # ... when the fsync thread last looked
        self._sync_stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._reserved_seq = 0  # state.json says no seq below this was handed out
        self._segments: dict[Path, _Segment] = {}  # segment path -> segment, oldest first
        self._current: _Segment | None = None  # where put() appends
        self._segments_dir_synced = True  # no segment created since the directory's fsync
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.segments_dir.mkdir(exist_ok=True)
            self.quarantine_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise SpoolError(f"{device_id}: cannot create spool directory {directory}: {err}") from err
        self._next_seq = self._load_state()
        self._load_entries()
        self._reserved_seq = self._next_seq

    # -- loading -------------------------------------------------------------------------
    def _load_state(self) -> int:
        if not self.state_path.exists():
            return 0
        try:
            state = json.loads(self.state_path.read_bytes())
            next_seq = int(state["next_seq"])
            owner = state.get("device_id")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s: spool state %s unreadable (%s); seq restarts after the entries",
                           self.device_id, self.state_path, err)
            return 0
        if owner is not None and owner != self.device_id:
            raise SpoolError(
                f"spool {self.directory} belongs to device {owner!r}, not {self.device_id!r}"
            )
        return max(0, next_seq)

    def _load_entries(self) -> None:
        for tmp in self.entries_dir.glob(".*.tmp"):
            logger.warning("%s: deleting half-written spool file %s", self.device_id, tmp.name)
            tmp.unlink(missing_ok=True)
        loaded: list[SpoolEntry] = []
        for path in self.entries_dir.iterdir():
            entry = self._load_one(path)
            if entry is not None:
                loaded.append(entry)
        for path in sorted(self.segments_dir.iterdir()):
            if _SEGMENT_RE.match(path.name):
                loaded.extend(self._load_segment(path))
            elif path.name.endswith(".seg.done"):
                if not path.with_name(path.name[: -len(".done")]).exists():
                    path.unlink(missing_ok=True)  # its segment was deleted, then we stopped
            else:
                self._quarantine(path, "unexpected file name")
        seen: set[str] = set()
        unique = []
        for entry in sorted(loaded, key=lambda e: e.seq):
            if entry.frame_id in seen:  # the same frame twice: keep one, mark the other done
                self._mark_done(entry)
                continue
            seen.add(entry.frame_id)
            unique.append(entry)
        for seg in list(self._segments.values()):
            if seg.live == 0:
                self._delete_segment(seg)
        loaded = unique
        for entry in loaded:
            self._entries[entry.frame_id] = entry
            self._bytes += entry.size
        if loaded:
            self._next_seq = max(self._next_seq, max(e.seq for e in loaded) + 1)
            logger.info("%s: spool %s holds %d unacknowledged frames (%d bytes)",
                        self.device_id, self.directory, len(self._entries), self._bytes)
        self._trim_quarantine()

    def _load_one(self, path: Path) -> SpoolEntry | None:
        m = _ENTRY_RE.match(path.name)
        if not m:
            self._quarantine(path, "unexpected file name")
            return None
        try:
            metadata, _ = decode_entry(path.read_bytes())
        except (OSError, CorruptEntryError) as err:
            self._quarantine(path, str(err), frame_id=m["frame_id"])
            return None
        if metadata.frame_id != m["frame_id"] or metadata.seq != int(m["seq"]):
            self._quarantine(path, "file name does not match its metadata", frame_id=m["frame_id"])
            return None
        if metadata.device_id != self.device_id:
            self._quarantine(path, f"frame of another device {metadata.device_id!r}",
                             frame_id=metadata.frame_id)
            return None
        return SpoolEntry(metadata, path, path.stat().st_size)

    def _load_segment(self, path: Path) -> list[SpoolEntry]:
        """The intact entries of a segment not yet acked or dropped. A half-written entry at
        its end is cut off; a garbled one is quarantined and marked done."""
        try:
            data = path.read_bytes()
        except OSError as err:
            self._quarantine(path, f"unreadable: {err}")
            return []
        seg = _Segment(path)
        done = _read_done(seg.done_path)
        entries: list[SpoolEntry] = []
        offset = 0
        while offset < len(data):
            try:
                end = _entry_end(data, offset)
                metadata, _ = decode_entry(data[offset:end])
                if metadata.device_id != self.device_id:
                    raise CorruptEntryError(f"frame of another device {metadata.device_id!r}")
            except EOFError:
                if data.find(MAGIC, offset + 1) < 0:  # the tail of an interrupted write
                    logger.warning("%s: deleting half-written spool entry at the end of %s "
                                   "(%d bytes)", self.device_id, path.name, len(data) - offset)
                    try:
                        os.truncate(path, offset)
                    except OSError as err:
                        logger.error("%s: cannot cut %s: %s", self.device_id, path.name, err)
                    data = data[:offset]
                    break
                end = data.find(MAGIC, offset + 1)
                metadata = None
                err_text = "truncated entry"
            except CorruptEntryError as err:
                nxt = data.find(MAGIC, offset + 1)
                end = nxt if nxt > offset else len(data)
                metadata = None
                err_text = str(err)
            if metadata is None:  # garbled: keep its bytes aside once, never send it
                if offset not in done:
                    self._quarantine_bytes(data[offset:end], f"{path.stem}-{offset}.frame",
                                           err_text, _frame_id_in(data[offset:end]))
                    done.add(offset)
                    with contextlib.suppress(OSError):
                        seg.mark_done(offset, sync=False)
                seg.count += 1
                offset = end
                continue
            seg.count += 1
            if offset not in done:
                entries.append(SpoolEntry(metadata, path, end - offset, offset))
            offset = end
        seg.size = len(data)
        seg.live = len(entries)
        self._segments[path] = seg
        return entries

    def _quarantine_bytes(self, data: bytes, name: str, reason: str, frame_id: str) -> None:
        self.corrupt += 1
        logger.error("%s: frame %s: corrupt spool entry %s (%s); quarantined, not sent",
                     self.device_id, frame_id, name, reason)
        with contextlib.suppress(OSError):
            (self.quarantine_dir / name).write_bytes(data)

    def _quarantine(self, path: Path, reason: str, frame_id: str = "?") -> None:
        self.corrupt += 1
        logger.error("%s: frame %s: corrupt spool entry %s (%s); quarantined, not sent",
                     self.device_id, frame_id, path.name, reason)
        try:
            os.replace(path, self.quarantine_dir / path.name)
        except OSError:
            path.unlink(missing_ok=True)

    def _trim_quarantine(self) -> None:
        files = sorted(self.quarantine_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for path in files[: max(0, len(files) - QUARANTINE_KEEP)]:
            path.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------
    def allocate_seq(self) -> int:
        """Return the next seq; the counter on disk (fsynced) is always above it.

        Seqs are reserved :data:`SEQ_BLOCK` at a time, so most calls write nothing.

        Raises:
            OSError: ``state.json`` cannot be written (the seq is not handed out).
        """
        with self._lock:
            seq = self._next_seq
            if seq + 1 > self._reserved_seq:
                self._write_state(seq + SEQ_BLOCK)
            self._next_seq += 1
            return seq

    def _write_state(self, next_seq: int) -> None:
        state = {"format": STATE_FORMAT, "device_id": self.device_id, "next_seq": next_seq}
        write_atomic(self.state_path, json.dumps(state).encode())
        self._reserved_seq = next_seq

    def put(self, metadata: FrameMetadata, jpeg: bytes, *, verify: bool = True) -> SpoolEntry:
        """Store a frame (atomic write; durable as the ``fsync`` policy says), dropping the
        oldest frames if full.

        Args:
            metadata: the frame's metadata (its seq from :meth:`allocate_seq`).
            jpeg: the JPEG bytes.
            verify: check ``jpeg`` against ``metadata.sha256`` (False: the caller just hashed it).

        Raises:
            SpoolError: the frame alone is larger than ``max_bytes``, its frame_id is already
                spooled, or the write failed (disk full, read-only...).
            MessageError: ``jpeg`` does not match ``metadata.sha256``.
        """
        if verify:
            metadata.check_payload(jpeg)
        data = encode_entry(metadata, jpeg)
        if len(data) > self.max_bytes:
            raise SpoolError(f"{self.device_id}: frame {metadata.frame_id} ({len(data)} bytes) "
                             f"is larger than the whole spool ({self.max_bytes} bytes)")
        with self._lock:
            if metadata.frame_id in self._entries:
                raise SpoolError(f"{self.device_id}: frame {metadata.frame_id} is already spooled")
            self._make_room(len(data))
            try:
                seg = self._segment_for(metadata.seq, len(data))
                fd = seg.file()
            except OSError as err:
                raise SpoolError(f"{self.device_id}: frame {metadata.frame_id}: cannot open a "
                                 f"spool segment in {self.segments_dir}: {err}") from err
            offset = seg.size
            seg.size += len(data)
            seg.count += 1
            seg.live += 1
        try:  # outside the lock: the publisher's acks never wait for this disk write
            view = memoryview(data)
            at = offset
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if self.fsync == "always":
                os.fsync(fd)
                self._sync_segments_dir()
        except OSError as err:
            with self._lock:
                seg.live -= 1
                if seg.size == offset + len(data):  # nothing written after it: take it back
                    seg.size = offset
                    seg.count -= 1
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, offset)
                else:
                    with contextlib.suppress(OSError):
                        seg.mark_done(offset, sync=False)
            raise SpoolError(f"{self.device_id}: frame {metadata.frame_id}: "
                             f"cannot write spool entry in {seg.path}: {err}") from err
        entry = SpoolEntry(metadata, seg.path, len(data), offset)
        with self._lock:
            self._entries[metadata.frame_id] = entry
            self._bytes += entry.size
            self._cache[metadata.frame_id] = jpeg
            self._cache_bytes += len(jpeg)
            while self._cache_bytes > CACHE_BYTES and self._cache:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])
            if self.fsync == "interval":
                self._puts += 1
                self._unsynced[metadata.frame_id] = time.monotonic()
                self._start_sync_thread()
                if self._sync_idle:  # waiting with no deadline: give it one (else it has one)
                    self._sync_idle = False
                    self._sync_wake.set()
            else:
                self.fsyncs += 1
        return entry

    def _segment_for(self, seq: int, size: int) -> _Segment:
        """The segment the next entry goes to: the current one, or a new one if it is full.
        Under the lock. Raises OSError."""
        seg = self._current
        if seg is not None and seg.path in self._segments and (
                seg.count < SEGMENT_MAX_FRAMES
                and seg.size + size <= min(SEGMENT_MAX_BYTES, self.max_bytes // 4)):
            return seg
        path = self.segments_dir / f"{seq:012d}.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        new = _Segment(path)
        new.fd = fd
        self._segments[path] = new
        self._current = new
        self._segments_dir_synced = False
        if seg is not None and seg.live == 0 and seg.path in self._segments:
            self._delete_segment(seg)
        return new

    def _sync_segments_dir(self) -> None:
        """fsync the segments directory if a segment was created since. Raises OSError."""
        if not self._segments_dir_synced:
            self._segments_dir_synced = True
            _fsync_dir(self.segments_dir)

    def _delete_segment(self, seg: _Segment) -> None:
        """Delete a segment none of whose entries is spooled any more. Under the lock."""
        seg.close()
        self._segments.pop(seg.path, None)
        if self._current is seg:
            self._current = None
        for path in (seg.path, seg.done_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.error("%s: cannot delete spool segment %s: %s", self.device_id, path, err)

    def _mark_done(self, entry: SpoolEntry) -> None:
        """An entry of a segment is acked or dropped: note it on disk, and delete the segment
        once none of its entries is left (not the one being appended to). Under the lock."""
        seg = self._segments.get(entry.path)
        if seg is None or entry.offset is None:
            return
        try:
            seg.mark_done(entry.offset, sync=self.fsync == "always")
        except OSError as err:
            logger.error("%s: frame %s: cannot record its removal in %s: %s (it may be sent "
                         "again after a restart)", self.device_id, entry.frame_id,
                         seg.done_path, err)
        seg.live -= 1
        if seg.live <= 0 and seg is not self._current:
            self._delete_segment(seg)

    # -- the "interval" fsync policy -----------------------------------------------------
    def _start_sync_thread(self) -> None:
        if self._sync_thread is None and not self._sync_stop.is_set():
            self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name=f"spool-sync-{self.device_id}")
            self._sync_thread.start()

    def _sync_loop(self) -> None:
        while not self._sync_stop.is_set():
            # Wait for the oldest unsynced entry to fall due. With none, but entries put since
            # the last look (acked meanwhile), wait one interval anyway: a put never needs to
            # wake a thread that has a deadline (no later than any new entry's), so at a steady
            # frame rate this thread wakes about once per interval, not once per frame. Only
            # after a whole interval without puts does it wait with no deadline.
            with self._lock:
                oldest = next(iter(self._unsynced.values()), None)
                if oldest is not None:
                    wait: float | None = max(0.0, oldest + self.fsync_interval_s - time.monotonic())
                elif self._puts != self._puts_seen:
                    wait = self.fsync_interval_s
                else:
                    wait = None
                self._puts_seen = self._puts
                self._sync_idle = wait is None
            self._sync_wake.wait(wait)
            self._sync_wake.clear()
            try:
                self.sync(older_than_s=self.fsync_interval_s)
            except Exception:  # noqa: BLE001 - keep syncing; the next pass tries again
                logger.exception("%s: spool fsync failed", self.device_id)

    def sync(self, older_than_s: float = 0.0) -> int:
        """fsync the entries written at least ``older_than_s`` seconds ago, not yet synced and
        still spooled, then the directory; returns how many files were synced.

        Raises:
            OSError: an fsync failed.
        """
        cutoff = time.monotonic() - older_than_s
        due = 0
        files: list[Path] = []  # entries of their own (written by earlier versions)
        fds: list[int] = []  # duplicates of segment descriptors: valid if a segment is deleted
        new_segments = False
        with self._lock:
            seen: set[Path] = set()
            while self._unsynced:
                frame_id, written = next(iter(self._unsynced.items()))
                if written > cutoff:
                    break
                self._unsynced.popitem(last=False)
                entry = self._entries.get(frame_id)
                if entry is None:
                    continue
                due += 1
                if entry.path in seen:
                    continue
                seen.add(entry.path)
                seg = self._segments.get(entry.path)
                if entry.offset is None:
                    files.append(entry.path)
                elif seg is not None:
                    try:
                        fds.append(os.dup(seg.file()))
                    except OSError as err:
                        logger.error("%s: cannot open spool segment %s to fsync it: %s",
                                     self.device_id, seg.path, err)
            if due and not self._segments_dir_synced:
                self._segments_dir_synced = new_segments = True
        try:
            for fd in fds:
                os.fsync(fd)
            for path in files:
                _fsync_file(path)
            if new_segments:
                _fsync_dir(self.segments_dir)
            if files:
                _fsync_dir(self.entries_dir)
        finally:
            for fd in fds:
                os.close(fd)
        if due:
            with self._lock:
                self.fsyncs += due
        return due

    def close(self) -> None:
        """Make every spooled frame durable and write the exact next seq; stop the fsync
        thread. The spool stays usable (a later put starts nothing new)."""
        self._sync_stop.set()
        self._sync_wake.set()
        if self._sync_thread is not None:
            self._sync_thread.join(5.0)
        self.sync()
        with self._lock:
            for seg in self._segments.values():  # reopened if the spool is used again
                seg.close()
            self._current = None
            with contextlib.suppress(OSError):
                if self._reserved_seq != self._next_seq:
                    self._write_state(self._next_seq)

    def _make_room(self, size: int) -> None:
        while self._entries and (
            len(self._entries) + 1 > self.max_frames or self._bytes + size > self.max_bytes
        ):
            frame_id, oldest = next(iter(self._entries.items()))
            self._discard(frame_id)
            self.dropped += 1
            logger.warning("%s: frame %s dropped: spool full (%d frames, %d bytes); %d dropped so far",
                           self.device_id, frame_id, self.max_frames, self.max_bytes, self.dropped)

    def _discard(self, frame_id: str) -> SpoolEntry | None:
        entry = self._entries.pop(frame_id, None)
        if entry is None:
            return None
        self._bytes -= entry.size
        self._unsynced.pop(frame_id, None)
        jpeg = self._cache.pop(frame_id, None)
        if jpeg is not None:
            self._cache_bytes -= len(jpeg)
        if entry.offset is not None:
            self._mark_done(entry)
            return entry
        try:
            entry.path.unlink(missing_ok=True)
        except OSError as err:
            logger.error("%s: frame %s: cannot delete spool entry %s: %s",
                         self.device_id, frame_id, entry.path, err)
        return entry

    # -- acks and reads ------------------------------------------------------------------
    def remove(self, frame_id: str) -> bool:
        """Remove an acknowledged frame; False if it is not (or no longer) spooled."""
        with self._lock:
            entry = self._discard(frame_id)
        if entry is not None:
            self.removed += 1
            if self.fsync == "always" and entry.offset is None:
                with contextlib.suppress(OSError):
                    _fsync_dir(self.entries_dir)
        return entry is not None

    def read(self, frame_id: str) -> tuple[FrameMetadata, bytes] | None:
        """The metadata and JPEG of a spooled frame, checked; None if gone or corrupt.

        A frame written by this process comes from memory (the bytes it was given); one found
        at start is read from its file and checked."""
        with self._lock:
            entry = self._entries.get(frame_id)
            jpeg = self._cache.get(frame_id)
        if entry is None:
            return None
        if jpeg is not None:
            return entry.metadata, jpeg
        if entry.offset is not None:
            return self._read_segment_entry(entry)
        try:
            return decode_entry(entry.path.read_bytes())
        except FileNotFoundError:
            return None  # removed meanwhile (acked or dropped)
        except (OSError, CorruptEntryError) as err:
            with self._lock:
                if self._entries.pop(frame_id, None) is not None:
                    self._bytes -= entry.size
                    self._quarantine(entry.path, str(err), frame_id=frame_id)
            return None

    def _read_segment_entry(self, entry: SpoolEntry) -> tuple[FrameMetadata, bytes] | None:
        assert entry.offset is not None
        with self._lock:
            seg = self._segments.get(entry.path)
            if seg is None or entry.frame_id not in self._entries:
                return None  # removed meanwhile (acked or dropped)
            data = b""
            problem: str | None = None
            try:
                fd = os.dup(seg.file())
            except OSError as err:
                problem = f"unreadable: {err}"
        if problem is None:
            try:
                data = os.pread(fd, entry.size, entry.offset)
                decoded = decode_entry(data)
                if decoded[0] != entry.metadata:
                    raise CorruptEntryError("entry changed on disk since it was loaded")
                return decoded
            except (OSError, CorruptEntryError) as err:
                problem = str(err)
            finally:
                os.close(fd)
        with self._lock:
            if self._entries.pop(entry.frame_id, None) is not None:
                self._bytes -= entry.size
                self._unsynced.pop(entry.frame_id, None)
                self._quarantine_bytes(data, f"{entry.path.stem}-{entry.offset}_{entry.frame_id}.frame",
                                       problem, entry.frame_id)
                self._mark_done(entry)
        return None

    def head(self, n: int) -> list[SpoolEntry]:
        """The ``n`` oldest entries, in capture (seq) order."""
        with self._lock:
            return list(itertools.islice(self._entries.values(), n))

    def has_room(self, size: int = 0) -> bool:
        """True if an entry of ``size`` bytes fits without dropping an older one."""
        with self._lock:
            return len(self._entries) < self.max_frames and self._bytes + size <= self.max_bytes

    def __contains__(self, frame_id: object) -> bool:
        with self._lock:
            return frame_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[SpoolEntry]:
        """All entries in capture (seq) order, as a snapshot."""
        with self._lock:
            return iter(list(self._entries.values()))

    @property
    def total_bytes(self) -> int:
        """Bytes of entry files held now."""
        with self._lock:
            return self._bytes

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq


def _frame_id_in(data: bytes) -> str:
    """The frame_id a garbled entry's header still names, else ``"?"`` (for log lines)."""
    m = re.search(rb'"frame_id":"([A-Za-z0-9._-]{1,200})"', data[:MAX_HEADER_BYTES])
    return m.group(1).decode() if m else "?"
