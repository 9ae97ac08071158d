"""Shedding must refuse a client past its rate and say when to come back, without touching others."""

from dtfd.scheduler.shedding import RateLimiter


def test_bucket_allows_a_burst_then_refuses_with_the_time_to_wait():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=10, burst=5, clock=lambda: now[0])
    assert [limiter.retry_after("a") for _ in range(5)] == [0.0] * 5
    assert limiter.retry_after("a") == 0.1
    assert limiter.retry_after("b") == 0.0  # another client is unaffected
    now[0] = 0.1
    assert limiter.retry_after("a") == 0.0


def test_batches_cost_their_size_but_never_more_than_the_burst():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=100, burst=50, clock=lambda: now[0])
    assert limiter.retry_after("a", cost=40) == 0.0
    assert limiter.retry_after("a", cost=40) == 0.3
    now[0] = 1.0
    assert limiter.retry_after("a", cost=500) == 0.0  # a batch larger than the burst is not refused forever
