"""Raft records and messages: immutable, with one stable msgpack encoding.

Everything that crosses a process boundary (peer links) or a disk (WAL, snapshots)
is one of these Structs, so the wire format and the durable format are defined in
one place and decoding validates types instead of trusting them.
"""

from __future__ import annotations

import enum

import msgspec

NodeId = str
NONE: NodeId = ""


class EntryKind(enum.IntEnum):
    NORMAL = 0
    NOOP = 1  # appended by every new leader so it can commit entries of earlier terms
    CONFIG = 2  # reserved for single-server membership changes


class Entry(msgspec.Struct, frozen=True, array_like=True):
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, frozen=True, array_like=True):
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: NodeId = NONE
    commit: int = 0


class ConfState(msgspec.Struct, frozen=True, array_like=True):
    voters: tuple[NodeId, ...]
    learners: tuple[NodeId, ...] = ()


class SnapshotMeta(msgspec.Struct, frozen=True, array_like=True):
    index: int
    term: int
    conf: ConfState
    digest: str = ""  # SHA-256 of the data, hex; lets a follower resume a chunked transfer safely
    size: int = 0


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    meta: SnapshotMeta
    data: bytes


class SnapshotChunk(msgspec.Struct, frozen=True, array_like=True):
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


class MessageType(enum.IntEnum):
    VOTE = 1
    VOTE_RESP = 2
    PRE_VOTE = 3
    PRE_VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    SNAPSHOT_RESP = 10
    TIMEOUT_NOW = 11
    READ_INDEX = 12
    READ_INDEX_RESP = 13


class Message(msgspec.Struct, frozen=True, omit_defaults=True):
    """One Raft message. Field use per type follows etcd's raftpb.Message.

    APPEND: index/log_term name the entry before `entries`; commit is the leader's.
    APPEND_RESP: index is the follower's last matching index; on reject, hint_index and
    hint_term let the leader skip a whole conflicting term at once.
    SNAPSHOT_RESP: index is the next byte offset the follower wants.
    rejoining: on APPEND_RESP and HEARTBEAT_RESP from a node whose log was reset (a reseed),
    which may end before what it acknowledged earlier; commit is its commit index, and on a
    HEARTBEAT_RESP index is its last index.
    """

    type: MessageType
    src: NodeId
    dst: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0
    context: bytes = b""
    snapshot: SnapshotChunk | None = None
    rejoining: bool = False


class PersistedState(msgspec.Struct, frozen=True):
    """What a node finds on its disk at start: the input to `Raft(config, persisted)`."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()


_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode_message(data: bytes) -> Message:
    """Decode a peer frame; raises msgspec.DecodeError / ValidationError on bad input."""
    return _message_decoder.decode(data)
