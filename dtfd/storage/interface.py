"""The contract between the driver and durable storage.

The Raft core never touches storage: the driver copies each Ready into a LogStorage
and calls `sync()` before it sends the Ready's messages. The WAL implements this
protocol on disk; the simulator implements it in memory with a crash model that
loses whatever was written after the last `sync()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dtfd.raft.messages import Entry, HardState, PersistedState, Snapshot
from dtfd.raft.ready import Ready

EX_DATAERR = 65  # corrupt data: the node refuses to start (sysexits.h)
EX_NOINPUT = 66  # no data directory
EX_IOERR = 74  # the data directory cannot be read or written (read-only, disk full, I/O error)
EX_TEMPFAIL = 75  # the data directory is locked by another running node


class StorageCorrupt(Exception):
    """The data on disk is damaged; serving from it could lose acknowledged writes."""

    def __init__(self, path: str, offset: int | None, problem: str) -> None:
        self.path, self.offset, self.problem = path, offset, problem
        where = path if offset is None else f"{path} at offset {offset}"
        super().__init__(f"corrupt storage: {where}: {problem}")


class StorageFailed(Exception):
    """A write or fsync failed (disk full, I/O error): nothing after the last sync is durable.

    A failed write is undone; after a failed fsync the storage refuses further writes.
    Either way, reopening it loads the last synced state.
    """


class LogStorage(Protocol):
    def load(self) -> PersistedState:
        """Hard state, newest valid snapshot and the contiguous entries after it."""

    def append(self, entries: Sequence[Entry]) -> None:
        """Write entries; any stored entry at or after entries[0].index is replaced."""

    def set_hard_state(self, hard_state: HardState) -> None: ...

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot from the leader: it replaces the whole log."""

    def compact(self, snapshot: Snapshot) -> None:
        """The state machine's own snapshot: keep it, drop entries up to its index."""

    def sync(self) -> None:
        """Make everything written so far durable."""

    def close(self) -> None: ...


def write_ready(storage: LogStorage, rd: Ready) -> None:
    """Copy what a Ready asks to persist, in the order its contract gives; the caller syncs."""
    if rd.snapshot:
        storage.install_snapshot(rd.snapshot)
    if rd.entries:
        storage.append(rd.entries)
    if rd.hard_state:
        storage.set_hard_state(rd.hard_state)
