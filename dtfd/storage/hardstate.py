"""Hard state (term, vote, commit): one small checksummed file, replaced atomically.

Kept out of the WAL so a vote is one small file rewrite, and so its absence is
meaningful: a data dir with a log but no hard state has lost the node's vote, which
could let it vote twice in a term; that is corruption, never a fresh start.
"""

from __future__ import annotations

import os
import struct
import zlib

import msgspec

from dtfd.raft.messages import HardState, encode
from dtfd.storage.interface import StorageCorrupt
from dtfd.storage.files import FsyncFn, WriteFn, write_atomically

FILENAME = "hardstate"
MAGIC = b"DTFH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHH")  # magic, version, payload length
_CRC = struct.Struct("<I")
_decoder = msgspec.msgpack.Decoder(HardState)


def _encode(hard_state: HardState) -> bytes:
    payload = encode(hard_state)
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def write(data_dir: str, hard_state: HardState, fsync: FsyncFn = os.fsync, write: WriteFn = os.write) -> None:
    write_atomically(os.path.join(data_dir, FILENAME), _encode(hard_state), fsync, write)


def read(data_dir: str) -> HardState | None:
    """The stored hard state, or None if there is no file; StorageCorrupt if it is damaged."""
    path = os.path.join(data_dir, FILENAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size + _CRC.size:
        raise StorageCorrupt(path, 0, f"hard state file truncated ({len(data)} bytes)")
    magic, version, length = _HEADER.unpack_from(data)
    if _HEADER.size + length + _CRC.size != len(data):
        raise StorageCorrupt(path, 4, f"hard state length {length} does not match file size {len(data)}")
    if zlib.crc32(data[:-4]) != _CRC.unpack_from(data, len(data) - 4)[0]:
        raise StorageCorrupt(path, len(data) - 4, "hard state crc mismatch")
    if magic != MAGIC or version != FORMAT_VERSION:
        raise StorageCorrupt(path, 0, f"not a hard state file (magic {magic!r}, version {version})")
    try:
        return _decoder.decode(data[_HEADER.size : -4])
    except msgspec.DecodeError as e:
        raise StorageCorrupt(path, _HEADER.size, f"hard state undecodable: {e}") from None
