"""Benchmark of the Raft core alone: replication throughput, and ticks to elect after a leader crash.

    .venv/bin/python bench/raft_core.py [--entries N] [--seeds N]

Throughput: three cores in one process, an in-memory transport that delivers every
message at once, MemoryStorage as the log (its sync is free), no faults and no
ticks. Each round the leader gets `propose_batch` of B entries (B = 1, 16, 256),
then every node drains its Readys and the transport delivers; the clock stops when
all three nodes have applied everything. This is the core's own cost per entry
(plus the driver's bookkeeping), the ceiling for dtfd before any fsync or socket.

Election: after a stable leader crashes, how many ticks until one of the two
survivors leads and has committed in its term (messages delivered within the tick),
over many seeds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtfd.raft import Config, Message, Raft, Role  # noqa: E402
from dtfd.storage.interface import write_ready  # noqa: E402
from dtfd.storage.memory import MemoryStorage  # noqa: E402

IDS = ("n1", "n2", "n3")
COMPACT_EVERY = 10_000


class Cluster:
    """Three cores wired back to back; messages are delivered in send order."""

    def __init__(self, seed: int, **config: object) -> None:
        self.rng = random.Random(seed)
        self.nodes = {
            i: Raft(Config(id=i, voters=IDS, rng=random.Random(self.rng.getrandbits(64)), **config))  # type: ignore[arg-type]
            for i in IDS
        }
        self.storage = {i: MemoryStorage() for i in IDS}
        self.applied = dict.fromkeys(IDS, 0)
        self.down: set[str] = set()
        self.inbox: list[Message] = []

    def pump(self) -> None:
        """Drain Readys and deliver messages until the cluster is quiet."""
        while True:
            for i in IDS:
                if i not in self.down:
                    self._drain(i)
            if not self.inbox:
                return
            inbox, self.inbox = self.inbox, []
            for m in inbox:
                if m.dst not in self.down:
                    self.nodes[m.dst].step(m)

    def _drain(self, i: str) -> None:
        r, storage = self.nodes[i], self.storage[i]
        while r.has_ready():
            rd = r.ready()
            write_ready(storage, rd)
            if rd.must_sync:
                storage.sync()
            self.inbox.extend(rd.messages)
            if rd.committed:
                self.applied[i] = rd.committed[-1].index
            r.advance(rd)
            if self.applied[i] - r.log.snapshot_index >= COMPACT_EVERY:
                storage.compact(r.compact(self.applied[i], b"state"))

    def tick(self) -> None:
        for i in IDS:
            if i not in self.down:
                self.nodes[i].tick()
        self.pump()

    def leader(self) -> Raft | None:
        for i in IDS:
            r = self.nodes[i]
            if i not in self.down and r.role is Role.LEADER and r.log.term(r.log.committed) == r.term:
                return r
        return None

    def elect(self, limit: int = 10_000) -> tuple[Raft, int]:
        for ticks in range(1, limit + 1):
            self.tick()
            leader = self.leader()
            if leader is not None:
                return leader, ticks
        raise RuntimeError(f"no leader within {limit} ticks")


def throughput(batch: int, entries: int) -> float:
    """Committed-and-applied entries per second through three cores, `batch` entries per proposal."""
    cluster = Cluster(1, max_entries_per_msg=4096, max_inflight=256)
    leader, _ = cluster.elect()
    payload = [b"x" * 64] * batch
    start_index = leader.log.last_index
    target = start_index + entries
    start = time.perf_counter()
    while leader.log.last_index < target:
        leader.propose_batch(payload)
        cluster.pump()
    last = leader.log.last_index
    while min(cluster.applied.values()) < last:
        cluster.pump()
    return (last - start_index) / (time.perf_counter() - start)


def election_ticks(seed: int) -> int:
    """Ticks from a stable leader's crash until a survivor leads and has committed in its term."""
    cluster = Cluster(seed, election_min=10, election_max=20, heartbeat=2)
    leader, _ = cluster.elect()
    for _ in range(cluster.rng.randint(20, 60)):  # settle into steady heartbeats, at a random phase
        cluster.tick()
    cluster.down.add(leader.id)
    _, ticks = cluster.elect()
    return ticks


def percentiles(values: list[int]) -> str:
    v = sorted(values)

    def rank(q: float) -> int:
        return v[min(len(v) - 1, max(0, round(q * len(v) + 0.5) - 1))]

    return f"min {v[0]}  p50 {rank(0.5)}  p99 {rank(0.99)}  max {v[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000, help="entries per batched run (batch 1 runs a tenth)")
    parser.add_argument("--seeds", type=int, default=200, help="leader crashes to time")
    args = parser.parse_args()
    print("Raft core, 3 nodes in one process, in-memory transport and MemoryStorage, no faults")
    print(f"{'batch':>6} {'entries':>9} {'entries/s':>12}")
    for batch in (1, 16, 256):
        n = args.entries // 10 if batch == 1 else args.entries
        print(f"{batch:>6} {n:>9} {throughput(batch, n):>12,.0f}")
    ticks = [election_ticks(seed) for seed in range(args.seeds)]
    print(f"\nticks to a serving leader after the leader crashes (election timeout 10-20, {args.seeds} seeds):")
    print(f"  {percentiles(ticks)}")


if __name__ == "__main__":
    main()
