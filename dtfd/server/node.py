"""The driver: runs the Raft core on trio with real time, real disks and real peers.

One task ticks the core on the monotonic clock, one feeds it peer messages, one drains
its Readys: persist (one fsync per Ready), then send, then apply and answer the clients
waiting on those indexes. Proposals that arrive while an fsync is in flight land in the
next Ready, which is what makes this group commit.

A Ready is persisted on the loop or in a worker thread as `PersistPlacement` decides:
on the loop while small and the disk fast (the thread hop is most of a sequential
write's latency), in a thread for many entries and after any slow persist, so the loop
keeps serving the API and the peers while the disk catches up. A snapshot always goes
to a thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from dtfd.journal import fields
from dtfd.raft import Config as RaftConfig
from dtfd.raft import EntryKind, Message, NotLeader, Proposed, Raft, Ready, Refused, Role
from dtfd.state.machine import Envelope, Result, StateMachine, encode_envelope, image_digest
from dtfd.storage.groupcommit import PersistPlacement
from dtfd.storage.interface import LogStorage, write_ready

log = logging.getLogger("dtf.node")

CHECKSUM_LOOP_SHARE = 0.1  # encoding the state for /v1/status takes at most this share of the event loop
CHECKPOINTS_KEPT = 4  # recent (index, checksum) pairs in /v1/status, so nodes at different indexes still share one
ENCODE_BYTES_PER_ENTRY = 4096  # checkpoints, and compactions, of a big state are spaced to encode at most this per applied entry


class NotLeaderError(Exception):
    """This node cannot order the request; `leader` is who can, if known."""

    def __init__(self, leader: str) -> None:
        self.leader = leader
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")


class Unavailable(Exception):
    """The request's outcome is unknown (leader lost, timeout); retry with the same client/seq."""


@dataclass
class Timing:
    tick_s: float
    snapshot_every: int  # compact the log after this many applied entries (at a checkpoint, for a big state)
    checksum_every: int = 1000  # checkpoints (index, state checksum) at multiples of this index; see checkpoint_stride()


@dataclass
class _Proposal:
    term: int
    event: trio.Event
    result: Result | Unavailable | None = None


@dataclass
class _Read:
    event: trio.Event
    index: int | None = None


class Node:
    def __init__(
        self,
        raft_config: RaftConfig,
        storage: LogStorage,
        timing: Timing,
        send: Callable[[Sequence[Message]], None],
        observe_sync: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.id = raft_config.id
        self._observe_sync = observe_sync
        self.storage = storage
        self.timing = timing
        self._send = send
        persisted = storage.load()
        self.core = Raft(raft_config, persisted)
        self.machine = StateMachine()
        self._sized(len(persisted.snapshot.data) if persisted.snapshot else 0)
        if persisted.snapshot:
            self.machine.restore(persisted.snapshot.data)
        self._wake = trio.Event()
        self.placement = PersistPlacement()
        self._applied_event = trio.Event()
        self._proposals: dict[int, _Proposal] = {}
        self._reads: dict[bytes, _Read] = {}
        self._read_ids = itertools.count(1)
        self._checksum: tuple[int, str] = (-1, "")
        self._checksum_due = 0.0  # monotonic: when the state may be encoded again for a checksum
        self.checkpoints: deque[tuple[int, str]] = deque(maxlen=CHECKPOINTS_KEPT)
        self._unhashed: list[tuple[int, bytes]] = []  # checkpoints encoded, not yet hashed
        self._checkpointed: tuple[int, bytes] | None = None  # one taken since the last compaction check: it may compact for free
        self._hash_wake = trio.Event()
        self._compactions: list[trio.Event] = []  # compactions asked for, done between two Readys
        self.started = time.monotonic()
        self.leader_changes = 0
        self.healthy = True
        self.last_tick = time.monotonic()
        self._role_seen: tuple[Role, int, str] = (self.core.role, self.core.term, self.core.leader)
        self.on_change: list[Callable[[], None]] = []
        self.on_apply: list[Callable[[int, Envelope, Result], None]] = []

    # ---- what the API calls -------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.core.role is Role.LEADER

    async def propose(self, envelope: Envelope, timeout: float = 5.0) -> Result:
        """Replicate one command and return its result once applied here."""
        (result,) = await self.propose_all([envelope], timeout)
        return result

    async def propose_all(self, envelopes: Sequence[Envelope], timeout: float = 5.0) -> list[Result]:
        """Replicate commands in this order, in one Ready (one fsync, one append per peer),
        and return their results once all are applied here."""
        waiting: list[tuple[int, _Proposal]] = []
        try:
            for envelope in envelopes:
                outcome = self.core.propose(encode_envelope(envelope))
                self._raise_refusal(outcome)
                assert isinstance(outcome, Proposed)
                waiting.append((outcome.last_index, _Proposal(outcome.term, trio.Event())))
                self._proposals[outcome.last_index] = waiting[-1][1]
            self._wake.set()
            with trio.move_on_after(timeout):
                for _, waiter in waiting:
                    await waiter.event.wait()
        finally:
            for index, _ in waiting:
                self._proposals.pop(index, None)
        results = []
        for _, waiter in waiting:
            if waiter.result is None:
                raise Unavailable("timed out waiting for commit; outcome unknown")
            if isinstance(waiter.result, Unavailable):
                raise waiter.result
            results.append(waiter.result)
        return results

    async def read_barrier(self, timeout: float = 5.0) -> None:
        """Wait until a linearizable read may be served from the local state (ReadIndex)."""
        context = next(self._read_ids).to_bytes(8, "big")
        self._raise_refusal(self.core.read_index(context))
        waiter = _Read(trio.Event())
        self._reads[context] = waiter
        self._wake.set()
        with trio.move_on_after(timeout):
            await waiter.event.wait()
        self._reads.pop(context, None)
        if waiter.index is None or waiter.index > self.machine.applied:
            raise Unavailable("read index not confirmed in time")

    def transfer_leadership(self, to: str) -> None:
        self._raise_refusal(self.core.transfer_leadership(to))
        self._wake.set()

    def step_down(self) -> None:
        self._raise_refusal(self.core.step_down())
        self._wake.set()

    async def compact_now(self, timeout: float = 30.0) -> None:
        """Snapshot the applied state and truncate the log behind it now (an operator's or recoveryd's request)."""
        done = trio.Event()
        self._compactions.append(done)
        self._wake.set()
        with trio.move_on_after(timeout):
            await done.wait()
        if not done.is_set():
            raise Unavailable(f"compaction did not finish within {timeout:g}s")

    async def catch_up(self, to: str) -> None:
        """Send follower `to` the latest snapshot, taken now if the last one does not reach past its match index."""
        if not self.is_leader:
            raise NotLeaderError(self.core.leader)
        progress = self.core.status().progress[to]
        if self.core.log.snapshot_index <= progress.match:
            await self.compact_now()
        self._raise_refusal(self.core.send_snapshot(to))
        self._wake.set()

    def step(self, message: Message) -> None:
        self.core.step(message)
        self._wake.set()

    def last_tick_age(self) -> float:
        return time.monotonic() - self.last_tick

    async def checksum(self) -> tuple[int, str]:
        """(index, SHA-256 of the state there), for /v1/status.

        The state is encoded on the loop, where it is consistent, and hashed in a worker
        thread. A big state under load is encoded again only when that keeps the encoding
        under CHECKSUM_LOOP_SHARE of the loop's time; meanwhile the last pair is answered,
        so the index may trail the applied index (by under a second at 100 MB).
        """
        applied = self.machine.applied
        if self._checksum[0] == applied or (self._checksum[0] >= 0 and time.monotonic() < self._checksum_due):
            return self._checksum
        hashed = dict(self.checkpoints).get(applied)
        if hashed is not None:  # a checkpoint at this index was hashed already
            self._checksum = (applied, hashed)
            return self._checksum
        started = time.monotonic()
        data = self.machine.snapshot()
        self._checksum_due = started + (time.monotonic() - started) / CHECKSUM_LOOP_SHARE
        digest = await trio.to_thread.run_sync(image_digest, data)
        if applied > self._checksum[0]:
            self._checksum = (applied, digest)
        return applied, digest

    @staticmethod
    def _raise_refusal(outcome: object) -> None:
        if isinstance(outcome, NotLeader):
            raise NotLeaderError(outcome.leader)
        if isinstance(outcome, Refused):
            raise Unavailable(outcome.reason)

    # ---- the loops ----------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            nursery.start_soon(self._ready_loop)
            nursery.start_soon(self._hash_checkpoints)

    async def _ticker(self) -> None:
        deadline = trio.current_time()
        while True:
            deadline += self.timing.tick_s
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if now - deadline > 10 * self.timing.tick_s:
                deadline = now  # we were paused (SIGSTOP, overload): do not replay missed ticks
            self.core.tick()
            self.last_tick = time.monotonic()
            self._wake.set()

    async def _ready_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self.core.has_ready():
                rd = self.core.ready()
                self._send(rd.messages[: rd.early])  # a leader replicates while it writes its own log
                if rd.must_sync:
                    if rd.snapshot is None and self.placement.inline(rd.entries):
                        if rd.early:
                            await _let_links_send()
                        self._persist(rd)
                    else:
                        await trio.to_thread.run_sync(self._persist, rd)
                self._send(rd.messages[rd.early :])
                self._apply(rd)
                self.core.advance(rd)
                self._note_role()
                await self._maybe_compact()
            if self._compactions:
                await self._maybe_compact(asked=True)

    def _persist(self, rd: Ready) -> None:
        started = time.monotonic()
        write_ready(self.storage, rd)
        synced = time.monotonic()
        self.storage.sync()
        finished = time.monotonic()
        self._observe_sync(finished - synced)
        self.placement.record(finished - started)

    def _apply(self, rd: Ready) -> None:
        if rd.snapshot:
            self.machine.restore(rd.snapshot.data)
            self._sized(len(rd.snapshot.data))
            log.info("snapshot installed %s", fields(node=self.id, index=rd.snapshot.meta.index))
            self._checkpoint()
        for entry in rd.committed:
            if entry.kind is EntryKind.NORMAL:
                envelope, result = self.machine.apply_decoded(entry.index, entry.data)
                if envelope is not None:
                    for observe in self.on_apply:
                        observe(entry.index, envelope, result)
            else:
                self.machine.mark_applied(entry.index)
                result = None
            self._checkpoint()
            waiter = self._proposals.get(entry.index)
            if waiter is not None:
                waiter.result = result if entry.term == waiter.term else Unavailable("lost to a leader change")
                waiter.event.set()
        for state in rd.read_states:
            read = self._reads.get(state.context)
            if read is not None:
                read.index = state.index
        applied = self.machine.applied
        for read in self._reads.values():
            if read.index is not None and read.index <= applied:
                read.event.set()

    async def _maybe_compact(self, asked: bool = False) -> None:
        """Compact when asked, else after snapshot_every entries: at a checkpoint taken since
        the last call, whose image is already encoded, or else at the applied index.

        A big state is compacted at the applied index only after twice its size /
        ENCODE_BYTES_PER_ENTRY entries, more than the checkpoint stride: a checkpoint comes
        first, and the state is encoded once for both. The image is hashed off the loop.
        """
        applied, snapshot_index = self.machine.applied, self.core.log.snapshot_index
        waiting, self._compactions = (self._compactions, []) if asked else ([], self._compactions)
        checkpointed, self._checkpointed = self._checkpointed, None
        patience = max(self.timing.snapshot_every, 2 * self._state_size // ENCODE_BYTES_PER_ENTRY)
        index, image = 0, b""
        if not asked and checkpointed and checkpointed[0] - snapshot_index >= self.timing.snapshot_every:
            index, image = checkpointed
        elif (asked or applied - snapshot_index >= patience) and snapshot_index < applied <= self.core.log.applied:
            index, image = applied, self.machine.snapshot()
        if index:
            digest = await trio.to_thread.run_sync(image_digest, image)
            if self.core.log.snapshot_index < index and self.core.log.term(index) is not None:  # no snapshot came meanwhile
                snapshot = self.core.compact(index, image, digest)
                await trio.to_thread.run_sync(self.storage.compact, snapshot)
                log.info("log compacted %s", fields(node=self.id, index=index, bytes=len(snapshot.data), asked=asked))
        for event in waiting:
            event.set()

    def _checkpoint(self) -> None:
        """Every node checksums its state at the same indexes, so recoveryd can compare them under load.

        The image is encoded here, at its index (once: a compaction or /v1/status there reuses
        it); _hash_checkpoints hashes it off the loop. Its size sets where the next one falls.
        """
        index = self.machine.applied
        if index % self._checkpoint_stride == 0:
            data = self.machine.snapshot()
            self._sized(len(data))
            self._unhashed = [*self._unhashed, (index, data)][-CHECKPOINTS_KEPT:]
            self._checkpointed = (index, data)
            self._hash_wake.set()

    def _sized(self, size: int) -> None:
        """The state's encoded size at a checkpoint or a restored snapshot, alike on every node at that index."""
        self._state_size = size
        self._checkpoint_stride = checkpoint_stride(self.timing.checksum_every, size)

    async def _hash_checkpoints(self) -> None:
        while True:
            await self._hash_wake.wait()
            self._hash_wake = trio.Event()
            pending, self._unhashed = self._unhashed, []
            for index, data in pending:
                self.checkpoints.append((index, await trio.to_thread.run_sync(image_digest, data)))

    def _note_role(self) -> None:
        seen = (self.core.role, self.core.term, self.core.leader)
        if seen == self._role_seen:
            return
        if seen[2] != self._role_seen[2] and seen[2]:
            self.leader_changes += 1
            log.info("leader %s", fields(node=self.id, leader=seen[2], term=seen[1], role=seen[0].value))
        self._role_seen = seen
        if seen[0] is not Role.LEADER:
            self._fail_pending_reads()
        for callback in self.on_change:
            callback()

    def _fail_pending_reads(self) -> None:
        for read in self._reads.values():
            if read.index is None:
                read.event.set()


def checkpoint_stride(every: int, size: int) -> int:
    """Entries from one checkpoint to the next after one of `size` bytes: `every` doubled until the
    encoding averages at most ENCODE_BYTES_PER_ENTRY per entry applied.

    Encoding a 100 MB state at every 1000th index took over half the loop under write load
    (bench/checkpoints.py). The size is replicated data (the same state at the same index on
    every node), so nodes agree on the stride. One that restored a snapshot may disagree
    until the first checkpoint both take, and agrees from there on; strides being `every`
    times powers of two, the larger one's multiples are also the smaller one's.
    """
    stride = every
    while stride * ENCODE_BYTES_PER_ENTRY < size:
        stride *= 2
    return stride


async def _let_links_send() -> None:
    """Let the peer links woken by this Ready's messages send them before the loop blocks.

    Trio runs a batch of runnable tasks in either order, so after one checkpoint the loop
    itself ran first half the time and the links sent only after its fsync (traced: the
    appends left ~0.3 ms after the proposal instead of ~0.05). Links woken before the
    first checkpoint are in the batch the second one waits out."""
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()
