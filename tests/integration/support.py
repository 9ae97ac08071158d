"""What the integration tests share: polling with a deadline, and a running local cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from dtfd.devcluster import ClusterFiles, LocalCluster

T = TypeVar("T")


def until(predicate: Callable[[], T], timeout: float = 20, what: str = "condition", interval: float = 0.05) -> T:
    """Poll until `predicate` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


@contextmanager
def running(files: ClusterFiles) -> Iterator[LocalCluster]:
    """Every node of `files` started and agreeing on a leader; everything stopped afterwards."""
    cluster = LocalCluster(files)
    cluster.start_all()
    try:
        cluster.wait_leader()
        yield cluster
    finally:
        cluster.stop_all()
