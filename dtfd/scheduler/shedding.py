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
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def retry_after(self, client: str, cost: float = 1.0) -> float:
        """0 and the cost taken if `client` may go ahead now; else seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        cost = min(cost, self.burst)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate_per_s
