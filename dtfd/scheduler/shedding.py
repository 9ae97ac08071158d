"""Load shedding: per-client token buckets, so one noisy client cannot starve the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    rate_per_s: float
    burst: float
    clock: object = time.monotonic
    max_clients: int = 0  # 0: no bound; else past this many, refilled buckets are forgotten, then the least recent
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def retry_after(self, client: str, cost: float = 1.0) -> float:
        """0 and the cost taken if `client` may go ahead now; else seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if self.max_clients and len(self._buckets) >= self.max_clients:
                self._forget(now)
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        cost = min(cost, self.burst)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate_per_s

    def _forget(self, now: float) -> None:
        """Bounded memory against clients with ever new names: a refilled bucket is as good as a new one."""
        buckets = self._buckets
        for client in [c for c, b in buckets.items() if b.tokens + (now - b.updated) * self.rate_per_s >= self.burst]:
            del buckets[client]
        if len(buckets) >= self.max_clients:
            for client in sorted(buckets, key=lambda c: buckets[c].updated)[: len(buckets) // 2 + 1]:
                del buckets[client]
