"""Command line for the simulator.

    python -m tests.sim demo                              # a narrated run, for a first look
    python -m tests.sim --seed 123 --nodes 5 --steps 3000 # one seed: verdict, liveness, trace hash
    python -m tests.sim --seeds 500 --nodes 5             # many seeds (one process per CPU): failures, seeds/s, liveness

A failing seed prints its replay command and the last events of its trace; the
exit status is 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dtfd.raft.config import PLANTED_BUGS
from tests.sim.demo import run_demo
from tests.sim.faults import PROFILES
from tests.sim.harness import Params, Result, percentiles, run_many, run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description="Deterministic simulation of dtf's Raft core.")
    parser.add_argument("mode", nargs="?", choices=("run", "demo"), default="run")
    parser.add_argument("--seed", type=int, help="run this one seed and print its trace on failure")
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run (from --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=Params.steps, help="steps of chaos before healing")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="mixed")
    parser.add_argument("--bug", action="append", default=[], choices=sorted(PLANTED_BUGS), help="plant a bug in the core")
    parser.add_argument("--no-durability-check", action="store_true", help="skip persist_before_send")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes for --seeds")
    parser.add_argument("--trace", type=int, default=60, help="trace lines to show for a failure")
    args = parser.parse_args(argv)
    if args.mode == "demo":
        return run_demo()
    params = Params(
        nodes=args.nodes,
        steps=args.steps,
        profile=args.profile,
        bugs=frozenset(args.bug),
        durability=not args.no_durability_check,
        hashing=args.seed is not None,
    )
    if args.seed is not None:
        return _one(run_seed(args.seed, params), args.trace)
    return _many(params, range(args.first_seed, args.first_seed + args.seeds), args.jobs, args.trace)


def _one(result: Result, trace_lines: int) -> int:
    if not result.ok:
        _print_failure(result, trace_lines)
        return 1
    s = result.stats
    print(f"seed {result.seed}: all invariants held")
    print(f"  liveness after healing: leader in {result.elect_ticks} steps, converged in {result.converge_ticks} steps")
    print(
        f"  {result.acked} proposals acknowledged, {s['applied']} entries applied, {s['leaders']} leaders, "
        f"{s['faults']} faults, {s['crashes']} crashes, {s['snapshots_installed']} snapshots installed "
        f"({s['snapshot_chunks']} chunks), {s['compactions']} compactions"
    )
    print(f"  messages: {s['sent']} sent, {s['delivered']} delivered, {s['dropped']} dropped, {s['duplicated']} duplicated")
    print(f"  trace hash {result.trace_hash} over {s['events']} events")
    return 0


def _print_failure(result: Result, trace_lines: int) -> None:
    result.trace = result.trace[-trace_lines:]
    print(result.report())


def _many(params: Params, seeds: range, jobs: int, trace_lines: int) -> int:
    start = time.perf_counter()
    results = list(run_many(seeds, params, jobs))
    elapsed = time.perf_counter() - start
    failures = [r for r in results if not r.ok]
    for r in failures:
        _print_failure(r, trace_lines)
        print()
    ok = [r for r in results if r.ok]
    print(
        f"{len(results)} seeds ({params.nodes} nodes, {params.steps} steps, profile {params.profile}) "
        f"in {elapsed:.1f}s with {jobs} job(s): {len(results) / elapsed:.1f} seeds/s, {len(failures)} failed"
    )
    if ok:
        for label, values in (
            ("leader elected after healing", [r.elect_ticks for r in ok]),
            ("all applied after healing", [r.converge_ticks for r in ok]),
        ):
            p = percentiles([v for v in values if v is not None])
            print(f"  {label:<29} steps: min {p['min']}  p50 {p['p50']}  p99 {p['p99']}  max {p['max']}")
        totals = {k: sum(r.stats[k] for r in ok) for k in ("crashes", "faults", "snapshots_installed", "leaders")}
        print(
            f"  totals: {sum(r.acked for r in ok)} proposals acknowledged, {totals['leaders']} leaders, "
            f"{totals['faults']} faults, {totals['crashes']} crashes, {totals['snapshots_installed']} snapshots installed"
        )
    if failures:
        print("failed: " + ", ".join(f"{r.seed} ({r.violation})" for r in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
