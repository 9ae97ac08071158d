"""The Raft log as the core sees it: a snapshot point plus the entries after it.

It tracks three positions the driver cares about: `stable` (persisted through a
Ready), `committed` (safe to apply) and `applying`/`applied` (handed to and acked by
the state machine). Everything here is in memory; durability is the driver's job.
"""

from __future__ import annotations

from collections.abc import Sequence

from dtfd.raft.messages import Entry, Snapshot, SnapshotMeta

ENTRY_OVERHEAD = 16  # bytes counted per entry on top of its data when sizing messages


class RaftLog:
    def __init__(self, snapshot: SnapshotMeta | None, entries: Sequence[Entry], committed: int) -> None:
        self.snapshot_index = snapshot.index if snapshot else 0
        self.snapshot_term = snapshot.term if snapshot else 0
        self._entries: list[Entry] = list(entries)
        for offset, entry in enumerate(self._entries):
            if entry.index != self.snapshot_index + 1 + offset:
                raise ValueError(f"persisted entries: index {entry.index} breaks the sequence")
        if committed > self.last_index:
            raise ValueError(f"persisted commit {committed} is beyond the last index {self.last_index}")
        # A snapshot holds only committed state; a crash between writing it and the hard
        # state may leave the persisted commit behind it.
        self.committed = max(committed, self.snapshot_index)
        self.applied = self.snapshot_index
        self.applying = self.snapshot_index
        self.stable = self.last_index
        self.pending_snapshot: Snapshot | None = None

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if it is compacted or absent."""
        offset = index - self.snapshot_index
        if offset == 0:
            return self.snapshot_term
        if 0 < offset <= len(self._entries):
            return self._entries[offset - 1].term
        return None

    def entries(self, lo: int, hi: int, max_entries: int = 0, max_bytes: int = 0) -> list[Entry]:
        """Entries [lo, hi); with limits, at least one entry and at most the limits."""
        base = self.first_index
        if lo < base:
            raise IndexError(f"entries from {lo} are compacted (first index {base})")
        if max_entries:
            hi = min(hi, lo + max_entries)
        batch = self._entries[lo - base : hi - base]
        if max_bytes:
            size = 0
            for n, entry in enumerate(batch):
                size += len(entry.data) + ENTRY_OVERHEAD
                if size > max_bytes and n:
                    return batch[:n]
        return batch

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Would a candidate with this log tail be at least as current as we are (Raft 5.4.1)?"""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def append(self, entries: Sequence[Entry]) -> None:
        """Leader-side append at the tail."""
        self._entries.extend(entries)

    def maybe_append(self, prev_index: int, prev_term: int, commit: int, entries: Sequence[Entry]) -> int | None:
        """Follower-side append after (prev_index, prev_term); None if the log does not match there."""
        if self.term(prev_index) != prev_term:
            return None
        last_new = prev_index + len(entries)
        conflict = self._find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                return None  # would rewrite committed history: refuse rather than diverge
            self._truncate_and_append(entries[conflict - entries[0].index :])
        self.commit_to(min(commit, last_new))
        return last_new

    def _find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry that is new or differs in term, or 0 if all are present."""
        if not entries:
            return 0
        last = entries[-1]
        if self.term(last.index) == last.term:
            return 0  # Log Matching: the whole batch is already here
        for entry in entries:
            if self.term(entry.index) != entry.term:
                return entry.index
        return 0

    def _truncate_and_append(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        del self._entries[first - self.first_index :]
        self._entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= `index` whose term is <= `term`: where two logs may agree."""
        if index > self.last_index:
            return index
        while index > self.snapshot_index:
            t = self.term(index)
            if t is None or t <= term:
                break
            index -= 1
        return index

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            self.committed = min(index, self.last_index)

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries[self.stable + 1 - self.first_index :])

    def stable_to(self, index: int, term: int) -> None:
        if index > self.stable and self.term(index) == term:
            self.stable = index

    def next_committed(self) -> tuple[Entry, ...]:
        lo = max(self.applying, self.snapshot_index) + 1
        if lo > self.committed:
            return ()
        return tuple(self._entries[lo - self.first_index : self.committed + 1 - self.first_index])

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log with a snapshot received from the leader."""
        meta = snapshot.meta
        self.snapshot_index, self.snapshot_term = meta.index, meta.term
        self._entries.clear()
        self.committed = meta.index
        self.stable = meta.index
        self.applying = max(self.applying, meta.index)
        self.pending_snapshot = snapshot

    def compact(self, index: int) -> None:
        """Drop entries up to `index`, which the state machine has captured in a snapshot."""
        term = self.term(index)
        if term is None or index > self.applied:
            raise ValueError(f"cannot compact to {index}: applied {self.applied}, log [{self.first_index}, {self.last_index}]")
        del self._entries[: index - self.snapshot_index]
        self.snapshot_index, self.snapshot_term = index, term
