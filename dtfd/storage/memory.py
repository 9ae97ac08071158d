"""LogStorage in memory, with a crash model that loses what was never synced.

The simulator needs storage that behaves like a disk across a power cut: whatever
was written after the last `sync()` may be gone when the node comes back, and the
last unsynced append may survive only as a prefix (a torn write). `crash(rng)`
applies that loss; `load()` then returns what a restarted node would find.

Writes reach the "disk" in the order they were made (one ordered stream, like a
WAL holding entries, hard state and snapshot markers), so a crash keeps a prefix
of the unsynced writes. That keeps the loaded state self-consistent (a hard state
written after some entries survives only if those entries did) while still
losing anything the core did not ask to be synced.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dtfd.raft.messages import Entry, HardState, PersistedState, Snapshot


_Write = tuple[str, Any]  # (name of the _Disk method, its argument), in write order


@dataclass
class _Disk:
    """One consistent image of the stored log: hard state, snapshot, entries after it."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def copy(self) -> _Disk:
        return _Disk(self.hard_state, self.snapshot, list(self.entries))

    @property
    def offset(self) -> int:
        """Index of the entry before entries[0]: the snapshot index, or 0."""
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def append(self, entries: Sequence[Entry]) -> None:
        offset = self.offset
        entries = [e for e in entries if e.index > offset]
        if not entries:
            return
        first = entries[0].index
        last = offset + len(self.entries)
        if first > last + 1:
            raise ValueError(f"append: gap in the log, last index {last}, first new index {first}")
        del self.entries[first - offset - 1 :]
        self.entries.extend(entries)

    def install_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.entries = []

    def compact(self, snapshot: Snapshot) -> None:
        if self.snapshot is not None and snapshot.meta.index <= self.snapshot.meta.index:
            return
        drop = snapshot.meta.index - self.offset
        self.snapshot = snapshot
        del self.entries[:drop]

    def set_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def apply(self, op: _Write) -> None:
        getattr(self, op[0])(op[1])


class MemoryStorage:
    """An in-memory LogStorage; `crash()` models a power cut between syncs."""

    def __init__(self) -> None:
        self._durable = _Disk()
        self._current = _Disk()
        self._unsynced: list[_Write] = []

    def load(self) -> PersistedState:
        disk = self._current
        return PersistedState(disk.hard_state, disk.snapshot, tuple(disk.entries))

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        entries = tuple(entries)
        self._current.append(entries)
        self._unsynced.append(("append", entries))

    def set_hard_state(self, hard_state: HardState) -> None:
        self._current.hard_state = hard_state
        self._unsynced.append(("set_hard_state", hard_state))

    def install_snapshot(self, snapshot: Snapshot) -> None:
        self._current.install_snapshot(snapshot)
        self._unsynced.append(("install_snapshot", snapshot))

    def compact(self, snapshot: Snapshot) -> None:
        self._current.compact(snapshot)
        self._unsynced.append(("compact", snapshot))

    def sync(self) -> None:
        for op in self._unsynced:
            self._durable.apply(op)
        self._unsynced.clear()

    def close(self) -> None:
        """Nothing to release; unsynced writes stay pending until sync() or crash()."""

    @property
    def unsynced(self) -> int:
        """How many writes a crash could lose right now."""
        return len(self._unsynced)

    @property
    def durable_hard_state(self) -> HardState:
        return self._durable.hard_state

    @property
    def durable_last_index(self) -> int:
        return self._durable.offset + len(self._durable.entries)

    def durable(self) -> PersistedState:
        """What survives a crash that loses every unsynced write."""
        disk = self._durable
        return PersistedState(disk.hard_state, disk.snapshot, tuple(disk.entries))

    def crash(self, rng: random.Random) -> int:
        """Power cut: keep a random prefix of the unsynced writes, maybe tearing the last append.

        Everything synced survives. Of the writes since, a prefix of random length
        reaches the disk; if the first write that did not fully make it is an
        append, a random prefix of its entries may have. Returns how many writes
        were lost (a torn append counts as lost).
        """
        ops = self._unsynced
        keep = rng.randint(0, len(ops))
        disk = self._durable.copy()
        for op in ops[:keep]:
            disk.apply(op)
        if keep < len(ops) and ops[keep][0] == "append":
            entries: tuple[Entry, ...] = ops[keep][1]
            torn = rng.randrange(len(entries))
            if torn:
                disk.append(entries[:torn])
        self._durable = disk
        self._current = disk.copy()
        self._unsynced = []
        return len(ops) - keep
