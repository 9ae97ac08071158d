"""One simulated node: the real Raft core driven like dtfd's server would drive it.

The driver follows the Ready contract step by step (persist, sync, send, apply,
advance) so the simulator can crash it between any two of those steps: a crash
loses what the storage had not synced, drops the messages not yet sent, and the
node restarts from `storage.load()` alone. Its clock runs at its own rate (skew),
and a paused node neither ticks nor takes messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtfd.raft import Config, Message, Raft, Ready, Role, Snapshot
from dtfd.storage.memory import MemoryStorage
from tests.sim.invariants import Checker
from tests.sim.statemachine import StateMachine

if TYPE_CHECKING:
    from tests.sim.clients import Client
    from tests.sim.harness import Simulation

# Where a planned crash strikes: inside the next Ready's processing, or between Readys
# ("idle", where a compaction written after the last Ready may still be unsynced).
CRASH_POINTS = ("before_write", "after_snapshot", "after_entries", "after_hard_state", "after_sync", "mid_send", "after_send", "idle")
IDLE = CRASH_POINTS.index("idle")


class Crashed(Exception):
    """Unwinds Ready processing at the planned crash point."""


@dataclass(frozen=True)
class Watch:
    """A client waits for `index` to be applied here with `term`; then it knows the outcome."""

    client: Client
    term: int
    attempt: int
    data: bytes


class SimNode:
    def __init__(self, sim: Simulation, node_id: str) -> None:
        self.sim = sim
        self.id = node_id
        self.storage = MemoryStorage()
        self.checker: Checker = sim.checker
        self.up = False
        self.paused_until = 0
        self.rate = 1.0
        self._clock = 0.0
        self.crash_plan: int | None = None
        self.watches: dict[int, list[Watch]] = {}
        self.max_commit = 0
        self.synced_commit = 0
        self.snap_index = 0
        self.role = Role.FOLLOWER
        self.term = 0
        self.raft: Raft
        self.app: StateMachine

    def config(self) -> Config:
        p = self.sim.knobs
        return Config(
            id=self.id,
            voters=tuple(self.sim.nodes),
            rng=random.Random(self.sim.rng.getrandbits(64)),
            election_min=p.election_min,
            election_max=p.election_max,
            heartbeat=p.heartbeat,
            max_entries_per_msg=p.max_entries_per_msg,
            max_inflight=p.max_inflight,
            snapshot_chunk=p.snapshot_chunk,
            planted_bugs=p.bugs,
        )

    def start(self, now: int) -> None:
        """Boot (or reboot) from whatever the storage holds."""
        persisted = self.storage.load()
        self.raft = Raft(self.config(), persisted)
        self.up = True
        self.crash_plan = None
        if persisted.snapshot is not None:
            self.app = StateMachine.restore(persisted.snapshot.data)
            self.checker.restored(self, persisted.snapshot.meta.index, self.app.index, self.app.digest)
        else:
            self.app = StateMachine()
        self.snap_index = self.app.index
        committed = self.raft.log.committed
        if persisted.hard_state.commit < self.synced_commit or committed < persisted.hard_state.commit:
            self.checker.fail(
                "commit_monotonic",
                f"{self.id} restarted with commit {committed} (persisted {persisted.hard_state.commit}), "
                f"last synced commit was {self.synced_commit}",
            )
        self.max_commit = committed
        self.role, self.term = self.raft.role, self.raft.term
        self.sim.trace.add((now, "start", self.id, f"term {self.term} commit {committed} snapshot {self.snap_index}"))

    def running(self, now: int) -> bool:
        return self.up and self.paused_until <= now

    def tick(self) -> None:
        self._clock += self.rate
        while self._clock >= 1.0:
            self._clock -= 1.0
            self.raft.tick()

    def deliver(self, now: int, msg: Message) -> None:
        self.sim.trace.add((now, "deliver", msg))
        self.raft.step(msg)

    def crash(self, now: int, point: str) -> None:
        self.up = False
        self.crash_plan = None
        at_risk = self.storage.unsynced
        lost = self.storage.crash(self.sim.storage_rng)
        self.sim.stats["crashes"] += 1
        self.sim.stats["writes_lost"] += lost
        self.sim.trace.add((now, "crash", self.id, f"at {point}: {lost} of {at_risk} unsynced writes lost"))
        watches, self.watches = self.watches, {}
        for index in sorted(watches):
            for w in watches[index]:
                w.client.lost(now, w.attempt)

    def process(self, now: int) -> None:
        """Drain every Ready; a planned crash strikes at its point in the next one, or when idle."""
        try:
            while self.up and self.raft.has_ready():
                self._handle(now, self.raft.ready())
            if self.crash_plan == IDLE:
                raise Crashed("idle")
        except Crashed as crash:
            self.crash(now, str(crash))
            return
        r = self.raft
        if r.role is not self.role or r.term != self.term:
            self.role, self.term = r.role, r.term
            self.sim.trace.add((now, "role", self.id, r.role.value, f"term {r.term}"))
            if r.role is Role.LEADER:
                self.sim.profile.after_election(self, now)

    def _point(self, k: int) -> None:
        if self.crash_plan == k:
            raise Crashed(CRASH_POINTS[k])

    def _handle(self, now: int, rd: Ready) -> None:
        network, checker = self.sim.network, self.checker
        sent_early = rd.early if rd.early and self.sim.storage_rng.random() < 0.5 else 0
        for msg in rd.messages[:sent_early]:  # a leader replicating while it writes (thesis 10.2.1)
            checker.sent(self, msg)
            network.send(now, msg)
        self._point(0)
        storage = self.storage
        if rd.snapshot is not None:
            storage.install_snapshot(rd.snapshot)
            self._point(1)
        if rd.entries:
            self.checker.entries_written(self, rd.entries)
            storage.append(rd.entries)
            self._point(2)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
            self._point(3)
        if rd.must_sync:
            storage.sync()
            self.synced_commit = storage.durable_hard_state.commit
            self._point(4)
        later = rd.messages[sent_early:]
        send_cut = self.sim.storage_rng.randrange(len(later) + 1) if self.crash_plan == 5 else -1
        for k, msg in enumerate(later):
            if k == send_cut:
                raise Crashed(CRASH_POINTS[5])
            checker.sent(self, msg)
            network.send(now, msg)
        self._point(5)  # mid_send drew "after the last message"
        self.sim.profile.after_send(self, now, rd)
        self._point(6)
        if rd.snapshot is not None:
            self._restore(now, rd.snapshot)
        app = self.app
        for e in rd.committed:
            if e.index != app.index + 1:
                checker.fail("applied_order", f"{self.id} applied index {e.index} after {app.index}")
            app.apply(e)
            checker.applied_entry(self, e, app.digest)
            if e.index in self.watches:
                self._resolve(now, e.index, e.term, e.data)
        self.raft.advance(rd)
        if app.index - self.snap_index >= self.sim.knobs.snapshot_every:
            snap = self.raft.compact(app.index, app.snapshot())
            storage.compact(snap)
            self.snap_index = app.index
            self.sim.stats["compactions"] += 1

    def _restore(self, now: int, snapshot: Snapshot) -> None:
        index = snapshot.meta.index
        if index <= self.app.index:
            self.checker.fail("applied_order", f"{self.id} installed a snapshot at {index} after applying {self.app.index}")
        self.app = StateMachine.restore(snapshot.data)
        self.checker.restored(self, index, self.app.index, self.app.digest)
        self.snap_index = index
        self.sim.stats["snapshots_installed"] += 1
        self.sim.trace.add((now, "install", self.id, f"snapshot at index {index} term {snapshot.meta.term}"))
        for watched in [i for i in sorted(self.watches) if i <= index]:
            for w in self.watches.pop(watched):
                w.client.lost(now, w.attempt)

    def _resolve(self, now: int, index: int, term: int, data: bytes) -> None:
        for w in self.watches.pop(index):
            if w.term == term and w.data != data:
                self.checker.fail(
                    "proposal_integrity",
                    f"{w.client.id} was told index {index} term {term} on {self.id}; applied there: {data!r}",
                )
            if w.term == term:
                w.client.acked(now, w.attempt, index, term)
            else:
                w.client.lost(now, w.attempt)

    def watch(self, index: int, watch: Watch) -> None:
        self.watches.setdefault(index, []).append(watch)
