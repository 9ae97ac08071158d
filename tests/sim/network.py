"""The simulated network: per-message delay, loss, duplication and directed link cuts.

Every message gets a delivery step drawn from the run's rng; messages are delivered
in (step, send order), so a varying delay is what reorders them. A directed link
(src, dst) can be cut by any number of overlapping faults at once (a partition, a
flapping link, an isolated leader); it carries traffic again only when all of them
have healed. A cut link drops messages both at send time and at delivery time, so a
partition also loses what was in flight.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable

from dtfd.raft import Message, NodeId
from tests.sim.trace import Trace


class Network:
    def __init__(self, rng: random.Random, trace: Trace, drop: float = 0.0, dup: float = 0.0, delay: int = 1) -> None:
        self.rng = rng
        self.trace = trace
        self.drop = drop
        self.dup = dup
        self.delay = delay  # max extra steps a message may take beyond the first
        self.cuts: dict[tuple[NodeId, NodeId], int] = {}
        self._queue: list[tuple[int, int, Message]] = []
        self._sent = 0
        self.stats = {"sent": 0, "delivered": 0, "dropped": 0, "duplicated": 0}

    def cut(self, links: Iterable[tuple[NodeId, NodeId]]) -> None:
        for link in links:
            self.cuts[link] = self.cuts.get(link, 0) + 1

    def mend(self, links: Iterable[tuple[NodeId, NodeId]]) -> None:
        for link in links:
            left = self.cuts[link] - 1
            if left:
                self.cuts[link] = left
            else:
                del self.cuts[link]

    def send(self, now: int, msg: Message) -> None:
        self.stats["sent"] += 1
        if (msg.src, msg.dst) in self.cuts:
            self._dropped(now, msg, "cut")
            return
        rng = self.rng
        if self.drop and rng.random() < self.drop:
            self._dropped(now, msg, "lost")
            return
        self._enqueue(now + 1 + rng.randint(0, self.delay), msg)
        if self.dup and rng.random() < self.dup:
            self.stats["duplicated"] += 1
            self._enqueue(now + 1 + rng.randint(0, 3 * self.delay), msg)

    def requeue(self, at: int, msg: Message) -> None:
        """Hold a message for a node that cannot take it now (paused) until step `at`."""
        self._enqueue(at, msg)

    def due(self, now: int) -> list[Message]:
        """Pop every message due by `now`, in delivery order, minus those on links cut meanwhile."""
        out = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            msg = heapq.heappop(queue)[2]
            if (msg.src, msg.dst) in self.cuts:
                self._dropped(now, msg, "cut")
            else:
                out.append(msg)
        return out

    def dropped(self, now: int, msg: Message, reason: str) -> None:
        """Record a message lost at the receiver (node down)."""
        self._dropped(now, msg, reason)

    def _enqueue(self, at: int, msg: Message) -> None:
        self._sent += 1
        heapq.heappush(self._queue, (at, self._sent, msg))

    def _dropped(self, now: int, msg: Message, reason: str) -> None:
        self.stats["dropped"] += 1
        self.trace.add((now, "drop", reason, msg))

