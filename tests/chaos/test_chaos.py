"""The chaos suite's CI profile on real processes, the planted bugs it must catch, and the
task checker on hand-made records.

Each CI schedule runs a 3-node cluster, 8 key/value clients and real dtf-workers under ~20 s
of faults (about 30 s a schedule; DTF_CHAOS_SEED picks other schedules); each planted bug's
run takes about 20 s. A failing run's history and logs are copied to $DTF_CHAOS_ARTIFACTS
(default /tmp/dtf-chaos-artifacts), named in the failure; `python -m tests.chaos --check
HISTORY` re-checks it and the seed replays it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.chaos.history import kv_op
from tests.chaos.linearizability import check
from tests.chaos.run import BUGS, PROFILES, Outcome, Plan, run, summary
from tests.chaos.tasks_checker import check_tasks

SEED = int(os.environ.get("DTF_CHAOS_SEED", "1"))
# pytest keeps only its last few tmp dirs: a failed run's history and logs are copied here.
ARTIFACTS = Path(os.environ.get("DTF_CHAOS_ARTIFACTS") or Path(tempfile.gettempdir()) / "dtf-chaos-artifacts")


def keep(outcome: Outcome) -> str:
    """Copy a failed run's history and logs where CI collects them; the summary, naming the copy."""
    target = ARTIFACTS / f"{outcome.plan.label}-seed{outcome.seed}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in [outcome.history, *outcome.directory.glob("*.log")]:
        shutil.copy2(path, target / path.name)
    return f"{summary(outcome)}\n  kept: {target / outcome.history.name}"


@pytest.mark.integration
@pytest.mark.parametrize("number,plan", list(enumerate(PROFILES["ci"])), ids=[p.label for p in PROFILES["ci"]])
async def test_ci_schedule_keeps_every_acknowledged_operation(number: int, plan: Plan, tmp_path: Path):
    outcome = await run(plan, SEED + number, tmp_path)
    report = summary(outcome) if outcome.passed else keep(outcome)
    print(report)
    assert outcome.kv.linearizable is True, report
    finals = [r for r in outcome.records if r["type"] == "kv" and r["client"] == "final"]
    assert len(finals) == plan.keys and all(r["outcome"] == "ok" for r in finals), f"the healed cluster did not serve reads\n{report}"
    assert outcome.stats["faults"] >= 3 and outcome.stats["operations"] >= 500, report
    assert outcome.tasks is not None and outcome.tasks.ok, report
    assert outcome.tasks.tasks > 0, report
    assert outcome.tasks_settled, f"tasks never ended\n{report}"
    assert not outcome.bad_exits, f"a node with a broken disk did not exit 74\n{report}"
    if {"fsync_error", "disk_full"} & set(plan.faults):
        assert outcome.disk_exits, f"no node ever met its broken disk\n{report}"


@pytest.mark.integration
async def test_reads_without_read_index_are_caught(tmp_path: Path):
    """Half the clients read ?stale=ok from fixed nodes (local reads, no ReadIndex) under partitions."""
    outcome = await run(BUGS["stale-reads"], SEED, tmp_path, bug="stale-reads")
    # The same history without the stale reads is linearizable: what was caught is theirs alone.
    honest = check([kv_op(r) for r in outcome.records if r["type"] == "kv" and not r.get("stale")], budget_s=120.0)
    caught = outcome.kv.linearizable is False and honest.linearizable is True
    report = summary(outcome) if caught else keep(outcome)
    print(report)
    assert outcome.kv.linearizable is False, report
    assert honest.linearizable is True, f"without the stale reads: {honest.label}\n" + "\n".join(f.explain() for f in honest.failures) + f"\n{report}"


@pytest.mark.integration
async def test_acknowledging_writes_before_fsync_is_caught(tmp_path: Path):
    """Every node acknowledges writes 300 ms before they reach its disk; killing all nodes at
    once loses acknowledged writes, which later reads must expose."""
    outcome = await run(BUGS["ack-before-fsync"], SEED, tmp_path, bug="ack-before-fsync")
    caught = outcome.kv.linearizable is False and bool(outcome.lost)
    report = summary(outcome) if caught else keep(outcome)
    print(report)
    assert outcome.kv.linearizable is False, report
    assert outcome.lost, f"no read named a lost acknowledged write\n{report}"


def test_a_seed_names_one_schedule_of_every_kind_without_overlaps():
    for plan in [*PROFILES["ci"], *BUGS.values()]:
        faults = plan.schedule(SEED)
        assert faults == plan.schedule(SEED) != plan.schedule(SEED + 1)
        assert {f.kind for f in faults} == set(plan.faults)
        assert all(a.at + a.duration < b.at for a, b in zip(faults, faults[1:]))


# ---- the task checker on hand-made records ------------------------------------------------


def task(state: str, attempt: int, max_retries: int, transitions: list[tuple[str, str]], tail: str | None) -> dict:
    history = [{"attempt": attempt, "worker": "w0", "from_state": a, "to_state": b, "reason": "", "at": 0.0} for a, b in transitions]
    result = None if tail is None else {"status": {"succeeded": "succeeded", "failed": "failed"}.get(state, state), "output_tail": tail}
    return {"id": "T1", "name": "t:1:0", "state": state, "attempt": attempt, "spec": {"max_retries": max_retries}, "history": history, "result": result}


SUBMIT = {"type": "task_submit", "client": "t0", "seq": 1, "outcome": "ok", "ids": ["T1"]}
CLEAN = [("", "queued"), ("queued", "leased"), ("leased", "running"), ("running", "queued"), ("queued", "leased"), ("leased", "running"), ("running", "succeeded")]


def verdict(*tasks: dict, runs: dict | None = None, submits: tuple[dict, ...] = (SUBMIT,)):
    return check_tasks([*submits, *({"type": "task_final", "task": t} for t in tasks)], runs if runs is not None else {})


def test_task_checker_accepts_a_retried_task_with_its_last_result():
    runs = {"T1": {("L1", 1), ("L2", 2)}}
    assert verdict(task("succeeded", 2, 1, CLEAN, "lease=L2 attempt=2\n"), runs=runs).ok


def test_task_checker_catches_a_lost_acknowledged_task():
    assert "not in the run" in verdict().violations[0]


def test_task_checker_catches_a_result_from_a_stale_lease():
    v = verdict(task("succeeded", 2, 1, CLEAN, "lease=L1 attempt=1\n"), runs={"T1": {("L1", 1), ("L2", 2)}})
    assert not v.ok and "stale lease L1" in v.violations[0]


def test_task_checker_catches_too_many_attempts():
    v = verdict(task("succeeded", 2, 0, CLEAN, "lease=L2 attempt=2\n"), runs={"T1": {("L1", 1), ("L2", 2)}})
    assert not v.ok and any("max_retries + 1" in x for x in v.violations)


def test_task_checker_catches_two_terminal_states_and_unended_tasks():
    twice = [*CLEAN, ("succeeded", "failed")]
    v = verdict(task("failed", 2, 1, twice, "lease=L2 attempt=2\n"))
    assert any("terminal transitions" in x for x in v.violations) and any("left a terminal state" in x for x in v.violations)
    unended = verdict(task("running", 1, 0, CLEAN[:3], None))
    assert unended.ok and "never ended" in unended.unfinished[0]


def test_task_checker_catches_a_missing_result_and_duplicate_tasks():
    assert "without a result" in verdict(task("succeeded", 1, 0, CLEAN, None)).violations[0]
    copy = {**task("succeeded", 2, 1, CLEAN, "lease=L2 attempt=2"), "id": "T2"}
    assert "2 tasks for one idempotency key" in verdict(task("succeeded", 2, 1, CLEAN, "lease=L2 attempt=2"), copy).violations[0]
