"""Chaos runs: a real 3-node cluster, clients recording a history, a nemesis, the checkers.

    python -m tests.chaos --profile ci --seed 1        # 3 schedules of ~20 s of faults, ~2-3 minutes
    python -m tests.chaos --profile chaos --seed 1     # every fault kind, until >= 10,000 operations
    python -m tests.chaos --seed 1 --bug stale-reads       # a wrong client: must be caught
    python -m tests.chaos --seed 1 --bug ack-before-fsync  # nodes that ack before fsync: must be caught
    python -m tests.chaos --check path/to/history.jsonl    # re-check a kept history

A run's seed fixes its fault schedule, the clients' choices and the task specs; each run
prints its schedule, operations, faults injected, availability (ok operations per second
during faults, beside the rate outside them), the time without a leader, and the verdicts.
Its history (JSON lines) and node logs stay in the run directory, printed at the end.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from dtfd.devcluster import ClusterFiles, write_configs, write_worker_config
from dtfd.storage import failpoints
from dtfd.storage.interface import EX_IOERR
from tests.chaos.history import Endpoint, History, KvClient, TaskClient, kv_op, load, sample_leader
from tests.chaos.linearizability import LostWrite, Verdict, check, lost_writes
from tests.chaos.nemesis import FAULTS, GAP_S, Fault, Nemesis, schedule
from tests.chaos.proxy import Mesh, ProxiedCluster
from tests.chaos.tasks_checker import TaskVerdict, check_tasks, runs_from

# Workers heartbeat every 0.3 s and are lost after 1.5 s; a lease without a result ends 2 s past its timeout.
WORKLOAD = {"heartbeat_s": 0.3, "lost_after_s": 1.5, "lease_grace_s": 2.0, "submit_rate_per_s": 10_000.0, "submit_burst": 10_000}
SETTLE_S = 3.0  # healthy time after the last fault, in which the cluster must serve again
START_S = 30.0  # for a cluster to elect its first leader


@dataclass(frozen=True)
class Plan:
    """One run: which faults, for how long, with how much load."""

    label: str
    faults: tuple[str, ...]
    length_s: float
    clients: int = 8
    keys: int = 4
    workers: int = 2
    tasks: int = 40
    min_ops: int = 0  # keep the load on (healthy) past the schedule until this many operations
    gap_s: tuple[float, float] = GAP_S  # healthy time before each fault

    def schedule(self, seed: int) -> list[Fault]:
        return schedule(seed, self.faults, self.length_s, self.gap_s)


PROFILES: dict[str, tuple[Plan, ...]] = {
    "ci": (
        Plan("crash", ("kill_leader", "kill_node", "restart_all", "kill_worker", "fsync_error", "disk_full"), 20.0),
        Plan("pause", ("pause_leader", "pause_node"), 18.0),
        Plan("partition", ("partition_leader", "partition_node"), 18.0),
    ),
    "chaos": (Plan("all", FAULTS, 150.0, clients=16, keys=32, workers=3, tasks=300, min_ops=10_000),),
}
# Planted bugs, each with the short schedule that must catch it.
BUGS: dict[str, Plan] = {
    # half the clients read ?stale=ok (locally, without ReadIndex) from fixed nodes
    "stale-reads": Plan("stale-reads", ("partition_node", "partition_leader"), 12.0, tasks=0),
    # every node acknowledges writes ACK_DELAY_MS before they reach its disk; kill -9 of all loses
    # them; the gaps let the cluster start (1-2.5 s on a loaded machine) and acknowledge again
    "ack-before-fsync": Plan("ack-before-fsync", ("restart_all",), 14.0, tasks=0, gap_s=(3.5, 5.0)),
}
ACK_DELAY_MS = 300


@dataclass
class Outcome:
    """What one run did and what the checkers said."""

    plan: Plan
    seed: int
    directory: Path
    faults: list[Fault]
    records: list[dict[str, Any]]
    kv: Verdict
    tasks: TaskVerdict | None
    tasks_settled: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    lost: list[LostWrite] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        tasks_ok = self.tasks is None or (self.tasks.ok and self.tasks_settled)
        return self.kv.linearizable is True and tasks_ok and not self.bad_exits

    @property
    def disk_exits(self) -> list[tuple[str, str, int]]:
        """(fault kind, node, exit code) for every exit of a node whose disk a fault broke."""
        return [(r["kind"], r["target"], code) for r in self.records if r["type"] == "fault" for code in r.get("exits", ())]

    @property
    def bad_exits(self) -> list[tuple[str, str, int]]:
        """Disk-fault exits with another code than 74: a node that crashed instead of stopping cleanly."""
        return [e for e in self.disk_exits if e[2] != EX_IOERR]

    @property
    def history(self) -> Path:
        return self.directory / "history.jsonl"


def worker_config(files: ClusterFiles, name: str) -> Path:
    """A dtf-worker with short request timeouts, so a failover costs it little."""
    path = write_worker_config(files, name)
    document = tomllib.loads(path.read_text())
    document["coordinator"].update(request_timeout_s=1.0, lease_wait_s=2.0)
    document["tasks"] = {"kill_grace_s": 1.0, "drain_timeout_s": 5.0}
    path.write_text(tomli_w.dumps(document))
    return path


async def run(plan: Plan, seed: int, directory: Path, bug: str | None = None) -> Outcome:
    """One run of `plan` in `directory` (its cluster, logs and history stay there), with one
    of the planted BUGS switched on if `bug` names it."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown planted bug {bug!r}; known: {sorted(BUGS)}")
    stale_reads = bug == "stale-reads"
    files = write_configs(directory, workload=WORKLOAD)
    mesh = Mesh(files)
    cluster = ProxiedCluster(files, mesh)
    if bug == "ack-before-fsync":
        cluster.env[failpoints.ACK_BEFORE_FSYNC_ENV] = str(ACK_DELAY_MS)
    history = History(directory / "history.jsonl")
    rng = random.Random(seed)
    faults = plan.schedule(seed)
    endpoint = Endpoint([f"http://{files.api[n]}" for n in files.node_ids], files.admin_token)
    keys = [f"k{n}" for n in range(plan.keys)]
    clients = [
        KvClient(f"c{n}", endpoint, keys, history, random.Random(rng.random()), endpoint.urls[n % 3] if stale_reads and n % 2 else None)
        for n in range(plan.clients)
    ]
    tasks = TaskClient("t0", endpoint, history, random.Random(rng.random()), directory / "runs.log", f"chaos-{seed}") if plan.tasks else None
    settled = True
    try:
        # The client outlives the nursery: services still running when it closes would fail, not stop.
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as http, trio.open_nursery() as services:
            await services.start(mesh.serve)
            cluster.start_all()
            await trio.to_thread.run_sync(cluster.wait_leader, START_S)
            workers = {f"w{n}": worker_config(files, f"w{n}") for n in range(plan.workers if plan.tasks else 0)}
            for path in workers.values():
                cluster.start_worker(path)
            services.start_soon(sample_leader, http, endpoint, history)
            with trio.fail_after(plan.length_s * 3 + 60):
                stop = trio.Event()
                async with trio.open_nursery() as load:
                    for client in clients:
                        load.start_soon(client.run, http, stop)
                    if tasks is not None:
                        load.start_soon(tasks.run, http, plan.tasks, plan.length_s / plan.tasks, stop)
                    await Nemesis(cluster, history, mesh, workers).run(faults)
                    await trio.sleep(SETTLE_S)
                    while sum(1 for r in history.records if r["type"] == "kv") < plan.min_ops:
                        await trio.sleep(0.5)
                    stop.set()
                final = KvClient("final", endpoint, keys, history, random.Random(seed))
                for key in keys:
                    await final.read(http, key)
                if tasks is not None:
                    settled = await tasks.collect(http, 30.0)
            services.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(cluster.stop_all)
        history.close()
    kv = check(history.kv_ops(), budget_s=120.0)
    lost = lost_writes(history.kv_ops())
    task_verdict = check_tasks(history.records, runs_from(directory / "runs.log")) if tasks is not None else None
    outcome = Outcome(plan, seed, directory, faults, history.records, kv, task_verdict, settled, lost=lost)
    outcome.stats = statistics(history.records)
    return outcome


def statistics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Operations, errors, latency and leaderless time, during each fault kind and outside faults."""
    ops = [r for r in records if r["type"] in ("kv", "task_submit")]
    faults = [r for r in records if r["type"] == "fault" and not r.get("skipped")]
    leaderless = _leaderless(records)
    start = min([r["invoke"] for r in ops], default=0.0)
    end = max([r.get("complete") or r["invoke"] for r in ops], default=0.0)
    rows: dict[str, dict[str, float]] = {}
    for kind in sorted({f["kind"] for f in faults}):
        windows = [(f["start"], f["end"]) for f in faults if f["kind"] == kind]
        rows[kind] = _row(ops, windows, leaderless, count=len(windows))
    fault_windows = [(f["start"], f["end"]) for f in faults]
    rows["(during any fault)"] = _row(ops, fault_windows, leaderless, count=len(fault_windows))
    rows["(no fault)"] = _row(ops, _complement(fault_windows, start, end), leaderless, count=0)
    return {"rows": rows, "operations": len(ops), "faults": len(faults), "leaderless_s": _overlap(leaderless, [(start, end)])}


def _row(ops: list[dict[str, Any]], windows: list[tuple[float, float]], leaderless: list[tuple[float, float]], count: int) -> dict[str, float]:
    inside = [r for r in ops if any(a <= r["invoke"] <= b for a, b in windows)]
    ok = [r for r in inside if r["outcome"] == "ok"]
    latencies = [(r["complete"] if r["complete"] is not None else float("inf")) - r["invoke"] for r in inside]
    seconds = sum(b - a for a, b in windows)
    return {
        "faults": count,
        "seconds": seconds,
        "operations": len(inside),
        "error_rate": 1 - len(ok) / len(inside) if inside else 0.0,
        "ok_per_s": len(ok) / seconds if seconds else 0.0,
        "leaderless_s": _overlap(leaderless, windows),
        "max_latency_s": max(latencies, default=0.0),
    }


def _leaderless(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    samples = [r for r in records if r["type"] == "leader"]
    spans = []
    for n, sample in enumerate(samples):
        if sample["leader"] == "":
            until = samples[n + 1]["t"] if n + 1 < len(samples) else sample["t"]
            spans.append((sample["t"], until))
    return spans


def _overlap(spans: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in spans for c, d in windows)


def _complement(windows: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    gaps, at = [], start
    for a, b in sorted(windows):
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if end > at:
        gaps.append((at, end))
    return gaps


def summary(outcome: Outcome) -> str:
    """The lines a run prints: what it did, how available the cluster was, the verdicts."""
    kv = [r for r in outcome.records if r["type"] == "kv"]
    by_outcome = {o: sum(1 for r in kv if r["outcome"] == o) for o in ("ok", "fail", "unknown")}
    stats = outcome.stats
    during, healthy = stats["rows"]["(during any fault)"], stats["rows"]["(no fault)"]
    kinds = {kind: row["faults"] for kind, row in stats["rows"].items() if not kind.startswith("(")}
    lines = [
        f"run {outcome.plan.label} seed={outcome.seed}: {len(kv)} kv operations ({by_outcome['ok']} ok, "
        f"{by_outcome['fail']} failed, {by_outcome['unknown']} unknown), {sum(1 for r in outcome.records if r['type'] == 'task_submit')} task submits",
        f"  faults injected: {stats['faults']} " + " ".join(f"{k}={v}" for k, v in kinds.items()),
        f"  availability: {during['ok_per_s']:.0f} ok ops/s during faults ({during['seconds']:.1f} s), "
        f"{healthy['ok_per_s']:.0f} ok ops/s outside; {stats['leaderless_s']:.2f} s without a leader",
        f"  linearizability: {outcome.kv.label} ({outcome.kv.operations} operations on {outcome.kv.keys} keys)",
    ]
    if exits := outcome.disk_exits:
        bad = outcome.bad_exits
        lines.insert(3, f"  disk faults: {len(exits)} node exits, " + (f"{len(bad)} NOT with 74: {bad}" if bad else "all with 74 (storage failed)"))
    if outcome.lost:
        lines.append(f"  acknowledged writes missing from later reads: {len(outcome.lost)} (lost writes, or stale reads)")
        lines += [f"    {lost.explain()}" for lost in outcome.lost[:3]]
    lines += ["  " + failure.explain().replace("\n", "\n  ") for failure in outcome.kv.failures[:3]]
    if outcome.tasks is not None:
        states = " ".join(f"{k}={v}" for k, v in sorted(outcome.tasks.states.items()))
        verdict = "ok" if outcome.tasks.ok and outcome.tasks_settled else "VIOLATED" if not outcome.tasks.ok else "NOT SETTLED"
        lines.append(f"  tasks: {verdict} ({outcome.tasks.tasks} tasks: {states})")
        lines += [f"    {v}" for v in (outcome.tasks.violations + outcome.tasks.unfinished)[:10]]
        workers = [r for r in outcome.records if r["type"] == "workers"]
        if workers and not outcome.tasks_settled:
            lines.append("    workers at the end: " + ", ".join(f"{w['id']}={w['state']}" for w in workers[-1]["workers"]))
    lines.append(f"  history: {outcome.history}")
    return "\n".join(lines)


def describe_schedule(faults: list[Fault]) -> str:
    return ", ".join(f"{f.kind}@{f.at:.1f}s/{f.duration:.1f}s" for f in faults)


async def run_profile(profile: str, seed: int, root: Path, bug: str | None = None) -> list[Outcome]:
    """Every plan of a profile (or a planted bug's plan), seeds seed, seed + 1, ...; each run prints its summary."""
    plans = (BUGS[bug],) if bug else PROFILES[profile]
    outcomes = []
    for n, plan in enumerate(plans):
        run_seed = seed + n
        print(f"== {plan.label} seed={run_seed}: {describe_schedule(plan.schedule(run_seed))}", flush=True)
        started = time.monotonic()
        outcome = await run(plan, run_seed, root / f"{plan.label}-{run_seed}", bug)
        print(summary(outcome) + f"\n  took {time.monotonic() - started:.0f} s", flush=True)
        outcomes.append(outcome)
    return outcomes


def recheck(path: Path) -> int:
    ops = [kv_op(r) for r in load(path) if r["type"] == "kv"]
    verdict = check(ops, budget_s=600.0)
    print(f"{path}: {verdict.label} ({verdict.operations} operations on {verdict.keys} keys)")
    for lost in lost_writes(ops):
        print(lost.explain())
    for failure in verdict.failures:
        print(failure.explain())
    return 0 if verdict.linearizable else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="where runs keep their cluster, logs and history (default: a new temp dir)")
    parser.add_argument("--bug", choices=sorted(BUGS), help="run a planted bug's schedule instead of the profile: the run must be caught")
    parser.add_argument("--check", type=Path, metavar="HISTORY", help="only re-check a history file")
    args = parser.parse_args(argv)
    if args.check:
        return recheck(args.check)
    root = args.dir or Path(tempfile.mkdtemp(prefix="dtf-chaos-"))
    outcomes = trio.run(run_profile, args.profile, args.seed, root, args.bug)
    if args.bug:
        caught = all(o.kv.linearizable is False for o in outcomes)
        print(f"planted bug {args.bug} " + ("caught" if caught else "NOT caught"))
        return 0 if caught else 1
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
