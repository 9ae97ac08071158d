"""The task checker: what must hold for every task once a chaos run has settled.

- every acknowledged submit's tasks exist, and every task of the run that ended did so in
  exactly one terminal state (one transition into it, the last one, nothing after it);
  tasks that never ended are listed apart, as a liveness failure;
- a task that ended on a worker's report (succeeded, failed) holds exactly one result, and
  it is the result of the final lease: the attempt the task's output names is the task's
  last attempt, so no result from a stale lease was recorded;
- attempts never exceed max_retries + 1, whether counted by the coordinator or by what the
  workers really ran (each task appends `task lease attempt` to a run log when it starts);
- a task name (its idempotency key) appears once, however often its submit was retried.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtfd.state.tasks import FAILED, SUCCEEDED, TERMINAL

OUTPUT = re.compile(r"lease=(\S+) attempt=(\d+)")


@dataclass
class TaskVerdict:
    """`ok` is safety (nothing wrong happened); `unfinished` is liveness (tasks that never ended)."""

    ok: bool = True
    tasks: int = 0
    states: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)

    def fail(self, task: dict[str, Any], why: str) -> None:
        self.ok = False
        self.violations.append(f"task {task.get('id')} ({task.get('name')}): {why}")


def runs_from(runlog: Path) -> dict[str, set[tuple[str, int]]]:
    """What the workers really started: task id -> {(lease id, attempt)}."""
    runs: dict[str, set[tuple[str, int]]] = {}
    if runlog.exists():
        for line in runlog.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                runs.setdefault(parts[0], set()).add((parts[1], int(parts[2])))
    return runs


def check_tasks(records: list[dict[str, Any]], runs: dict[str, set[tuple[str, int]]]) -> TaskVerdict:
    """Check the `task_submit` and `task_final` records of a history against the run log."""
    finals = {r["task"]["id"]: r["task"] for r in records if r["type"] == "task_final"}
    verdict = TaskVerdict(tasks=len(finals))
    for submit in records:
        if submit["type"] == "task_submit" and submit["outcome"] == "ok":
            for task_id in submit["ids"]:
                if task_id not in finals:
                    verdict.fail({"id": task_id}, f"acknowledged by submit {submit['client']}/{submit['seq']} but not in the run")
    for name, count in Counter(t["name"] for t in finals.values()).items():
        if count > 1:
            verdict.fail({"name": name}, f"{count} tasks for one idempotency key")
    for task in finals.values():
        verdict.states[task["state"]] += 1
        _check_one(task, runs.get(task["id"], set()), verdict)
    return verdict


def _check_one(task: dict[str, Any], ran: set[tuple[str, int]], verdict: TaskVerdict) -> None:
    allowed = task["spec"]["max_retries"] + 1
    history = task["history"]
    into_terminal = [n for n, h in enumerate(history) if h["to_state"] in TERMINAL]
    if task["state"] not in TERMINAL:
        verdict.unfinished.append(f"task {task['id']} ({task['name']}): never ended: still {task['state']}")
    elif into_terminal != [len(history) - 1]:
        verdict.fail(task, f"terminal transitions at {into_terminal} of {len(history)}")
    if any(h["from_state"] in TERMINAL for h in history):
        verdict.fail(task, "left a terminal state")
    if task["attempt"] > allowed:
        verdict.fail(task, f"attempt {task['attempt']} > max_retries + 1 = {allowed}")
    leases = {lease for lease, _ in ran}
    if len(leases) > allowed:
        verdict.fail(task, f"workers ran {len(leases)} leases > max_retries + 1 = {allowed}")
    result = task["result"]
    if task["state"] in (SUCCEEDED, FAILED):
        if result is None:
            verdict.fail(task, f"{task['state']} without a result")
            return
        named = OUTPUT.search(result["output_tail"])
        if named is None:
            verdict.fail(task, f"result does not name its lease: {result['output_tail'][-200:]!r}")
            return
        lease, attempt = named.group(1), int(named.group(2))
        if attempt != task["attempt"]:
            verdict.fail(task, f"result from attempt {attempt} recorded, but the last attempt is {task['attempt']} (stale lease {lease})")
        if ran and (lease, attempt) not in ran:
            verdict.fail(task, f"result names lease {lease} attempt {attempt}, which no worker started")
        expected = {"succeeded"} if task["state"] == SUCCEEDED else {"failed", "error"}
        if result["status"] not in expected:
            verdict.fail(task, f"state {task['state']} but result status {result['status']}")
