"""How long recoveryd takes to repair a node: kill -9 of a follower, and a corrupted log.

Three dtfd nodes and one recoveryd (local mode, probe interval 0.2 s) on loopback, with a
client writing meanwhile. Each run injects the fault and measures, from the fault:
  detected  recoveryd's decision (two agreeing probes)
  repaired  the action recorded as ok
  caught up the node voting again, at the leader's applied index
Prints min / p50 / max over the runs. Numbers only; nothing here fails on a timing.
`--state-mb N` first fills the state machine with N MB (the issue's 100 MB), so the
reseeded node is brought back by an InstallSnapshot of that size.

    .venv/bin/python bench/recovery.py [--runs 5] [--interval 0.2] [--state-mb 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtfd.devcluster import write_configs  # noqa: E402
from recoveryd.local import TEST_TIMING, Watched, write_config  # noqa: E402
from tests.integration.support import until  # noqa: E402
from tests.integration.test_cluster import Writer  # noqa: E402
from tests.integration.test_recoveryd import corrupt_first_record  # noqa: E402


def _kill(watched: Watched, node: str) -> None:
    os.kill(watched.pid(node), signal.SIGKILL)


def _corrupt(watched: Watched, node: str) -> None:
    corrupt_first_record(watched.files.directory / "data" / node)
    os.kill(watched.pid(node), signal.SIGKILL)


VALUE_BYTES = 60_000
VALUES_PER_REQUEST = 15  # under api.max_body_bytes (1 MiB)


def _fill(watched: Watched, leader: str, megabytes: int) -> None:
    """`megabytes` of state, then a compaction on every node: a reseeded node must be sent the whole snapshot."""
    value = "s" * VALUE_BYTES
    keys = megabytes * 1_000_000 // VALUE_BYTES
    with watched.cluster.client(leader) as c:
        for first in range(0, keys, VALUES_PER_REQUEST):
            ops = [{"op": "put", "key": f"state-{k}", "value": value} for k in range(first, min(keys, first + VALUES_PER_REQUEST))]
            c.post("/v1/kv", json={"ops": ops}, timeout=60).raise_for_status()
    for node in watched.files.node_ids:
        with watched.cluster.client(node) as c:
            c.post("/v1/admin/compact", json={}, timeout=120).raise_for_status()


def one_run(directory: Path, fault: Callable[[Watched, str], None], failure: str, interval: float,
            state_mb: int) -> tuple[float, float, float]:
    files = write_configs(directory)
    watched = Watched(files, write_config(files, directory, {"probes": {**TEST_TIMING["probes"], "interval_s": interval}}))
    try:
        leader = watched.start_nodes()
        if state_mb:
            _fill(watched, leader, state_mb)
        watched.start_recoveryd()
        follower = next(n for n in files.node_ids if n != leader)
        with Writer(watched.cluster, "bench") as writer:
            until(lambda: len(writer.acked) > 50, what="write load running")
            fault(watched, follower)
            fault_at = time.time()
            record = until(lambda: next((r for r in watched.records() if r["failure"] == failure and r["result"] == "ok"), None),
                           timeout=120, interval=0.01, what=f"{failure} repaired")

            def caught_up() -> bool:
                lead = watched.cluster.status(watched.cluster.wait_leader(among=files.node_ids))
                view = watched.cluster.status(follower)
                return bool(lead and view and not view["rejoining"] and view["applied_index"] >= lead["commit_index"])

            until(caught_up, timeout=120, interval=0.01, what="caught up")
            return record["started"] - fault_at, record["finished"] - fault_at, time.time() - fault_at
    finally:
        watched.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.2, help="probe interval, seconds")
    parser.add_argument("--state-mb", type=int, default=0, help="state filled in before the fault (MB)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    for name, fault, failure in (("kill -9 of a follower", _kill, "crash"), ("corrupted log (reseed)", _corrupt, "corruption")):
        samples, failed = [], []
        for run in range(args.runs):
            tmp = tempfile.mkdtemp(prefix="dtf-bench-recovery-")
            try:
                samples.append(one_run(Path(tmp), fault, failure, args.interval, args.state_mb))
            except TimeoutError as exc:
                failed.append(f"{exc} (logs kept in {tmp})")
                continue
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n{name}: {args.runs} runs, probe interval {args.interval}s, {args.state_mb} MB of state, {len(failed)} failed")
        for line in failed:
            print(f"  failed: {line}")
        for n, column in enumerate(("detected", "repaired", "caught up") if samples else ()):
            values = sorted(s[n] for s in samples)
            print(f"  {column:10} min {values[0] * 1000:7.0f} ms   p50 {statistics.median(values) * 1000:7.0f} ms   max {values[-1] * 1000:7.0f} ms")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
