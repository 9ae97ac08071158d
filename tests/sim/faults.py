"""Fault injection: a seeded schedule of network, node and storage faults, and their healing.

A Profile says how often faults start and which kinds, by weight; the `mixed`
profile is what CI runs. The targeted profiles aim at one class of bug each, still
driven by the seed: `fig8` keeps leadership churning with partial replication (Raft
Fig. 8: an old-term entry on a majority, then a leader change), `vote_crash`
crashes nodes right after they grant a vote, and `stale_votes` keeps old messages
alive (duplicates, long delays) so late vote responses arrive in later terms.
Every fault knows how to heal itself; at the end of the chaos phase all are healed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtfd.raft import MessageType, Ready
from tests.sim.node import CRASH_POINTS, SimNode

if TYPE_CHECKING:
    from tests.sim.harness import Simulation


@dataclass
class Fault:
    name: str
    end: int
    heal: Callable[[int], None]
    every: Callable[[int], None] | None = None  # runs each step while active (flapping)
    pending: bool = False  # a fault yet to strike at `end`: dropped, not run, when everything heals


@dataclass(frozen=True)
class Profile:
    name: str
    rate: float  # chance a new fault starts in a given step
    weights: dict[str, int]
    max_entries_per_msg: tuple[int, ...] = (1, 2, 4, 64)
    max_inflight: tuple[int, ...] = (1, 4, 64)
    crash_after_vote: float = 0.0
    blip_leader: float = 0.0  # chance a new leader crashes a few steps after its election
    long_delay: int = 0  # extra max delay from the start, in steps
    duplicate: float = 0.0
    min_duration: int = 10
    max_duration: int = 150
    script: tuple[tuple[int, str], ...] = ()  # fixed (step, fault kind) instead of random starts

    def after_send(self, node: SimNode, now: int, rd: Ready) -> None:
        """Hook between sending a Ready's messages and applying it (vote_crash strikes here)."""
        if node.sim.faults.calm:
            return
        if self.crash_after_vote and any(m.type == MessageType.VOTE_RESP and not m.reject for m in rd.messages):
            if node.sim.fault_rng.random() < self.crash_after_vote:
                node.crash_plan = CRASH_POINTS.index("after_send")
                node.sim.faults.restart_later(now, node, node.sim.fault_rng.randint(1, 4))

    def after_election(self, node: SimNode, now: int) -> None:
        """Hook when a node becomes leader: with `blip_leader`, it gets only a few steps to replicate."""
        rng = node.sim.fault_rng
        if self.blip_leader and not node.sim.faults.calm and rng.random() < self.blip_leader:
            node.sim.faults.crash_at(now + rng.randint(1, 8), node, rng.randint(3, 30))


MIXED = {
    "crash": 6,
    "crash_leader": 4,
    "pause": 4,
    "partition": 4,
    "asymmetric": 3,
    "isolate_leader": 4,
    "flap": 3,
    "lossy": 3,
    "chaotic": 3,
    "skew": 2,
    "power_outage": 1,
}

PROFILES = {
    "mixed": Profile("mixed", rate=1 / 30, weights=MIXED),
    "fig8": Profile(
        "fig8",
        rate=1 / 20,
        weights={"isolate_leader": 6, "partition": 3, "crash": 2},
        max_entries_per_msg=(1,),
        max_inflight=(1,),
        blip_leader=0.6,
        min_duration=4,
        max_duration=40,
    ),
    "vote_crash": Profile(
        "vote_crash",
        rate=1 / 20,
        weights={"crash_leader": 6, "isolate_leader": 4, "partition": 2, "pause": 2},
        crash_after_vote=0.5,
        min_duration=5,
        max_duration=40,
    ),
    "stale_votes": Profile(
        "stale_votes",
        rate=1 / 20,
        weights={"crash_leader": 4, "isolate_leader": 4, "partition": 4, "chaotic": 4, "pause": 3},
        long_delay=12,
        duplicate=0.3,
        min_duration=5,
        max_duration=60,
    ),
    "demo": Profile(
        "demo",
        rate=0.0,
        weights={},
        max_entries_per_msg=(64,),
        min_duration=60,
        max_duration=100,
        script=((150, "crash_leader"), (400, "isolate_leader"), (650, "partition"), (850, "lossy")),
    ),
}


class Faults:
    def __init__(self, sim: Simulation, rng: random.Random, profile: Profile) -> None:
        self.sim = sim
        self.rng = rng
        self.profile = profile
        self.active: list[Fault] = []
        self.started = 0
        self.calm = False  # set once everything has healed: no fault starts any more
        self._kinds = list(profile.weights)
        self._weights = list(profile.weights.values())
        self._script = dict(profile.script)

    def step(self, now: int, chaos: bool) -> None:
        due = [f for f in self.active if f.end <= now]
        self.active = [f for f in self.active if f.end > now]
        for fault in due:
            fault.heal(now)
            if not fault.pending:
                self.sim.trace.add((now, "heal", fault.name))
        for fault in self.active:
            if fault.every is not None:
                fault.every(now)
        if self._script:
            if chaos and now in self._script:
                self.start(now, self._script[now])
        elif chaos and self.rng.random() < self.profile.rate:
            self.start(now, self.rng.choices(self._kinds, self._weights)[0])

    def heal_all(self, now: int) -> None:
        for fault in self.active:
            if not fault.pending:
                fault.heal(now)
                self.sim.trace.add((now, "heal", fault.name))
        self.active = []
        self.calm = True

    def start(self, now: int, kind: str) -> None:
        p = self.profile
        duration = self.rng.randint(p.min_duration, p.max_duration)
        fault = getattr(self, f"_{kind}")(now, now + duration)
        if fault is not None:
            self.started += 1
            self.active.append(fault)
            self.sim.trace.add((now, "fault", fault.name))

    def restart_later(self, now: int, node: SimNode, downtime: int) -> None:
        self.active.append(Fault(f"restart {node.id}", now + downtime, lambda t: self._restart(t, node)))

    def crash_at(self, when: int, node: SimNode, downtime: int) -> None:
        """Crash `node` at step `when` (at a random point of its Ready processing), restart it `downtime` later."""

        def crash(t: int) -> None:
            fault = self._crash_node(t, t + downtime, node, "blip leader")
            if fault is not None:
                self.active.append(fault)
                self.sim.trace.add((t, "fault", fault.name))

        self.active.append(Fault(f"crash {node.id} at step {when}", when, crash, pending=True))

    # Node faults

    def _down_or_paused(self, now: int) -> int:
        return sum(1 for n in self.sim.nodes.values() if not n.running(now))

    def _crash_node(self, now: int, end: int, node: SimNode, why: str) -> Fault | None:
        if not node.running(now) or node.crash_plan is not None:
            return None
        node.crash_plan = self.rng.randrange(len(CRASH_POINTS))
        return Fault(f"{why} {node.id} until {end}", end, lambda t: self._restart(t, node))

    def _restart(self, now: int, node: SimNode) -> None:
        if node.up:
            node.crash_plan = None  # it never reached its crash point (paused meanwhile)
        else:
            node.start(now)

    def _minority_room(self, now: int) -> bool:
        return self._down_or_paused(now) < (len(self.sim.nodes) - 1) // 2

    def _crash(self, now: int, end: int) -> Fault | None:
        if not self._minority_room(now):
            return None
        return self._crash_node(now, end, self.rng.choice(list(self.sim.nodes.values())), "crash")

    def _crash_leader(self, now: int, end: int) -> Fault | None:
        leader = self.sim.leader()
        if leader is None or not self._minority_room(now):
            return None
        return self._crash_node(now, min(end, now + self.rng.randint(2, 60)), leader, "crash leader")

    def _power_outage(self, now: int, end: int) -> Fault | None:
        """Every node crashes at once (each at its own point in Ready processing), then all restart."""
        end = now + self.rng.randint(2, 20)
        nodes = [n for n in self.sim.nodes.values() if n.up and n.crash_plan is None]
        for node in nodes:
            node.crash_plan = self.rng.randrange(len(CRASH_POINTS))

        def heal(t: int) -> None:
            for node in self.sim.nodes.values():
                self._restart(t, node)

        return Fault("power outage: every node crashes", end, heal)

    def _pause(self, now: int, end: int) -> Fault | None:
        if not self._minority_room(now):
            return None
        node = self.rng.choice(list(self.sim.nodes.values()))
        if not node.up:
            return None
        node.paused_until = end

        def heal(t: int) -> None:
            node.paused_until = min(node.paused_until, t)

        return Fault(f"pause {node.id} until {end}", end, heal)

    def _skew(self, now: int, end: int) -> Fault | None:
        node = self.rng.choice(list(self.sim.nodes.values()))
        normal = node.rate
        node.rate = self.rng.choice((0.5, 0.7, 1.5, 2.0))

        def heal(t: int) -> None:
            node.rate = normal

        return Fault(f"clock skew {node.id} x{node.rate}", end, heal)

    # Network faults

    def _cut(self, name: str, end: int, links: list[tuple[str, str]]) -> Fault | None:
        if not links:
            return None
        net = self.sim.network
        net.cut(links)
        return Fault(name, end, lambda t: net.mend(links))

    def _split(self, group: list[str]) -> list[tuple[str, str]]:
        others = [n for n in self.sim.nodes if n not in group]
        return [(a, b) for a in group for b in others] + [(b, a) for a in group for b in others]

    def _partition(self, now: int, end: int) -> Fault | None:
        ids = list(self.sim.nodes)
        group = self.rng.sample(ids, self.rng.randint(1, len(ids) // 2))
        rest = [n for n in ids if n not in group]
        return self._cut(f"partition {','.join(sorted(group))} | {','.join(rest)} until {end}", end, self._split(group))

    def _isolate_leader(self, now: int, end: int) -> Fault | None:
        """The leader keeps a minority (maybe just itself): it must stop committing, and step down."""
        leader = self.sim.leader()
        if leader is None:
            return None
        ids = [n for n in self.sim.nodes if n != leader.id]
        group = [leader.id, *self.rng.sample(ids, self.rng.randint(0, (len(self.sim.nodes) - 1) // 2 - 1))]
        company = f"with {','.join(group[1:])}" if group[1:] else "alone"
        return self._cut(f"partition leader {leader.id} {company} until {end}", end, self._split(group))

    def _asymmetric(self, now: int, end: int) -> Fault | None:
        ids = list(self.sim.nodes)
        links = [(a, b) for a in ids for b in ids if a != b]
        chosen = sorted(self.rng.sample(links, self.rng.randint(1, len(ids))))
        return self._cut(f"one-way cuts {' '.join(f'{a}->{b}' for a, b in chosen)} until {end}", end, chosen)

    def _flap(self, now: int, end: int) -> Fault | None:
        a, b = self.rng.sample(list(self.sim.nodes), 2)
        period = self.rng.randint(2, 8)
        links = [(a, b), (b, a)]
        net = self.sim.network
        state = {"cut": False}

        def toggle(t: int) -> None:
            if (t - now) % period == 0:
                (net.mend if state["cut"] else net.cut)(links)
                state["cut"] = not state["cut"]

        def heal(t: int) -> None:
            if state["cut"]:
                net.mend(links)

        return Fault(f"flapping link {a}<->{b} every {period} until {end}", end, heal, toggle)

    def _lossy(self, now: int, end: int) -> Fault | None:
        net = self.sim.network
        extra = self.rng.choice((0.1, 0.3, 0.5))
        net.drop += extra

        def heal(t: int) -> None:
            net.drop -= extra

        return Fault(f"lossy network +{extra:.0%} drop until {end}", end, heal)

    def _chaotic(self, now: int, end: int) -> Fault | None:
        net = self.sim.network
        dup, delay = self.rng.choice((0.1, 0.3)), self.rng.randint(2, 10)
        net.dup += dup
        net.delay += delay

        def heal(t: int) -> None:
            net.dup -= dup
            net.delay -= delay

        return Fault(f"duplicating ({dup:.0%}) and reordering (+{delay} steps) until {end}", end, heal)

