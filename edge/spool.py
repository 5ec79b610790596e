"""The edge's bounded on-disk spool of frames not yet acknowledged by the cloud.

A frame is written here *before* it is published and removed only when the ingest's ack
arrives, so a crash, a reboot or a lost broker never loses a sampled frame; the only loss is a
full spool, which drops the oldest frames, counts them (:attr:`FrameSpool.dropped`) and logs
each one.

On-disk format (``directory``)::

    state.json                    {"format": 1, "device_id": ..., "next_seq": N}
    entries/{seq:012d}_{frame_id}.frame
    quarantine/                   entries found corrupt at load or read (newest QUARANTINE_KEEP kept)

Each ``.frame`` file is::

    b"FCSPOOL1"                   8-byte magic with format version
    header length                 4 bytes, unsigned big-endian
    header                        UTF-8 JSON {"metadata": FrameMetadata JSON, "jpeg_bytes": n}
    JPEG                          n bytes, whose SHA-256 is metadata.sha256

Files (entries and ``state.json``) are written atomically: a ``.tmp`` file is written,
renamed into place. A leftover ``.tmp`` (SIGKILL during a write) is deleted at load; a file
that is truncated, garbled, or whose bytes do not match its sha256 is logged and moved to
``quarantine/``, never sent.

Durability (``fsync``, issue 9): a killed process loses nothing either way (the page cache
outlives it); the policy decides what a power cut may lose.

- ``"interval"`` (default): an entry still spooled ``fsync_interval_s`` after it was written is
  fsynced (file, then directory) by a background thread. Most frames are acked and deleted long
  before: they never cost an fsync. A power cut loses at most the frames of the last
  ``fsync_interval_s`` not yet acked.
- ``"always"``: each entry is fsynced before :meth:`FrameSpool.put` returns (and the directory
  after each removal): nothing acknowledged to the caller is lost, at two fsyncs a frame.

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
FSYNC_INTERVAL_S = 1.0  # "interval" policy: fsync entries still spooled after this, seconds
FsyncPolicy = Literal["interval", "always"]
_ENTRY_RE = re.compile(r"^(?P<seq>\d{12})_(?P<frame_id>[A-Za-z0-9._-]+)\.frame$")


class SpoolError(RuntimeError):
    """The spool cannot take a frame (too large for it) or its directory is unusable."""


class CorruptEntryError(ValueError):
    """A spool file that cannot be trusted (the message says why)."""


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled frame: its metadata, its file and the file's size in bytes."""

    metadata: FrameMetadata
    path: Path
    size: int

    @property
    def frame_id(self) -> str:
        return self.metadata.frame_id

    @property
    def seq(self) -> int:
        return self.metadata.seq


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
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
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
    header = json.dumps(
        {"metadata": json.loads(metadata.model_dump_json()), "jpeg_bytes": len(jpeg)},
        separators=(",", ":"),
    ).encode()
    return MAGIC + HEADER_LEN.pack(len(header)) + header + jpeg


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
        self._sync_stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._reserved_seq = 0  # state.json says no seq below this was handed out
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
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
        for entry in sorted(loaded, key=lambda e: e.seq):
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
        path = self.entries_dir / f"{metadata.seq:012d}_{metadata.frame_id}.frame"
        with self._lock:
            if metadata.frame_id in self._entries:
                raise SpoolError(f"{self.device_id}: frame {metadata.frame_id} is already spooled")
            self._make_room(len(data))
        try:  # outside the lock: the publisher's acks never wait for this disk write
            write_atomic(path, data, sync=self.fsync == "always")
        except OSError as err:
            path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
            raise SpoolError(f"{self.device_id}: frame {metadata.frame_id}: "
                             f"cannot write spool entry {path}: {err}") from err
        entry = SpoolEntry(metadata, path, len(data))
        with self._lock:
            self._entries[metadata.frame_id] = entry
            self._bytes += entry.size
            self._cache[metadata.frame_id] = jpeg
            self._cache_bytes += len(jpeg)
            while self._cache_bytes > CACHE_BYTES and self._cache:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])
            if self.fsync == "interval":
                first = not self._unsynced
                self._unsynced[metadata.frame_id] = time.monotonic()
                self._start_sync_thread()
                if first:
                    self._sync_wake.set()
            else:
                self.fsyncs += 1
        return entry

    # -- the "interval" fsync policy -----------------------------------------------------
    def _start_sync_thread(self) -> None:
        if self._sync_thread is None and not self._sync_stop.is_set():
            self._sync_thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                 name=f"spool-sync-{self.device_id}")
            self._sync_thread.start()

    def _sync_loop(self) -> None:
        while not self._sync_stop.is_set():
            with self._lock:
                oldest = next(iter(self._unsynced.values()), None)
            wait = None if oldest is None else max(0.0, oldest + self.fsync_interval_s
                                                   - time.monotonic())
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
        due: list[Path] = []
        with self._lock:
            while self._unsynced:
                frame_id, written = next(iter(self._unsynced.items()))
                if written > cutoff:
                    break
                self._unsynced.popitem(last=False)
                entry = self._entries.get(frame_id)
                if entry is not None:
                    due.append(entry.path)
        for path in due:
            _fsync_file(path)
        if due:
            _fsync_dir(self.entries_dir)
            with self._lock:
                self.fsyncs += len(due)
        return len(due)

    def close(self) -> None:
        """Make every spooled frame durable and write the exact next seq; stop the fsync
        thread. The spool stays usable (a later put starts nothing new)."""
        self._sync_stop.set()
        self._sync_wake.set()
        if self._sync_thread is not None:
            self._sync_thread.join(5.0)
        self.sync()
        with self._lock, contextlib.suppress(OSError):
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
            if self.fsync == "always":
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
