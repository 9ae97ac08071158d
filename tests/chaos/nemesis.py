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
| fsync_error, disk_full | every fsync of the node fails with EIO, or every write with ENOSPC (storage failpoints, see dtfd/storage/failpoints.py), on the leader or, for odd picks, any node: the node must exit 74 at its next write, and is restarted 1 s after each exit, as systemd would, failing again while the disk stays broken (at least until it failed once, up to 10 s) | clearing the failpoint and starting the node if it is down |
"""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from dtfd.devcluster import LocalCluster
from dtfd.storage import failpoints
from tests.chaos.history import History
from tests.chaos.proxy import Mesh, Mode, ProxiedCluster

DURATIONS: dict[str, tuple[float, float]] = {
    "kill_leader": (0.2, 3.0),
    "kill_node": (0.2, 3.0),
    "pause_leader": (0.1, 4.0),  # below the 150 ms election timeout nothing should notice; above it, a new leader
    "pause_node": (0.1, 4.0),
    "partition_leader": (0.5, 5.0),
    "partition_node": (0.5, 5.0),
    "restart_all": (0.1, 1.5),
    "kill_worker": (0.5, 3.0),
    "fsync_error": (0.2, 3.0),
    "disk_full": (0.2, 3.0),
}
DISK_FAULTS = {"fsync_error": {"fsync": errno.EIO}, "disk_full": {"write": errno.ENOSPC}}
RESTART_SEC = 1.0  # as RestartSec= in units/dtfd@.service
DISK_FAULT_MAX_S = 10.0  # a broken disk stays broken past its duration until the node has met it, up to this
FAULTS = tuple(DURATIONS)
GAP_S = (0.5, 2.5)  # healthy time between two faults
LEADER_LOOKUP_S = 3.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the schedule starts
    kind: str
    duration: float
    pick: int  # chooses the node, worker or partition style where the leader does not decide


def schedule(seed: int, kinds: Sequence[str], length_s: float, gap_s: tuple[float, float] = GAP_S) -> list[Fault]:
    """Faults from `kinds` with random timing and targets, filling `length_s` seconds: every
    kind once first, in a random order (even past `length_s`), then random kinds; `gap_s`
    bounds the healthy time before each."""
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
    rng = random.Random(seed)
    faults: list[Fault] = []
    first = rng.sample(list(kinds), len(kinds))
    at = rng.uniform(*gap_s)
    while at < length_s or first:
        kind = first.pop(0) if first else rng.choice(list(kinds))
        duration = round(rng.uniform(*DURATIONS[kind]), 3)
        faults.append(Fault(round(at, 3), kind, duration, rng.randrange(1 << 16)))
        at += duration + rng.uniform(*gap_s)
    return faults


class Nemesis:
    """Injects and heals the faults of a schedule on a running cluster, recording each one."""

    def __init__(self, cluster: LocalCluster, history: History, mesh: Mesh | None = None, workers: dict[str, Path] | None = None) -> None:
        """Disk faults need a ProxiedCluster (its nodes watch failpoint files); partitions need `mesh`."""
        self.cluster, self.history, self.mesh = cluster, history, mesh
        self.workers = workers or {}
        self._exited: set[subprocess.Popen] = set()

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
        record: dict = {"type": "fault", "kind": fault.kind, "target": target, "start": self.history.now(), "planned_s": fault.duration}
        if fault.kind in DISK_FAULTS:
            record["exits"] = []
        try:
            await self._break(fault, target)
            if fault.kind in DISK_FAULTS:
                await self._supervise(target, fault.duration, record["exits"])
            else:
                await trio.sleep(fault.duration)
        finally:
            with trio.CancelScope(shield=True):
                await self._heal(fault, target, record)
                record["end"] = self.history.now()
                self.history.add(record)

    async def _target(self, fault: Fault) -> str | None:
        nodes = self.cluster.files.node_ids
        if fault.kind == "kill_worker":
            return sorted(self.workers)[fault.pick % len(self.workers)] if self.workers else None
        if (fault.kind.startswith("partition") and self.mesh is None) or (fault.kind in DISK_FAULTS and not isinstance(self.cluster, ProxiedCluster)):
            return None
        if fault.kind == "restart_all":
            return "all"
        if fault.kind.endswith("_leader") or (fault.kind in DISK_FAULTS and fault.pick % 2 == 0):
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
        elif fault.kind in DISK_FAULTS:
            assert isinstance(self.cluster, ProxiedCluster)
            failpoints.arm(str(self.cluster.failpoints(target)), **DISK_FAULTS[fault.kind])

    async def _heal(self, fault: Fault, target: str, record: dict) -> None:
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
        elif fault.kind in DISK_FAULTS:
            assert isinstance(self.cluster, ProxiedCluster)
            failpoints.disarm(str(self.cluster.failpoints(target)))
            # A write that failed just before the disarm still ends the process: wait until
            # the node answers or exits, so that it is never left down.
            await trio.to_thread.run_sync(self._answers_or_exits, target)
            proc = self.cluster.procs[target]
            if proc.poll() is not None:
                self._note_exit(proc, record["exits"])
                self.cluster.start(target)

    async def _supervise(self, node: str, duration: float, exits: list[int]) -> None:
        """What systemd does while the disk stays broken: restart the node RESTART_SEC after
        each exit, appending each exit code to `exits` (each must be 74, EX_IOERR). The disk
        stays broken past `duration` until the node has met it (a node still starting, or
        starved of CPU, may not write for a while), up to DISK_FAULT_MAX_S."""
        start = trio.current_time()
        with trio.move_on_after(max(duration, DISK_FAULT_MAX_S)):
            while not exits or trio.current_time() - start < duration:
                proc = self.cluster.procs[node]
                if proc.poll() is None:
                    await trio.sleep(0.02)
                    continue
                self._note_exit(proc, exits)
                await trio.sleep(RESTART_SEC)
                self.cluster.start(node)

    def _note_exit(self, proc: subprocess.Popen, exits: list[int]) -> None:
        if proc not in self._exited:
            self._exited.add(proc)
            exits.append(proc.returncode)

    def _answers_or_exits(self, node: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.cluster.procs[node].poll() is None and self.cluster.status(node) is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _names(self, target: str) -> list[str]:
        return list(self.cluster.files.node_ids) if target == "all" else [target]
