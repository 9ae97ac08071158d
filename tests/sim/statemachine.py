"""The simulator's replicated state machine: small, but with real state for snapshots.

Commands are `client:seq:payload`. Each is applied once per (client, seq), like dtf's
client id + sequence number dedup, so a retried proposal that commits twice changes
nothing the second time. The state is the last sequence per client, the last few
commands and a running digest over everything applied, so "same applied index, same
state" is a digest comparison, and a snapshot is a few hundred bytes (several chunks at
the simulator's 64-byte snapshot_chunk).
"""

from __future__ import annotations

import hashlib

import msgspec

from dtfd.raft import Entry, EntryKind

RECENT = 8


def command(client: str, seq: int, payload: bytes = b"") -> bytes:
    return b"%s:%d:%s" % (client.encode(), seq, payload)


def parse(data: bytes) -> tuple[str, int]:
    client, seq, _ = data.split(b":", 2)
    return client.decode(), int(seq)


class StateMachine:
    """Applies commands in index order; NOOP entries only advance the index."""

    def __init__(self) -> None:
        self.index = 0
        self.digest = b"\0" * 16
        self.last_seq: dict[str, int] = {}
        self.recent: list[bytes] = []

    def apply(self, entry: Entry) -> None:
        self.index = entry.index
        if entry.kind != EntryKind.NORMAL:
            return
        client, seq = parse(entry.data)
        if seq <= self.last_seq.get(client, 0):
            return
        self.last_seq[client] = seq
        self.digest = hashlib.blake2b(self.digest + entry.data, digest_size=16).digest()
        self.recent = [*self.recent[-(RECENT - 1) :], entry.data]

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode((self.index, self.digest, sorted(self.last_seq.items()), self.recent))

    @classmethod
    def restore(cls, data: bytes) -> StateMachine:
        index, digest, last_seq, recent = msgspec.msgpack.decode(data)
        sm = cls()
        sm.index, sm.digest, sm.last_seq, sm.recent = index, digest, dict(last_seq), recent
        return sm
