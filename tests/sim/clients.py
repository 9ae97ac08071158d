"""Simulated clients: one command at a time, sent to whoever they believe leads, retried until known applied.

A client learns the leader from NotLeader answers; a node that is down or paused
looks like a refused connection, so the client tries another. A proposal counts as
acknowledged only when the node it went to applies an entry at the Proposed index
with the Proposed term (the node checks the data is the client's). Any other
outcome (a different term there, the node crashing, a snapshot jumping past the
index, a timeout) means "unknown": the client retries the same command, and the
state machine's (client, seq) dedup makes that safe.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from dtfd.raft import NotLeader, Proposed
from tests.sim.node import Watch
from tests.sim.statemachine import command

if TYPE_CHECKING:
    from tests.sim.harness import Simulation


class Client:
    def __init__(self, sim: Simulation, client_id: str, rng: random.Random, rate: float, timeout: int) -> None:
        self.sim = sim
        self.id = client_id
        self.rng = rng
        self.rate = rate
        self.timeout = timeout
        self.seq = 0
        self.data: bytes | None = None
        self.target = rng.choice(list(sim.nodes))
        self.attempt = 0  # the current attempt's number; 0 when none is in flight
        self._attempts = 0
        self.deadline = 0
        self.next_try = 0

    @property
    def busy(self) -> bool:
        return self.data is not None

    def step(self, now: int, may_start: bool) -> None:
        if self.data is None:
            if not may_start or self.rng.random() >= self.rate:
                return
            self.seq += 1
            self.data = command(self.id, self.seq, b"x" * self.rng.randrange(24))
        if self.attempt:
            if now < self.deadline:
                return
            self.sim.trace.add((now, "timeout", self.id, f"#{self.seq} on {self.target}"))
            self._retry_elsewhere(now)
        if now < self.next_try:
            return
        node = self.sim.nodes[self.target]
        if not node.running(now):
            self._retry_elsewhere(now)
            return
        result = node.raft.propose(self.data)
        if isinstance(result, Proposed):
            self._attempts += 1
            self.attempt = self._attempts
            self.deadline = now + self.timeout
            node.watch(result.first_index, Watch(self, result.term, self.attempt, self.data))
            self.sim.trace.add((now, "propose", self.id, f"#{self.seq} on {node.id} -> index {result.first_index} term {result.term}"))
        elif isinstance(result, NotLeader) and result.leader:
            self.target = result.leader
            self.next_try = now + 1
        else:
            self._retry_elsewhere(now)

    def acked(self, now: int, attempt: int, index: int, term: int) -> None:
        if attempt != self.attempt or self.data is None:
            return
        self.sim.acked.append((self.id, self.seq, index, term, self.data))
        self.sim.trace.add((now, "ack", self.id, f"#{self.seq} at index {index} term {term}"))
        self.data = None
        self.attempt = 0

    def lost(self, now: int, attempt: int) -> None:
        """The attempt's outcome is unknown: try again, on whoever the target now says leads."""
        if attempt != self.attempt:
            return
        self.attempt = 0
        node = self.sim.nodes[self.target]
        leader = node.raft.leader if node.up else ""
        if leader and leader != self.target:
            self.target = leader
        self.next_try = now + 1

    def _retry_elsewhere(self, now: int) -> None:
        self.attempt = 0
        others = [n for n in self.sim.nodes if n != self.target]
        self.target = self.rng.choice(others)
        self.next_try = now + 1 + self.rng.randrange(3)
