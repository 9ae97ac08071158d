"""The chaos suite's default profile as a table: how dtf behaves under each kind of fault.

    .venv/bin/python bench/chaos_report.py                 # the ci profile, seed 1 (~2-3 minutes)
    .venv/bin/python bench/chaos_report.py --profile chaos --seed 7

Runs every schedule of the profile (real processes on loopback, see tests/chaos/run.py),
then prints one row per fault kind, over all runs: faults injected, operations invoked
during them, error rate (operations that failed or whose outcome stayed unknown), time
without a leader, the longest latency; then a row for all fault time and one for the time
without faults; then each run's verdicts (linearizability, lost acknowledged writes, tasks,
and the exit codes of nodes whose disk broke). Like the other benches it asserts nothing
about the numbers; it exits 1 only if a checker found a violation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos.run import PROFILES, Outcome, run_profile  # noqa: E402


def table(outcomes: list[Outcome]) -> str:
    rows: dict[str, dict[str, float]] = {}
    for outcome in outcomes:
        for kind, row in outcome.stats["rows"].items():
            into = rows.setdefault(kind, {"faults": 0, "seconds": 0.0, "operations": 0, "errors": 0.0, "leaderless_s": 0.0, "max_latency_s": 0.0})
            into["faults"] += row["faults"]
            into["seconds"] += row["seconds"]
            into["operations"] += row["operations"]
            into["errors"] += row["error_rate"] * row["operations"]
            into["leaderless_s"] += row["leaderless_s"]
            into["max_latency_s"] = max(into["max_latency_s"], row["max_latency_s"])
    header = f"{'fault':<20} {'count':>5} {'time s':>7} {'ops':>7} {'error rate':>10} {'ok ops/s':>8} {'no leader s':>11} {'max latency':>11}"
    lines = [header, "-" * len(header)]
    for kind in sorted(rows, key=lambda k: (k.startswith("("), k)):
        r = rows[kind]
        ok_rate = (r["operations"] - r["errors"]) / r["seconds"] if r["seconds"] else 0.0
        latency = "unknown" if r["max_latency_s"] == float("inf") else f"{r['max_latency_s'] * 1000:.0f} ms"
        error = r["errors"] / r["operations"] if r["operations"] else 0.0
        lines.append(
            f"{kind:<20} {int(r['faults']):>5} {r['seconds']:>7.1f} {int(r['operations']):>7} {error:>10.2%} {ok_rate:>8.0f} {r['leaderless_s']:>11.2f} {latency:>11}"
        )
    return "\n".join(lines)


def verdicts(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        tasks = "-" if o.tasks is None else ("ok" if o.tasks.ok and o.tasks_settled else "VIOLATED" if not o.tasks.ok else "NOT SETTLED")
        exits = f"{len(o.disk_exits)} exits, {len(o.bad_exits)} not 74" if o.disk_exits else "-"
        lines.append(
            f"{o.plan.label:<10} seed={o.seed:<4} operations={o.kv.operations:<6} linearizability: {o.kv.label:<16} "
            f"lost writes: {len(o.lost):<3} tasks: {tasks:<11} disk faults: {exits}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    root = Path(tempfile.mkdtemp(prefix="dtf-chaos-report-"))
    outcomes = trio.run(run_profile, args.profile, args.seed, root)
    print(f"\nprofile {args.profile}, seed {args.seed}: {len(outcomes)} runs, histories under {root}\n")
    print(table(outcomes))
    print()
    print(verdicts(outcomes))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
