"""What the workload tests share: API calls that ride through node failures and leader changes."""

from __future__ import annotations

import time

import httpx

from dtfd.devcluster import LocalCluster


def call(cluster: LocalCluster, method: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 10) -> httpx.Response:
    """The first answer other than 503 from any live node, going round them until `timeout`.

    Any node will do (followers forward), so a killed or leaderless node only costs a retry;
    writes that must not apply twice carry `client` and `seq` in `body`."""
    deadline = time.monotonic() + timeout
    while True:
        for node in cluster.files.node_ids:
            if node not in cluster.procs or cluster.procs[node].poll() is not None:
                continue
            try:
                with cluster.client(node, token) as c:
                    reply = c.request(method, path, json=body, timeout=timeout)
            except httpx.HTTPError:
                continue
            if reply.status_code != 503:
                return reply
        if time.monotonic() > deadline:
            raise TimeoutError(f"{method} {path}: no node answered")
        time.sleep(0.05)
