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

Files (entries and ``state.json``) are written atomically: a ``.tmp`` file is written and
fsynced, renamed into place, then the directory is fsynced. A leftover ``.tmp`` (SIGKILL during
a write) is deleted at load; a file that is truncated, garbled, or whose bytes do not match its
sha256 is logged and moved to ``quarantine/``, never sent.

``next_seq`` in ``state.json`` survives restarts, so seq (and the frame_ids built from it)
keep counting up for the life of the spool.
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
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.messages import FrameMetadata, MessageError

logger = logging.getLogger(__name__)

MAGIC = b"FCSPOOL1"
HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
STATE_FORMAT = 1
QUARANTINE_KEEP = 100
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    Writes ``.{name}.tmp``, fsyncs it, renames it over ``path`` and fsyncs the directory.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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

    Raises:
        SpoolError: the directory cannot be created or belongs to another device_id.
    """

    def __init__(self, directory: Path, device_id: str, *, max_frames: int = 10000,
                 max_bytes: int = 1 << 30) -> None:
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
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.quarantine_dir.mkdir(exist_ok=True)
        except OSError as err:
            raise SpoolError(f"{device_id}: cannot create spool directory {directory}: {err}") from err
        self._next_seq = self._load_state()
        self._load_entries()

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
        """Return the next seq and persist the counter (atomically) before returning it."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            state = {"format": STATE_FORMAT, "device_id": self.device_id, "next_seq": self._next_seq}
            write_atomic(self.state_path, json.dumps(state).encode())
            return seq

    def put(self, metadata: FrameMetadata, jpeg: bytes) -> SpoolEntry:
        """Store a frame durably (atomic write, fsync), dropping the oldest frames if full.

        Raises:
            SpoolError: the frame alone is larger than ``max_bytes``, its frame_id is already
                spooled, or the write failed (disk full, read-only...).
            MessageError: ``jpeg`` does not match ``metadata.sha256``.
        """
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
            try:
                write_atomic(path, data)
            except OSError as err:
                path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
                raise SpoolError(f"{self.device_id}: frame {metadata.frame_id}: "
                                 f"cannot write spool entry {path}: {err}") from err
            entry = SpoolEntry(metadata, path, len(data))
            self._entries[metadata.frame_id] = entry
            self._bytes += entry.size
            return entry

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
            with contextlib.suppress(OSError):
                _fsync_dir(self.entries_dir)
        return entry is not None

    def read(self, frame_id: str) -> tuple[FrameMetadata, bytes] | None:
        """The metadata and JPEG of a spooled frame, checked; None if gone or corrupt."""
        with self._lock:
            entry = self._entries.get(frame_id)
        if entry is None:
            return None
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
