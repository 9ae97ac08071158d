"""Snapshots: the state machine image with its SnapshotMeta, one file each.

File layout: magic, version, meta length | msgpack SnapshotMeta | SHA-256 of the
preceding bytes | data. The meta carries the SHA-256 of the data, so both halves are
checked on load. Written under a temp name and renamed; the newest two are kept so
a damaged newest one can fall back to its predecessor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct

import msgspec

from dtfd.raft.messages import Snapshot, SnapshotMeta, encode
from dtfd.storage.interface import StorageCorrupt
from dtfd.storage.files import FsyncFn, WriteFn, fsync_dir, write_atomically

log = logging.getLogger("dtf.storage")

MAGIC = b"DTFSNP"
FORMAT_VERSION = 1
KEEP = 2
_HEADER = struct.Struct("<6sHI")  # magic, version, meta length
_DIGEST_SIZE = 32
_NAME = re.compile(r"^snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_meta_decoder = msgspec.msgpack.Decoder(SnapshotMeta)


def file_name(index: int, term: int) -> str:
    return f"snap-{index:016x}-{term:016x}.snap"


def sealed(snapshot: Snapshot) -> Snapshot:
    """The snapshot with digest and size filled in; ValueError if a given digest is wrong."""
    digest = hashlib.sha256(snapshot.data).hexdigest()
    meta = snapshot.meta
    if meta.digest and meta.digest != digest:
        raise ValueError(f"snapshot {meta.index} digest {meta.digest} does not match its data ({digest})")
    return Snapshot(msgspec.structs.replace(meta, digest=digest, size=len(snapshot.data)), snapshot.data)


def write(snap_dir: str, snapshot: Snapshot, fsync: FsyncFn = os.fsync, write: WriteFn = os.write) -> Snapshot:
    """Store a snapshot durably and return it sealed (digest and size set)."""
    snapshot = sealed(snapshot)
    meta = encode(snapshot.meta)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta)) + meta
    path = os.path.join(snap_dir, file_name(snapshot.meta.index, snapshot.meta.term))
    write_atomically(path, head + hashlib.sha256(head).digest() + snapshot.data, fsync, write)
    log.info("snapshot written path=%s index=%d term=%d size=%d", path, snapshot.meta.index, snapshot.meta.term, len(snapshot.data))
    return snapshot


def list_files(snap_dir: str) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(index, term, path) of each snapshot, newest first, and leftover temp files."""
    if not os.path.isdir(snap_dir):
        return [], []
    found, leftovers = [], []
    for name in os.listdir(snap_dir):
        if m := _NAME.match(name):
            found.append((int(m[1], 16), int(m[2], 16), os.path.join(snap_dir, name)))
        elif name.endswith(".snap.tmp"):
            leftovers.append(os.path.join(snap_dir, name))
    return sorted(found, reverse=True), sorted(leftovers)


def read(path: str) -> Snapshot:
    """Load and check one snapshot file; StorageCorrupt says what is wrong and where."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise StorageCorrupt(path, 0, f"snapshot header truncated ({len(data)} bytes)")
    magic, version, meta_len = _HEADER.unpack_from(data)
    head_end = _HEADER.size + meta_len
    if magic != MAGIC or version != FORMAT_VERSION:
        raise StorageCorrupt(path, 0, f"not a snapshot file (magic {magic!r}, version {version})")
    if head_end + _DIGEST_SIZE > len(data) or hashlib.sha256(data[:head_end]).digest() != data[head_end : head_end + _DIGEST_SIZE]:
        raise StorageCorrupt(path, _HEADER.size, "snapshot meta digest mismatch")
    try:
        meta = _meta_decoder.decode(data[_HEADER.size : head_end])
    except msgspec.DecodeError as e:
        raise StorageCorrupt(path, _HEADER.size, f"snapshot meta undecodable: {e}") from None
    body = data[head_end + _DIGEST_SIZE :]
    if os.path.basename(path) != file_name(meta.index, meta.term):
        raise StorageCorrupt(path, None, f"file name disagrees with meta (index {meta.index}, term {meta.term})")
    if len(body) != meta.size or hashlib.sha256(body).hexdigest() != meta.digest:
        raise StorageCorrupt(path, head_end + _DIGEST_SIZE, "snapshot data digest mismatch")
    return Snapshot(meta, body)


def newest_valid(snap_dir: str) -> tuple[Snapshot | None, list[StorageCorrupt]]:
    """The newest snapshot that passes its checks, and the newer ones that did not.

    Raises the newest snapshot's problem if snapshots exist and none is valid.
    """
    found, _ = list_files(snap_dir)
    skipped: list[StorageCorrupt] = []
    for _, _, path in found:
        try:
            return read(path), skipped
        except StorageCorrupt as e:
            skipped.append(e)
    if skipped:
        raise skipped[0]
    return None, skipped


def prune(snap_dir: str, keep: int = KEEP) -> list[int]:
    """Remove all but the newest `keep` snapshots; return the indexes of those kept."""
    found, _ = list_files(snap_dir)
    for _, _, path in found[keep:]:
        os.unlink(path)
        log.info("snapshot removed path=%s", path)
    if found[keep:]:
        fsync_dir(snap_dir)
    return [index for index, _, _ in found[:keep]]
