"""Group commit: concurrent appends share one write and one fsync.

Proposers queue entries; a single flusher task writes everything queued and syncs it
in a worker thread, then wakes the proposers that sync covered. Entries that arrive
while a sync is in flight wait for the next one, so N concurrent proposers cost about
two fsyncs instead of N. The flusher runs in a nursery its owner provides:

    async with trio.open_nursery() as nursery:
        commit = GroupCommit(storage)
        await nursery.start(commit.run)
        await commit.append(entries)  # returns once the entries are durable

Callers assign indexes at the moment they call `append` (no checkpoint between):
`append` queues before its first checkpoint, so queue order is index order. Tasks
started together may run in any order, so an index chosen before `start_soon` is not.
A failed write fails its batch, everything queued behind it and every later append
(their indexes would leave a gap): the owner must reopen the storage.

`PersistPlacement` decides where a write runs. A worker thread costs a hop and two GIL
handoffs each way, more than a fast fdatasync itself, so a small write on a disk that
has been fast runs on the event loop. A big batch (concurrent writers: the loop should
read their next requests meanwhile) and everything after a slow write go to a thread,
so a disk stall never freezes the loop for longer than the one write that revealed it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from dtfd.raft.messages import Entry
from dtfd.storage.interface import LogStorage, StorageFailed


class PersistPlacement:
    """On the loop while the last writes were fast and this one is small; else in a thread."""

    def __init__(
        self, *, fast_s: float = 0.002, max_entries: int = 4, max_bytes: int = 256 * 1024, recent: int = 8
    ) -> None:
        self.fast_s, self.max_entries, self.max_bytes = fast_s, max_entries, max_bytes
        self._recent: deque[float] = deque([0.0], maxlen=recent)

    def inline(self, entries: Sequence[Entry]) -> bool:
        return (
            max(self._recent) < self.fast_s
            and len(entries) <= self.max_entries
            and sum(len(e.data) for e in entries) <= self.max_bytes
        )

    def record(self, seconds: float) -> None:
        """How long a write + sync took, wherever it ran."""
        self._recent.append(seconds)


class GroupCommitClosed(Exception):
    """The flusher stopped before these entries were written; they may or may not be durable."""


@dataclass
class _Batch:
    entries: list[Entry] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class GroupCommit:
    """Write-and-sync for concurrent appenders. `enabled=False` syncs each append on its own."""

    def __init__(self, storage: LogStorage, *, enabled: bool = True, placement: PersistPlacement | None = None) -> None:
        self.storage, self.enabled = storage, enabled
        self.placement = placement or PersistPlacement()
        self.flushes = 0
        self._queue: list[_Batch] = []
        self._wakeup = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._running = False
        self._closed = False
        self._failed: BaseException | None = None

    async def append(self, entries: Sequence[Entry]) -> None:
        """Queue entries and return once they are durable; raise what the write raised."""
        if self._failed is not None:
            raise StorageFailed(f"an earlier group commit write failed: {self._failed}") from self._failed
        if self._closed or not self._running:
            raise GroupCommitClosed("group commit flusher is not running")
        if not self._queue or not self.enabled:
            self._queue.append(_Batch())
        batch = self._queue[-1]
        batch.entries += entries
        self._wakeup.set()
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: runs until cancelled, then fails whatever is still queued."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                batch = self._queue.pop(0)
                if not self._queue:
                    self._wakeup = trio.Event()
                try:
                    if self.placement.inline(batch.entries):
                        self._flush(batch.entries)
                    else:
                        await trio.to_thread.run_sync(self._flush, batch.entries, limiter=self._limiter)
                except Exception as e:
                    self._failed = batch.error = e
                    self._fail_queued(StorageFailed(f"an earlier group commit write failed: {e}"))
                batch.done.set()
        finally:
            self._closed = True
            self._fail_queued(GroupCommitClosed("group commit stopped before these entries were written"))

    def _fail_queued(self, error: BaseException) -> None:
        for batch in self._queue:
            batch.error = error
            batch.done.set()
        self._queue.clear()
        self._wakeup = trio.Event()

    def _flush(self, entries: list[Entry]) -> None:
        started = time.monotonic()
        self.storage.append(entries)
        self.storage.sync()
        self.placement.record(time.monotonic() - started)
        self.flushes += 1
