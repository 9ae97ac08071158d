"""Faults for real processes, in schedules drawn from a seed.

A schedule is a list of faults with their start offsets and durations, all drawn from one
seed before the run starts, so a seed names the same schedule every time (which node the
leader is when a fault starts is the only thing the run decides). Faults never overlap:
each is healed before the next begins, and healing is shielded from cancellation so a
run that ends mid-fault leaves no node stopped or partitioned.

| kind | what | heals by |
|---|---|---|
| kill_leader, kill_node | SIGKILL (kill -9) | starting the node again on its data dir |
| pause_leader, pause_node | SIGSTOP: a long GC-like pause; on SIGCONT its timers fire late and it acts on a stale view of time (the clock fault a loopback cluster can show) | SIGCONT |
| partition_leader, partition_node | every peer link of the node cut (dropped, or blackholed: open but silent) | restoring the links |
| restart_all | SIGKILL of every node at once | starting them all |
| kill_worker | SIGKILL of a dtf-worker (its leases must be requeued, attempt counted) | starting the worker again |
"""

from __future__ import annotations

import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from dtfd.devcluster import LocalCluster
from tests.chaos.history import History
from tests.chaos.proxy import Mesh, Mode

DURATIONS: dict[str, tuple[float, float]] = {
    "kill_leader": (0.2, 3.0),
    "kill_node": (0.2, 3.0),
    "pause_leader": (0.1, 4.0),  # below the 150 ms election timeout nothing should notice; above it, a new leader
    "pause_node": (0.1, 4.0),
    "partition_leader": (0.5, 5.0),
    "partition_node": (0.5, 5.0),
    "restart_all": (0.1, 1.5),
    "kill_worker": (0.5, 3.0),
}
FAULTS = tuple(DURATIONS)
GAP_S = (0.5, 2.5)  # healthy time between two faults
LEADER_LOOKUP_S = 3.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the schedule starts
    kind: str
    duration: float
    pick: int  # chooses the node, worker or partition style where the leader does not decide


def schedule(seed: int, kinds: Sequence[str], length_s: float) -> list[Fault]:
    """Faults from `kinds` with random timing and targets, filling `length_s` seconds: every
    kind once first, in a random order, then random kinds."""
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
    rng = random.Random(seed)
    faults: list[Fault] = []
    first = rng.sample(list(kinds), len(kinds))
    at = rng.uniform(*GAP_S)
    while at < length_s:
        kind = first.pop(0) if first else rng.choice(list(kinds))
        duration = round(rng.uniform(*DURATIONS[kind]), 3)
        faults.append(Fault(round(at, 3), kind, duration, rng.randrange(1 << 16)))
        at += duration + rng.uniform(*GAP_S)
    return faults


class Nemesis:
    """Injects and heals the faults of a schedule on a running cluster, recording each one."""

    def __init__(self, cluster: LocalCluster, history: History, mesh: Mesh | None = None, workers: dict[str, Path] | None = None) -> None:
        self.cluster, self.history, self.mesh = cluster, history, mesh
        self.workers = workers or {}

    async def run(self, faults: Sequence[Fault]) -> None:
        start = trio.current_time()
        for fault in faults:
            await trio.sleep_until(start + fault.at)
            await self.inject(fault)

    async def inject(self, fault: Fault) -> None:
        target = await self._target(fault)
        if target is None:
            self.history.add({"type": "fault", "kind": fault.kind, "target": "", "start": self.history.now(), "end": self.history.now(), "skipped": True})
            return
        record = {"type": "fault", "kind": fault.kind, "target": target, "start": self.history.now(), "planned_s": fault.duration}
        try:
            await self._break(fault, target)
            await trio.sleep(fault.duration)
        finally:
            with trio.CancelScope(shield=True):
                await self._heal(fault, target)
                record["end"] = self.history.now()
                self.history.add(record)

    async def _target(self, fault: Fault) -> str | None:
        nodes = self.cluster.files.node_ids
        if fault.kind == "kill_worker":
            return sorted(self.workers)[fault.pick % len(self.workers)] if self.workers else None
        if fault.kind.startswith("partition") and self.mesh is None:
            return None
        if fault.kind == "restart_all":
            return "all"
        if fault.kind.endswith("_leader"):
            try:
                return await trio.to_thread.run_sync(self.cluster.wait_leader, LEADER_LOOKUP_S)
            except TimeoutError:
                pass  # no agreed leader right now: hit some node instead
        return nodes[fault.pick % len(nodes)]

    async def _break(self, fault: Fault, target: str) -> None:
        action = fault.kind.split("_")[0]
        if action == "kill" or fault.kind == "restart_all":
            for name in self._names(target):
                await trio.to_thread.run_sync(self.cluster.kill, name)
        elif action == "pause":
            self.cluster.signal(target, signal.SIGSTOP)
        elif action == "partition":
            assert self.mesh is not None
            self.mesh.isolate(target, Mode.BLACKHOLE if fault.pick % 2 else Mode.DROP)

    async def _heal(self, fault: Fault, target: str) -> None:
        action = fault.kind.split("_")[0]
        if action == "kill" or fault.kind == "restart_all":
            for name in self._names(target):
                if self.cluster.procs[name].poll() is None:
                    continue
                if name in self.workers:
                    self.cluster.start_worker(self.workers[name])
                else:
                    self.cluster.start(name)
        elif action == "pause":
            self.cluster.signal(target, signal.SIGCONT)
        elif action == "partition":
            assert self.mesh is not None
            self.mesh.heal()

    def _names(self, target: str) -> list[str]:
        return list(self.cluster.files.node_ids) if target == "all" else [target]
