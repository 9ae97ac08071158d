"""Tasks/s end to end: no-op tasks through 3 dtfd nodes (fsync on) and real dtf-workers.

    .venv/bin/python bench/tasks.py [--quick] [--tasks N] [--batch B] [--workers W] [--slots S] [--profile [leader|follower|worker]]

Tasks (`true`) are submitted in batches (one POST /v1/tasks of `--batch` tasks, one
replicated entry each), back to back from one client, while W workers with S slots each
lease, run and report them. A run is measured from the task history the leader stamps:
tasks/s is the run's tasks over first submit -> last recorded result, and a task's
latency is its submit -> terminal transition. The second run is the same with the leader
killed (SIGKILL) halfway through the submissions and restarted at once; submissions ride
through the election under one client id and seq, so none is applied twice.

Every wait is bounded, every process started here is stopped on the way out (also on
Ctrl-C or a failure), and the logs stay in the printed directory when something fails.
--profile samples the leader (or, with `--profile follower|worker`, a follower or the first dtf-worker) with py-spy
during the first run and prints where its CPU goes.
Nothing here fails on timing.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import machine_line, percentile  # noqa: E402
from throughput import summarize_profile  # noqa: E402

from dtfd.devcluster import LocalCluster, write_configs, write_worker_config  # noqa: E402
from dtfd.state.tasks import TERMINAL  # noqa: E402
from tests.integration.support import until  # noqa: E402
from tests.integration.workload_helpers import call  # noqa: E402

GOAL_PER_S = 500
# Shedding off (the bench is the only client); a task whose grant died with a killed leader comes back after 10 + 5 s.
WORKLOAD = {"heartbeat_s": 1.0, "lost_after_s": 5.0, "lease_grace_s": 5.0, "submit_rate_per_s": 1e9, "submit_burst": 1_000_000_000, "max_queued_tasks": 10_000_000}
TASK = {"argv": ["true"], "timeout_s": 10}


@dataclass
class Measured:
    name: str
    tasks: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    states: dict[str, int]
    cpu: str
    worker_ms: tuple[float, float]  # CPU per task in the dtf-worker processes, and in the tasks they ran

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds


def cpu_seconds(cluster: LocalCluster) -> dict[tuple[str, int], float]:
    """CPU time so far of each process by (name, pid), task processes included (reaped children count for their worker)."""
    used = {}
    for name, proc in cluster.procs.items():
        try:
            times = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:
            continue
        used[name, proc.pid] = times.user + times.system + times.children_user + times.children_system
    return used


def worker_cpu(cluster: LocalCluster) -> tuple[float, float]:
    """CPU seconds so far of the workers themselves, and of the task processes they reaped."""
    own = tasks = 0.0
    for name, proc in cluster.procs.items():
        if name in cluster.files.node_ids:
            continue
        try:
            times = psutil.Process(proc.pid).cpu_times()
        except psutil.Error:
            continue
        own += times.user + times.system
        tasks += times.children_user + times.children_system
    return own, tasks


def cpu_line(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], seconds: float, nodes: list[str], leader: str) -> str:
    """% of one core: the leader, each follower, and all workers together (with their tasks); a restarted node from its restart."""
    share = {name: 100 * (used - before.get((name, pid), 0.0)) / seconds for (name, pid), used in after.items()}
    followers = " ".join(f"{share[n]:.0f}" for n in nodes if n != leader and n in share)
    workers = sum(v for name, v in share.items() if name not in nodes)
    return f"leader {share.get(leader, 0):.0f}, followers {followers}, workers {workers:.0f}"


def traffic(cluster: LocalCluster) -> collections.Counter[str]:
    """Requests served by every node (by route; a forwarded one counts at both), fsyncs, and the leader's commit index."""
    totals: collections.Counter[str] = collections.Counter()
    leader = cluster.wait_leader()
    for node in cluster.files.node_ids:
        if node not in cluster.procs or cluster.procs[node].poll() is not None:
            continue
        with cluster.client(node) as client:
            text = client.get("/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "dtf_http_requests_total" and sample.labels["route"] != "/metrics":
                    totals[sample.labels["route"]] += int(sample.value)
                elif sample.name == "dtf_wal_fsync_duration_seconds_count":
                    totals["fsyncs"] += int(sample.value)
                elif sample.name == "dtf_raft_commit_index" and node == leader:
                    totals["entries"] = int(sample.value)
    return totals


def per_task(before: collections.Counter[str], after: collections.Counter[str], tasks: int) -> str:
    """What one task cost the cluster: requests by route, replicated entries, fsyncs on all nodes."""
    diff = {key: after[key] - before[key] for key in after}
    if any(n < 0 for n in diff.values()):
        return "per task: not known (a node restarted and its counters with it)"
    routes = ", ".join(f"{route} {n / tasks:.2f}" for route, n in sorted(diff.items()) if route.startswith("/") and n)
    return f"per task: {diff.get('entries', 0) / tasks:.2f} entries, {diff.get('fsyncs', 0) / tasks:.2f} fsyncs (3 nodes); requests {routes}"


def node_ms(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], nodes: list[str], leader: str, tasks: int) -> str:
    """CPU per task in each node (a restarted one from its restart)."""
    ms = {name: 1000 * (used - before.get((name, pid), 0.0)) / tasks for (name, pid), used in after.items() if name in nodes}
    followers = " ".join(f"{ms[n]:.2f}" for n in nodes if n != leader and n in ms)
    return f"CPU ms per task: leader {ms.get(leader, 0):.2f}, followers {followers}"


def submit_run(cluster: LocalCluster, run_id: str, total: int, batch: int, before_batch: Callable[[int], None]) -> None:
    """Submit `total` tasks in batches; `before_batch(seq)` may break things between two of them.

    Each batch goes to the node that took the last one, over a kept-alive connection, and
    round the others only when it fails: like a client of a real cluster, and the submitter
    then costs the cluster no forwarding and itself no connection per batch."""
    nodes = cluster.files.node_ids
    clients = {node: cluster.client(node) for node in nodes}
    current = nodes.index(cluster.wait_leader())
    try:
        for seq, start in enumerate(range(0, total, batch), 1):
            before_batch(seq)
            body = {"tasks": [TASK] * min(batch, total - start), "run_id": run_id, "client": run_id, "seq": seq}
            deadline = time.monotonic() + 30
            while True:
                try:
                    reply = clients[nodes[current]].post("/v1/tasks", json=body, timeout=10)
                except httpx.HTTPError:
                    reply = None
                if reply is not None and reply.status_code == 201:
                    break
                if reply is not None and reply.status_code != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"submit {run_id} batch {seq}: {reply.status_code if reply else 'no answer'} {reply.text[:200] if reply else ''}")
                current = (current + 1) % len(nodes)
                time.sleep(0.02)
    finally:
        for client in clients.values():
            client.close()


def tasks_of(cluster: LocalCluster, run_id: str) -> list[dict]:
    tasks, after = [], "-1"
    while after:
        page = call(cluster, "GET", f"/v1/tasks?run={run_id}&limit=500&after={after}").json()
        tasks += page["tasks"]
        after = page["next"]
    return tasks


def measure(cluster: LocalCluster, name: str, total: int, batch: int, before_batch: Callable[[int], None] = lambda seq: None) -> Measured:
    cpu_before, workers_before, traffic_before, started = cpu_seconds(cluster), worker_cpu(cluster), traffic(cluster), time.monotonic()
    submit_run(cluster, name, total, batch, before_batch)
    print(f"  {name} submitted in {time.monotonic() - started:.2f} s", flush=True)
    # the rate comes from the task history, not from when this poll sees the run done: poll gently
    until(lambda: call(cluster, "GET", f"/v1/runs/{name}").json()["done"], timeout=60 + total / 20, what=f"run {name} done", interval=0.5)
    elapsed = time.monotonic() - started
    cpu_after, leader = cpu_seconds(cluster), cluster.wait_leader()
    cpu = cpu_line(cpu_before, cpu_after, elapsed, cluster.files.node_ids, leader)
    print(f"  {name} {node_ms(cpu_before, cpu_after, cluster.files.node_ids, leader, total)}", flush=True)
    (own, ran), (own_before, ran_before) = worker_cpu(cluster), workers_before
    worker_ms = (1000 * (own - own_before) / total, 1000 * (ran - ran_before) / total)
    print(f"  {name} {per_task(traffic_before, traffic(cluster), total)}", flush=True)
    tasks = tasks_of(cluster, name)
    if len(tasks) != total or any(task["state"] not in TERMINAL for task in tasks):
        raise RuntimeError(f"run {name}: {len(tasks)} tasks listed of {total} submitted")
    latencies = sorted(task["updated_at"] - task["submitted_at"] for task in tasks)
    span = max(task["updated_at"] for task in tasks) - min(task["submitted_at"] for task in tasks)
    states = collections.Counter(task["state"] for task in tasks)
    ms = [1000 * value for value in latencies]
    return Measured(name, total, span, percentile(ms, 0.5), percentile(ms, 0.99), ms[-1], dict(states), cpu, worker_ms)


def kill_leader_at(cluster: LocalCluster, seq: int) -> Callable[[int], None]:
    """A before_batch hook: SIGKILL the leader before batch `seq`, restart it at once on its data."""

    def hook(current: int) -> None:
        if current == seq:
            leader = cluster.wait_leader()
            cluster.kill(leader)
            print(f"  killed the leader {leader} before batch {seq}", flush=True)
            cluster.start(leader)

    return hook


def start_profile(cluster: LocalCluster, name: str, out: Path) -> subprocess.Popen | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy not installed (.venv/bin/pip install py-spy): no profile")
        return None
    pid = cluster.procs[name].pid
    # not --gil: C code that runs without the GIL (DuckDB, hashing) is CPU too; idle waits are left out when summarized
    command = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def print_profile(spy: subprocess.Popen, raw: Path, heading: str) -> None:
    """Stop py-spy (it writes on SIGINT); the process's hottest functions by own and inclusive samples."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    summarize_profile(raw, heading)


def print_table(rows: list[Measured], workers: int, slots: int, batch: int) -> None:
    print(f"\nNo-op tasks end to end: 3 nodes, fsync on, {workers} workers x {slots} slots, batches of {batch}; goal >= {GOAL_PER_S} tasks/s")
    print(f"{'run':<12} {'tasks':>6} {'s':>6} {'tasks/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  states; CPU % of a core")
    for r in rows:
        states = " ".join(f"{state}={n}" for state, n in sorted(r.states.items()))
        print(f"{r.name:<12} {r.tasks:>6} {r.seconds:>6.1f} {r.per_s:>8.0f} {r.p50_ms:>8.0f} {r.p99_ms:>8.0f} {r.max_ms:>8.0f}  {states}; {r.cpu}")
    print("CPU ms per task in the dtf-worker processes (and in the task processes they ran):")
    for r in rows:
        print(f"  {r.name:<12} {r.worker_ms[0]:.2f} ({r.worker_ms[1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 tasks per run instead of 5,000")
    parser.add_argument("--tasks", type=int, help="tasks per run")
    parser.add_argument("--batch", type=int, default=100, help="tasks per submission")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4, help="tasks each worker runs at once")
    parser.add_argument(
        "--profile", nargs="?", const="leader", choices=("leader", "follower", "worker"), help="sample the leader (or a follower, or worker w1) with py-spy during the first run"
    )
    args = parser.parse_args()
    total = args.tasks or (1000 if args.quick else 5000)
    print(machine_line(), flush=True)
    directory = Path(tempfile.mkdtemp(prefix="dtf-bench-tasks-"))
    cluster = LocalCluster(write_configs(directory, nodes=3, workload=WORKLOAD))
    ok = False
    try:
        cluster.start_all()
        cluster.wait_leader()
        for n in range(args.workers):
            cluster.start_worker(write_worker_config(cluster.files, f"w{n + 1}", slots=args.slots))
        until(lambda: len(call(cluster, "GET", "/v1/workers").json()["workers"]) == args.workers, what="workers registered")
        leader = cluster.wait_leader()
        follower = next(node for node in cluster.files.node_ids if node != leader)
        profiled = {"leader": leader, "follower": follower, "worker": "w1", None: ""}[args.profile]
        spy = start_profile(cluster, profiled, directory / f"{profiled}.raw") if profiled else None
        rows = [measure(cluster, "steady", total, args.batch)]
        print(f"  steady: {rows[0].per_s:,.0f} tasks/s", flush=True)
        if spy is not None:
            print_profile(spy, directory / f"{profiled}.raw", f"py-spy on {args.profile} {profiled} during the first run, 200 Hz")
        batches = -(-total // args.batch)
        rows.append(measure(cluster, "leader-kill", total, args.batch, kill_leader_at(cluster, batches // 2 + 1)))
        print_table(rows, args.workers, args.slots, args.batch)
        ok = True
    finally:
        cluster.stop_all()
        print(machine_line())
        if ok and not args.profile:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"logs and data kept in {directory}")


if __name__ == "__main__":
    main()
