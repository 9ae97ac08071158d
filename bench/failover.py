"""Failover: how long writes stop when the leader dies, dtf beside PySyncObj and etcd.

    .venv/bin/python bench/failover.py [--quick] [--kills N] [--stops N] [--systems dtf,pysyncobj,etcd]

Each system runs as three processes on loopback with a 50 ms heartbeat and a 150-300 ms
election timeout (etcd takes one number, 300 ms, and draws from [300, 600) ms), fsync on
(PySyncObj cannot fsync: its journal is an mmap it never syncs). One client thread
writes continuously, one request at a time, each with its own key (dtf: client id and
seq, so a retry is applied once): it sends to the node that last accepted, and on any
failure tries the next node at once (a pause of 10 ms after a full round of failures);
each attempt is bounded by 0.5 s, each request by 5 s.

Crash: the leader gets SIGKILL `--kills` times, at a random point 0.2-0.5 s after the
cluster was whole. Measured: kill to the first acknowledged write whose attempt began
after the killed process was gone (reaped). Then the node restarts on its data and the cluster must be whole again
(every node up, one leader, every node applied what the leader had).

Graceful: the leader gets SIGTERM `--stops` times (dtfd and etcd hand leadership over
first; PySyncObj has no handler and dies as on SIGKILL). Measured: the longest gap
between two acknowledged writes across the stop, failed requests (not acknowledged
within 5 s) and retries by cause (a refused connection, then success elsewhere, is a
retry). Writes the crash latency CDF of every system to docs/failover-cdf.png.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Cluster, Dtf, Etcd, PySyncObj, Timing, WriteRequest, machine_line, percentile  # noqa: E402

ATTEMPT_TIMEOUT_S = 0.5
REQUEST_DEADLINE_S = 5.0
ROUND_PAUSE_S = 0.01
EVENT_DEADLINE_S = 15.0
WHOLE_DEADLINE_S = 60.0
CDF_PATH = Path(__file__).resolve().parent.parent / "docs" / "failover-cdf.png"


@dataclass
class Log:
    """What the writer saw, with monotonic times; appended by the writer thread only."""

    acks: list[tuple[float, float]] = field(default_factory=list)  # (attempt began, acknowledged)
    retries: list[tuple[float, str]] = field(default_factory=list)  # (when, cause)
    failures: list[float] = field(default_factory=list)  # when the request gave up


class Writer(threading.Thread):
    """One client writing unique keys back to back, trying each node until one accepts."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(name=f"writer-{cluster.name}", daemon=True)
        self.cluster = cluster
        self.log = Log()
        self.halt = threading.Event()
        self.clients = {n: httpx.Client(base_url=cluster.base_url(n), timeout=ATTEMPT_TIMEOUT_S) for n in cluster.nodes}

    def run(self) -> None:
        nodes, current, seq = self.cluster.nodes, 0, 0
        while not self.halt.is_set():
            seq += 1
            request = self.cluster.write(f"failover-{seq}", "bench-writer", seq)
            deadline = time.monotonic() + REQUEST_DEADLINE_S
            failed_in_round = 0
            while True:
                began = time.monotonic()
                cause = self._attempt(nodes[current], request)
                if cause is None:
                    self.log.acks.append((began, time.monotonic()))
                    break
                self.log.retries.append((began, cause))
                current = (current + 1) % len(nodes)
                failed_in_round += 1
                if time.monotonic() > deadline or self.halt.is_set():
                    self.log.failures.append(time.monotonic())
                    break
                if failed_in_round % len(nodes) == 0:
                    time.sleep(ROUND_PAUSE_S)

    def _attempt(self, node: str, request: WriteRequest) -> str | None:
        """None when acknowledged, else why not."""
        try:
            reply = self.clients[node].request(request.method, request.path, content=request.body, headers=request.headers)
        except httpx.ConnectError:
            return "refused"
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "reset"
        return None if reply.status_code == 200 else f"http {reply.status_code}"

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=REQUEST_DEADLINE_S + 5)
        for client in self.clients.values():
            client.close()

    def first_ack_after(self, t: float, timeout: float) -> float:
        """Time of the first acknowledgement of an attempt begun at or after `t`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            acks = self.log.acks
            for began, acked in acks[seen:]:
                if began >= t:
                    return acked
            seen = len(acks)
            time.sleep(0.002)
        raise TimeoutError(f"{self.cluster.name}: no write acknowledged within {timeout}s")


@dataclass
class Tally:
    """The client's failed attempts that a retry made good, by cause, and its requests never acknowledged."""

    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: int = 0

    def add(self, log: Log, start: float, end: float) -> None:
        self.retries.update(cause for t, cause in log.retries if start <= t < end)
        self.failed += sum(1 for t in log.failures if start <= t < end)

    def causes(self) -> str:
        return ", ".join(f"{cause} {n}" for cause, n in sorted(self.retries.items())) or "-"


@dataclass
class Result:
    name: str
    crash_ms: list[float] = field(default_factory=list)
    crash: Tally = field(default_factory=Tally)
    gap_ms: list[float] = field(default_factory=list)
    stop_ms: list[float] = field(default_factory=list)
    graceful: Tally = field(default_factory=Tally)


def longest_gap(log: Log, start: float, end: float) -> float:
    """Longest time between consecutive acknowledgements, counting from the last one before `start`."""
    times = [acked for _, acked in log.acks]
    before = [t for t in times if t < start]
    during = [t for t in times if start <= t <= end]
    points = before[-1:] + during
    return max((b - a for a, b in zip(points, points[1:])), default=end - start)


def disrupt(cluster: Cluster, writer: Writer, rng: random.Random, stop: Callable[[str], None], tally: Tally) -> tuple[str, float, float, float]:
    """Stop the leader of a whole cluster with `stop`, restart it once a write got through, wait for it to be whole.

    Returns the leader and the times of the signal, of its exit, and of the first write
    acknowledged after the exit; adds what the client saw until the cluster was whole to `tally`.
    """
    time.sleep(rng.uniform(0.2, 0.5))  # a random point in the heartbeat cycle
    leader = cluster.wait_whole(WHOLE_DEADLINE_S)
    signalled = time.monotonic()
    stop(leader)
    exited = time.monotonic()
    acked = writer.first_ack_after(exited, EVENT_DEADLINE_S)
    cluster.start(leader)
    cluster.wait_whole(WHOLE_DEADLINE_S)
    tally.add(writer.log, signalled, time.monotonic())
    return leader, signalled, exited, acked


def run_system(cluster: Cluster, kills: int, stops: int, rng: random.Random) -> Result:
    result = Result(cluster.name)
    writer = Writer(cluster)
    try:
        cluster.start_all()
        cluster.wait_whole(WHOLE_DEADLINE_S)
        writer.start()
        writer.first_ack_after(time.monotonic(), EVENT_DEADLINE_S)
        for i in range(kills):
            leader, signalled, _, acked = disrupt(cluster, writer, rng, cluster.kill, result.crash)
            result.crash_ms.append((acked - signalled) * 1000)
            print(f"  {cluster.name} kill {i + 1}/{kills}: {leader} -> first write after {result.crash_ms[-1]:.0f} ms", flush=True)
        for i in range(stops):
            leader, signalled, exited, acked = disrupt(cluster, writer, rng, cluster.terminate, result.graceful)
            result.stop_ms.append((exited - signalled) * 1000)
            result.gap_ms.append(longest_gap(writer.log, signalled, acked) * 1000)
            print(f"  {cluster.name} stop {i + 1}/{stops}: {leader} -> longest write gap {result.gap_ms[-1]:.0f} ms", flush=True)
    except (TimeoutError, RuntimeError) as exc:
        print(f"  {cluster.name}: stopped early, results so far kept: {exc}\n{cluster.post_mortem()}", flush=True)
    finally:
        writer.stop()
        cluster.stop_all()
    return result


def print_tables(results: list[Result], durability: dict[str, str]) -> None:
    print("\nCrash (SIGKILL to the leader): kill -> first acknowledged write, ms")
    print(f"{'system':<10} {'durability':<24} {'kills':>5} {'min':>6} {'p50':>6} {'p99':>6} {'max':>6} {'failed':>6}  retries by cause")
    for r in results:
        v = sorted(r.crash_ms)
        if not v:
            continue
        stats = " ".join(f"{x:>6.0f}" for x in (v[0], percentile(v, 0.5), percentile(v, 0.99), v[-1]))
        print(f"{r.name:<10} {durability[r.name]:<24} {len(v):>5} {stats} {r.crash.failed:>6}  {r.crash.causes()}")
    print("\nGraceful (SIGTERM to the leader): longest gap between acknowledged writes, ms; SIGTERM -> exit, ms")
    print(f"{'system':<10} {'stops':>5} {'gap p50':>8} {'gap max':>8} {'exit p50':>9} {'failed':>6}  retries by cause")
    for r in results:
        if not r.gap_ms:
            continue
        gaps, exits = sorted(r.gap_ms), sorted(r.stop_ms)
        print(
            f"{r.name:<10} {len(gaps):>5} {percentile(gaps, 0.5):>8.0f} {gaps[-1]:>8.0f} {percentile(exits, 0.5):>9.0f}"
            f" {r.graceful.failed:>6}  {r.graceful.causes()}"
        )


def plot_cdf(results: list[Result], timing: Timing, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results:
        v = sorted(r.crash_ms)
        if v:
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=f"{r.name} (n={len(v)}, p50 {percentile(v, 0.5):.0f} ms)")
    ax.axvline(timing.election_min_ms, color="grey", linestyle=":", linewidth=1)
    ax.axvline(timing.election_max_ms, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("SIGKILL of the leader -> first acknowledged write (ms)")
    ax.set_ylabel("fraction of kills")
    ax.set_title(f"Leader crash failover, 3 nodes on loopback, election {timing.election_min_ms}-{timing.election_max_ms} ms (etcd 300-600)", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 kills and 2 stops per system")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--systems", default="dtf,pysyncobj,etcd", help="comma-separated; etcd is skipped when not installed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=CDF_PATH)
    args = parser.parse_args()
    kills, stops = (5, 2) if args.quick else (args.kills, args.stops)
    timing = Timing()
    rng = random.Random(args.seed)
    print(machine_line(), flush=True)
    results: list[Result] = []
    durability: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="dtf-failover-") as tmp:
        for name in args.systems.split(","):
            directory = Path(tmp) / name
            if name == "dtf":
                cluster: Cluster = Dtf(directory, timing)
            elif name == "pysyncobj":
                cluster = PySyncObj(directory, timing)
            elif name == "etcd":
                if not Etcd.installed():
                    print("etcd: not installed (apt-get install -y etcd-server etcd-client), skipped")
                    continue
                cluster = Etcd(directory, timing)
            else:
                parser.error(f"unknown system {name}")
            durability[name] = cluster.durability
            print(f"{name}: {kills} kills, {stops} graceful stops", flush=True)
            results.append(run_system(cluster, kills, stops, rng))
    print(f"\nat the end, {machine_line()}")
    print_tables(results, durability)
    plot_cdf(results, timing, args.plot)
    print(f"\nCDF written to {args.plot}")


if __name__ == "__main__":
    main()
