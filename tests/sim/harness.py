"""The deterministic simulator: N real Raft cores, a simulated network, storage, clients and faults.

Everything random comes from one seed: the master rng draws this run's tunables
(timeouts, message and inflight limits, compaction threshold, network weather,
clock skews) and seeds one rng per component, so a run is a pure function of
(seed, Params). Nothing iterates a set or depends on id() or the clock.

A run has two phases. Chaos: `steps` steps of client load under the profile's
faults, with every invariant checked after every step. Healing: all faults end,
crashed nodes restart, the network turns clean, clients finish what they started;
then liveness is measured (steps until a leader commits in its term, and until
every node has applied everything) and every acknowledged proposal must be
applied on every node.

One step is one unit of simulated time: due faults start or heal, each node's
clock ticks (at its own rate), due messages are delivered, clients propose, and
every node drains its Readys.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from dtfd.raft import MessageType, Role
from tests.sim.clients import Client
from tests.sim.faults import PROFILES, Faults
from tests.sim.invariants import INVARIANTS, Checker, InvariantViolation
from tests.sim.network import Network
from tests.sim.node import SimNode
from tests.sim.trace import Event, Trace


@dataclass(frozen=True)
class Params:
    """What a run depends on besides its seed."""

    nodes: int = 3
    steps: int = 1500
    profile: str = "mixed"
    bugs: frozenset[str] = frozenset()
    durability: bool = True  # check persist_before_send; off to see a bug's end-to-end effect
    clients: int = 3
    election_bound: int = 300  # steps after healing within which a leader must commit in its term
    converge_bound: int = 800  # steps after healing within which every node must apply everything
    trace_size: int = 200
    hashing: bool = False

    def replay(self, seed: int) -> str:
        cmd = f"python -m tests.sim --seed {seed} --nodes {self.nodes} --steps {self.steps}"
        if self.profile != "mixed":
            cmd += f" --profile {self.profile}"
        for bug in sorted(self.bugs):
            cmd += f" --bug {bug}"
        if not self.durability:
            cmd += " --no-durability-check"
        return cmd


@dataclass(frozen=True)
class Knobs:
    """This run's core and harness tunables, drawn from the seed."""

    election_min: int
    election_max: int
    heartbeat: int
    max_entries_per_msg: int
    max_inflight: int
    snapshot_chunk: int
    snapshot_every: int
    bugs: frozenset[str]


@dataclass
class Result:
    seed: int
    params: Params
    violation: str | None = None
    detail: str = ""
    elect_ticks: int | None = None
    converge_ticks: int | None = None
    acked: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    trace: list[str] = field(default_factory=list)
    trace_hash: str = ""

    @property
    def ok(self) -> bool:
        return self.violation is None

    @property
    def replay(self) -> str:
        return self.params.replay(self.seed)

    def report(self) -> str:
        """What a failing seed prints: the violation, one replay command, the last events."""
        lines = [
            f"seed {self.seed}: invariant violated: {self.violation}",
            f"  {self.detail}",
            f"replay: {self.replay}",
            f"trace hash {self.trace_hash}" if self.trace_hash else "trace hash: run the replay command to compute it",
            f"last {len(self.trace)} events:",
            *("  " + line for line in self.trace),
        ]
        return "\n".join(lines)


class Simulation:
    def __init__(self, seed: int, params: Params, narrate: Callable[[Event], None] | None = None) -> None:
        self.seed = seed
        self.params = params
        self.rng = rng = random.Random(seed)
        self.fault_rng = random.Random(rng.getrandbits(64))
        self.storage_rng = random.Random(rng.getrandbits(64))
        net_rng = random.Random(rng.getrandbits(64))
        client_rng = random.Random(rng.getrandbits(64))
        self.profile = PROFILES[params.profile]
        election_min = rng.choice((10, 10, 15))
        self.knobs = Knobs(
            election_min=election_min,
            election_max=election_min * 2,
            heartbeat=rng.choice((1, 2, 3)),
            max_entries_per_msg=rng.choice(self.profile.max_entries_per_msg),
            max_inflight=rng.choice(self.profile.max_inflight),
            snapshot_chunk=64,
            snapshot_every=rng.randint(20, 50),
            bugs=params.bugs,
        )
        self.trace = Trace(params.trace_size, params.hashing, narrate)
        self.stats: dict[str, int] = dict.fromkeys(
            ("crashes", "writes_lost", "compactions", "snapshots_installed", "snapshot_chunks"), 0
        )
        self.acked: list[tuple[str, int, int, int, bytes]] = []
        self.now = 0
        self.nodes: dict[str, SimNode] = {}
        self.checker = Checker(self.nodes, durability=params.durability)
        for i in range(1, params.nodes + 1):
            self.nodes[f"n{i}"] = SimNode(self, f"n{i}")
        self.base_delay = rng.choice((0, 1, 2))
        self.network = Network(
            net_rng,
            self.trace,
            drop=rng.choice((0.0, 0.01, 0.03)),
            dup=max(rng.choice((0.0, 0.01)), self.profile.duplicate),
            delay=self.base_delay + self.profile.long_delay,
        )
        for node in self.nodes.values():
            node.rate = rng.choice((1.0, 1.0, 0.8, 0.9, 1.1, 1.25))
            node.start(0)
        self.faults = Faults(self, self.fault_rng, self.profile)
        self.clients = [
            Client(self, f"c{i}", random.Random(client_rng.getrandbits(64)), rate=0.3, timeout=4 * self.knobs.election_max)
            for i in range(1, params.clients + 1)
        ]

    def leader(self) -> SimNode | None:
        """The up leader with the highest term, if any."""
        best = None
        for node in self.nodes.values():
            if node.up and node.raft.role is Role.LEADER and (best is None or node.raft.term > best.raft.term):
                best = node
        return best

    def step(self, chaos: bool) -> None:
        now = self.now
        self.faults.step(now, chaos)
        nodes = self.nodes
        for node in nodes.values():
            if node.running(now):
                node.tick()
        network = self.network
        for msg in network.due(now):
            node = nodes[msg.dst]
            if not node.up:
                network.dropped(now, msg, "down")
            elif node.paused_until > now:
                network.requeue(node.paused_until, msg)
            else:
                network.stats["delivered"] += 1
                if msg.type == MessageType.SNAPSHOT:
                    self.stats["snapshot_chunks"] += 1
                node.deliver(now, msg)
        for client in self.clients:
            client.step(now, chaos)
        for node in nodes.values():
            if node.running(now):
                node.process(now)
        self.checker.after_step(now)
        self.now += 1

    def heal(self) -> None:
        now = self.now
        self.faults.heal_all(now)
        for node in self.nodes.values():
            node.crash_plan = None
            node.paused_until = min(node.paused_until, now)
            if not node.up:
                node.start(now)
        self.network.drop = 0.0
        self.network.dup = 0.0
        self.network.delay = self.base_delay
        self.trace.add((now, "healed", "all faults healed; network clean; measuring liveness"))

    def serving_leader(self) -> SimNode | None:
        """A leader that has committed an entry of its own term: elected and able to serve."""
        leader = self.leader()
        if leader is None:
            return None
        log = leader.raft.log
        return leader if log.term(log.committed) == leader.raft.term else None

    def converged(self, leader: SimNode) -> bool:
        log = leader.raft.log
        if any(c.busy for c in self.clients) or log.committed != log.last_index:
            return False
        return all(n.up and n.app.index == log.committed for n in self.nodes.values())

    def run(self) -> Result:
        result = Result(self.seed, self.params)
        try:
            for _ in range(self.params.steps):
                self.step(chaos=True)
            self.heal()
            self._settle(result)
            self.checker.check_delivered(self.acked)
            self.trace.add((self.now, "verdict", "all invariants held"))
        except InvariantViolation as v:
            result.violation, result.detail = v.invariant, v.detail
            self.trace.add((self.now, "VIOLATION", v.invariant, v.detail))
            result.trace = self.trace.lines()
        result.acked = len(self.acked)
        result.trace_hash = self.trace.digest()
        result.stats = {
            **self.stats,
            **self.network.stats,
            "faults": self.faults.started,
            "leaders": len(self.checker.leaders),
            "applied": self.checker.applied_hi,
            "events": self.trace.events,
        }
        return result

    def _settle(self, result: Result) -> None:
        healed = self.now
        p = self.params
        while True:
            leader = self.serving_leader()
            if leader is not None and result.elect_ticks is None:
                result.elect_ticks = self.now - healed
            if leader is not None and self.converged(leader):
                result.converge_ticks = self.now - healed
                return
            waited = self.now - healed
            if result.elect_ticks is None and waited >= p.election_bound:
                self.checker.fail("liveness", f"no leader committed in its term within {p.election_bound} steps of healing")
            if waited >= p.converge_bound:
                pending = [f"{c.id}#{c.seq}" for c in self.clients if c.busy]
                applied = {n.id: n.app.index for n in self.nodes.values()}
                self.checker.fail(
                    "liveness", f"not converged {p.converge_bound} steps after healing: pending {pending}, applied {applied}"
                )
            self.step(chaos=False)


def run_seed(seed: int, params: Params) -> Result:
    return Simulation(seed, params).run()


def _run(args: tuple[int, Params]) -> Result:
    return run_seed(*args)


def run_many(seeds: Iterable[int], params: Params, jobs: int = 1) -> Iterator[Result]:
    """Results in seed order; `jobs` worker processes (fork) share the seeds."""
    work = [(seed, params) for seed in seeds]
    if jobs <= 1:
        yield from map(_run, work)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_run, work, chunksize=4)


def first_failure(seeds: Iterable[int], params: Params, jobs: int = 1, among: Iterable[str] = INVARIANTS) -> Result | None:
    """Search seeds in order until one breaks one of the invariants named in `among`."""
    wanted = tuple(among)
    for result in run_many(seeds, params, jobs):
        if result.violation in wanted:
            return result
    return None


def percentiles(values: list[int]) -> dict[str, int]:
    """min/p50/p99/max of a non-empty list (nearest rank)."""
    v = sorted(values)

    def rank(q: float) -> int:
        return v[min(len(v) - 1, max(0, round(q * len(v) + 0.5) - 1))]

    return {"min": v[0], "p50": rank(0.5), "p99": rank(0.99), "max": v[-1]}

