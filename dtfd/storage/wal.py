"""Write-ahead log: Raft entries in segmented, CRC-framed, append-only files.

Modelled on etcd's wal package. A WAL directory holds segments named
`<seq:016x>-<first index:016x>.wal`; each opens with a header (magic, format version,
seq, first index, CRC32) and continues with records:

    length u32 | type u8 | 3 zero bytes | term u64 | index u64 | crc32 u32 | payload

where type is 1 + EntryKind (0 never appears, so zero fill never parses) and the CRC
covers the first 24 header bytes and the payload. Segments are created under a temp
name and renamed, so a segment file either has a whole header or does not exist.

A crash mid-write leaves at most one damaged record, at the very end of the last
segment, with nothing valid after it: that torn tail is cut off on open. A bad
record with a valid one after it, or anywhere but the last segment, a missing
segment, or an index or term going backwards is corruption (`StorageCorrupt`): a
damaged log must not serve, since it may have lost acknowledged entries. A bit flip
in the length field of a record looks like a record running past the end of the
file; it is a torn tail only if no valid record follows it.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from dtfd.raft.messages import Entry, EntryKind
from dtfd.storage.files import FsyncFn, WriteFn, fsync_dir, write_all, write_atomically
from dtfd.storage.interface import StorageCorrupt, StorageFailed

log = logging.getLogger("dtf.storage")

SEGMENT_SIZE = 64 * 1024 * 1024
FORMAT_VERSION = 1
SEGMENT_MAGIC = b"DTFWAL"

_SEGMENT_HEADER = struct.Struct("<6sHQQI")  # magic, version, seq, first index, crc32
_RECORD_PREFIX = struct.Struct("<IB3xQQ")  # length, type, term, index
_RECORD_HEADER = struct.Struct("<IB3xQQI")  # ... followed by crc32
_CRC = struct.Struct("<I")
_TYPE_OFFSET = 4  # the type byte follows the u32 length
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size
RECORD_HEADER_SIZE = _RECORD_HEADER.size
_PREFIX_SIZE = _RECORD_PREFIX.size
_TYPES = frozenset(kind + 1 for kind in EntryKind)
_KINDS = {kind + 1: kind for kind in EntryKind}
# Where a record could start: a valid type byte followed by the three zero pad bytes.
_CANDIDATE = re.compile(rb"(?=[%s]\x00\x00\x00)" % b"".join(re.escape(bytes([t])) for t in sorted(_TYPES)))
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")

def segment_name(seq: int, first_index: int) -> str:
    return f"{seq:016x}-{first_index:016x}.wal"


def encode_records(entries: Sequence[Entry]) -> bytes:
    """Frame entries as records: one bytes object, written with a single write()."""
    parts = []
    for e in entries:
        prefix = _RECORD_PREFIX.pack(len(e.data), e.kind + 1, e.term, e.index)
        parts += (prefix, _CRC.pack(zlib.crc32(e.data, zlib.crc32(prefix))), e.data)
    return b"".join(parts)


@dataclass(frozen=True)
class Finding:
    """Damage that is not corruption (a torn tail, a leftover temp file): opening repairs it."""

    path: str
    offset: int | None
    problem: str


@dataclass
class Segment:
    path: str
    seq: int
    first_index: int
    offsets: array = field(default_factory=lambda: array("Q"))  # record start offsets
    size: int = SEGMENT_HEADER_SIZE  # end of the last valid record
    first_term: int = 0
    last_term: int = 0

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1


@dataclass
class WalScan:
    """What a read-only pass over a WAL directory found; `corrupt` set means stop."""

    segments: list[Segment]
    entries: list[Entry]
    torn: Finding | None = None
    corrupt: StorageCorrupt | None = None
    leftovers: list[str] = field(default_factory=list)  # temp files of an interrupted segment creation

    @property
    def first_index(self) -> int:
        return self.segments[0].first_index if self.segments else 0

    @property
    def next_index(self) -> int:
        return self.segments[-1].last_index + 1 if self.segments else 0


def _record_ok(data: bytes, off: int) -> bool:
    if len(data) - off < RECORD_HEADER_SIZE:
        return False
    length, rtype, _, _, crc = _RECORD_HEADER.unpack_from(data, off)
    end = off + RECORD_HEADER_SIZE + length
    if end > len(data) or rtype not in _TYPES:
        return False
    view = memoryview(data)
    return zlib.crc32(view[off + RECORD_HEADER_SIZE : end], zlib.crc32(view[off : off + _PREFIX_SIZE])) == crc


def _valid_record_after(data: bytes, start: int) -> bool:
    """Whether any valid record starts after `start`: what tells a torn tail from corruption."""
    return any(_record_ok(data, m.start() - _TYPE_OFFSET) for m in _CANDIDATE.finditer(data, start + 1 + _TYPE_OFFSET))


def _read_segment_header(path: str, data: bytes, seq: int, first_index: int) -> StorageCorrupt | None:
    if len(data) < SEGMENT_HEADER_SIZE:
        return StorageCorrupt(path, 0, f"segment header truncated ({len(data)} bytes)")
    magic, version, hseq, hfirst, crc = _SEGMENT_HEADER.unpack_from(data)
    if zlib.crc32(data[: SEGMENT_HEADER_SIZE - 4]) != crc:
        return StorageCorrupt(path, 0, "segment header crc mismatch")
    if magic != SEGMENT_MAGIC:
        return StorageCorrupt(path, 0, f"bad segment magic {magic!r}")
    if version != FORMAT_VERSION:
        return StorageCorrupt(path, 0, f"unsupported segment format version {version}")
    if (hseq, hfirst) != (seq, first_index):
        return StorageCorrupt(path, 0, f"segment header says seq {hseq} first index {hfirst}, name disagrees")
    return None


def _scan_records(seg: Segment, data: bytes, prev_term: int, last: bool, entries: list[Entry]) -> Finding | None:
    """Parse one segment's records into `entries`; raise StorageCorrupt on damage."""
    view = memoryview(data)
    off, index, term, n = SEGMENT_HEADER_SIZE, seg.first_index, prev_term, len(data)
    unpack, head, crc32 = _RECORD_HEADER.unpack_from, RECORD_HEADER_SIZE, zlib.crc32
    while off < n:
        if n - off < head:
            problem = "partial record header"
        else:
            length, rtype, rterm, rindex, crc = unpack(data, off)
            end = off + head + length
            if end > n:
                problem = f"record length {length} runs past end of segment"
            elif crc32(view[off + head : end], crc32(view[off : off + _PREFIX_SIZE])) != crc:
                problem = "record crc mismatch"
            elif rtype not in _TYPES:
                raise StorageCorrupt(seg.path, off, f"unknown record type {rtype}")
            elif rindex != index:
                raise StorageCorrupt(seg.path, off, f"record index {rindex} where {index} expected")
            elif rterm < term:
                raise StorageCorrupt(seg.path, off, f"record term {rterm} after term {term}")
            else:
                entries.append(Entry(rterm, rindex, _KINDS[rtype], data[off + head : end]))
                seg.offsets.append(off)
                if index == seg.first_index:
                    seg.first_term = rterm
                seg.last_term = term = rterm
                off, index = end, index + 1
                continue
        if last and not _valid_record_after(data, off):
            seg.size = off
            return Finding(seg.path, off, problem)
        raise StorageCorrupt(seg.path, off, problem + " (valid data follows)" if last else problem)
    seg.size = off
    return None


def list_segments(wal_dir: str) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(seq, first index, path) of each segment in seq order, and leftover temp files."""
    found, leftovers = [], []
    for name in os.listdir(wal_dir):
        path = os.path.join(wal_dir, name)
        if name.endswith(".wal.tmp"):
            leftovers.append(path)
        elif m := _SEGMENT_NAME.match(name):
            found.append((int(m[1], 16), int(m[2], 16), path))
        elif name.endswith(".wal"):
            raise StorageCorrupt(path, None, "segment file with a malformed name")
    return sorted(found), sorted(leftovers)


def scan(wal_dir: str) -> WalScan:
    """Read every segment without modifying anything."""
    result = WalScan([], [])
    if not os.path.isdir(wal_dir):
        return result
    try:
        found, result.leftovers = list_segments(wal_dir)
        term = 0
        for i, (seq, first, path) in enumerate(found):
            if result.segments:
                prev = result.segments[-1]
                if seq != prev.seq + 1:
                    raise StorageCorrupt(path, None, f"segment seq {seq} follows {prev.seq}: missing segment")
                if first != prev.last_index + 1:
                    raise StorageCorrupt(path, None, f"segment starts at index {first}, expected {prev.last_index + 1}")
            with open(path, "rb") as f:
                data = f.read()
            if problem := _read_segment_header(path, data, seq, first):
                raise problem
            seg = Segment(path, seq, first)
            result.segments.append(seg)
            result.torn = _scan_records(seg, data, term, i == len(found) - 1, result.entries)
            term = seg.last_term or term
    except StorageCorrupt as e:
        result.corrupt = e
    return result


class Wal:
    """The open, writable log. `write` and `fsync` are injectable for fault tests."""

    def __init__(
        self,
        wal_dir: str,
        scanned: WalScan,
        *,
        segment_size: int = SEGMENT_SIZE,
        write: WriteFn = os.write,
        fsync: FsyncFn = os.fdatasync,
    ) -> None:
        self.dir, self.segment_size = wal_dir, segment_size
        self._write, self._fsync = write, fsync
        self._segments = scanned.segments
        self._fd = -1
        self._unsynced = False
        self._failed: StorageFailed | None = None
        if self._segments:
            self._open_tail()

    @classmethod
    def open(cls, wal_dir: str, first_index: int = 1, scanned: WalScan | None = None, **options) -> tuple[Wal, list[Entry]]:
        """Cut off a torn tail and open for appending; a fresh dir starts at `first_index`.

        `scanned` is a `scan(wal_dir)` the caller already made, to avoid reading twice.
        """
        os.makedirs(wal_dir, exist_ok=True)
        scanned = scanned or scan(wal_dir)
        if scanned.corrupt:
            raise scanned.corrupt
        for path in scanned.leftovers:
            os.unlink(path)
        if scanned.torn:
            t = scanned.torn
            with open(t.path, "r+b") as f:
                f.truncate(t.offset)
                os.fsync(f.fileno())
            log.warning('wal torn tail truncated path=%s offset=%d problem="%s"', t.path, t.offset, t.problem)
        wal = cls(wal_dir, scanned, **options)
        if not wal._segments:
            wal._create_segment(0, first_index)
        return wal, scanned.entries

    @property
    def first_index(self) -> int:
        return self._segments[0].first_index

    @property
    def last_index(self) -> int:
        return self._segments[-1].last_index

    @property
    def last_term(self) -> int:
        return next((s.last_term for s in reversed(self._segments) if s.offsets), 0)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def term_at(self, index: int) -> int:
        """Term of the stored entry at `index` (read from its record header)."""
        seg = self._segment_of(index)
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            header = os.pread(fd, RECORD_HEADER_SIZE, seg.offsets[index - seg.first_index])
        finally:
            os.close(fd)
        return _RECORD_HEADER.unpack(header)[2]

    def append(self, entries: Sequence[Entry]) -> None:
        """Write entries (not yet durable); entries at or after entries[0].index are replaced."""
        self._check_usable()
        if not entries:
            return
        first = entries[0].index
        for prev, e in zip(entries, entries[1:]):
            if e.index != prev.index + 1 or e.term < prev.term:
                raise ValueError(f"entries not contiguous: ({prev.term}, {prev.index}) then ({e.term}, {e.index})")
        if not self.first_index <= first <= self.last_index + 1:
            raise ValueError(f"append at {first} outside the log [{self.first_index}, {self.last_index + 1}]")
        if first == self.last_index + 1:
            prev_term = self.last_term
        else:
            prev_term = self.term_at(first - 1) if first > self.first_index else 0
        if entries[0].term < prev_term:
            raise ValueError(f"term {entries[0].term} at {first} after term {prev_term}")
        if first <= self.last_index:
            self._truncate_from(first)
        seg = self._segments[-1]
        data, base = encode_records(entries), seg.size
        try:
            write_all(self._fd, data, self._write)
        except OSError as e:
            self._roll_back(base, e)
        self._unsynced = True
        offsets, off = seg.offsets, base
        for e in entries:
            offsets.append(off)
            off += RECORD_HEADER_SIZE + len(e.data)
        if not seg.first_term:
            seg.first_term = entries[0].term
        seg.last_term, seg.size = entries[-1].term, off
        if seg.size >= self.segment_size:
            self.sync()
            self._create_segment(seg.seq + 1, seg.last_index + 1)

    def sync(self) -> None:
        """fdatasync the open segment, if anything was written since the last sync."""
        self._check_usable()
        if not self._unsynced:
            return
        try:
            self._fsync(self._fd)
            self._unsynced = False
        except OSError as e:
            self._failed = StorageFailed(f"wal fsync failed: {self._segments[-1].path}: {e.strerror or e}")
            log.error('wal fsync failed path=%s error="%s"', self._segments[-1].path, e)
            raise self._failed from e

    def compact(self, keep_after: int) -> None:
        """Remove whole segments holding only entries at or below `keep_after`, oldest first."""
        self._check_usable()
        while len(self._segments) > 1 and self._segments[1].first_index - 1 <= keep_after:
            seg = self._segments.pop(0)
            os.unlink(seg.path)
            log.info("wal segment removed path=%s last_index=%d", seg.path, seg.last_index)
            fsync_dir(self.dir)

    def reset(self, next_index: int) -> None:
        """Drop every segment (newest first, so a crash leaves a prefix) and restart at `next_index`."""
        self._check_usable()
        seq = self._segments[-1].seq + 1
        self._close_fd()
        self._remove_segments_after(-1)
        self._create_segment(seq, next_index)
        log.info("wal reset dir=%s next_index=%d", self.dir, next_index)

    def close(self) -> None:
        self._close_fd()

    def _check_usable(self) -> None:
        if self._failed:
            raise self._failed
        if self._fd < 0:
            raise StorageFailed(f"wal {self.dir} is closed")

    def _segment_of(self, index: int) -> Segment:
        i = bisect_right([s.first_index for s in self._segments], index) - 1
        if i < 0 or index > self._segments[i].last_index:
            raise IndexError(f"index {index} not in the log")
        return self._segments[i]

    def _truncate_from(self, index: int) -> None:
        """Cut the log back to before `index`, durably, before new entries go in its place."""
        seg = self._segment_of(index)
        keep = self._segments.index(seg)
        self._close_fd()
        self._remove_segments_after(keep)
        offset = seg.offsets[index - seg.first_index]
        del seg.offsets[index - seg.first_index :]
        seg.size = offset
        if not seg.offsets:
            seg.first_term = seg.last_term = 0
        self._open_tail()
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        if seg.offsets:
            seg.last_term = self.term_at(seg.last_index)
        log.info("wal tail replaced path=%s offset=%d from_index=%d", seg.path, offset, index)

    def _remove_segments_after(self, keep: int) -> None:
        while len(self._segments) > keep + 1:
            os.unlink(self._segments.pop().path)
            fsync_dir(self.dir)

    def _roll_back(self, size: int, error: OSError) -> None:
        path = self._segments[-1].path
        log.error('wal write failed path=%s offset=%d error="%s"', path, size, error)
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            self._failed = StorageFailed(f"wal write failed and could not be undone: {path}: {error}")
            raise self._failed from error
        raise StorageFailed(f"wal write failed: {path}: {error.strerror or error}") from error

    def _create_segment(self, seq: int, first_index: int) -> None:
        path = os.path.join(self.dir, segment_name(seq, first_index))
        header = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, seq, first_index, 0)[:-4]
        try:
            write_atomically(path, header + _CRC.pack(zlib.crc32(header)), self._fsync, self._write)
        except OSError as e:
            raise StorageFailed(f"cannot create wal segment {path}: {e.strerror or e}") from e
        self._close_fd()
        self._segments.append(Segment(path, seq, first_index))
        self._open_tail()
        log.info("wal segment created path=%s first_index=%d", path, first_index)

    def _open_tail(self) -> None:
        self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
