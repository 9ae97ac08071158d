"""How dtfctl shows things to a person: rich tables, failures first."""

from __future__ import annotations

import datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})
FAILED = frozenset({"failed", "timed_out", "lost"})
STATE_STYLE = {"up": "green", "degraded": "yellow", "down": "red", "succeeded": "green", "failed": "red",
               "timed_out": "red", "lost": "red", "cancelled": "yellow", "running": "cyan", "leased": "cyan"}


def _when(epoch: float | None) -> str:
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S") if epoch else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.1f}s"


def _styled(value: str) -> Text:
    return Text(value, style=STATE_STYLE.get(value, ""))


def _table(*columns: str, title: str = "", right: tuple[str, ...] = ()) -> Table:
    """The one table style dtfctl prints; `right` columns hold numbers."""
    table = Table(title=title or None, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def status(view: dict) -> Group:
    verdict = Text(view["verdict"], style={"healthy": "bold green", "degraded": "bold yellow"}.get(view["verdict"], "bold red"))
    tasks = ", ".join(f"{n} {s}" for s, n in sorted(view["tasks"].items())) or "none"
    workers = ", ".join(f"{n} {s}" for s, n in sorted(view["workers"].items())) or "none"
    header = Text.assemble("Cluster: ", verdict, f"   leader {view['leader'] or '-'} (term {view['term'] or '-'})   quorum {view['quorum']}",
                           f"\nTasks: {tasks}   Workers: {workers}")
    table = _table("Member", "Address", "Role", "State", "Term", "Commit", "Applied", "Lag", "Checksum", "Uptime",
                   right=("Term", "Commit", "Applied", "Lag"))
    for node in view["nodes"]:
        checksum = {True: "match", False: "DIVERGED", None: "-"}[node["checksum_ok"]]
        table.add_row(
            node["name"], node["url"].split("://", 1)[-1], node["role"] or "-", _styled(node["state"]),
            str(node["term"] if node["term"] is not None else "-"), str(node["commit_index"] if node["commit_index"] is not None else "-"),
            str(node["applied_index"] if node["applied_index"] is not None else "-"), str(node["lag"] if node["lag"] is not None else "-"),
            Text(checksum, style="red" if checksum == "DIVERGED" else ""), _duration(node["uptime_s"]),
        )
    parts: list = [header, table]
    parts += [Text(f"! {problem}", style="yellow") for problem in view["problems"]]
    return Group(*parts)


def tasks(items: list[dict]) -> Table:
    table = _table("ID", "Name", "Run", "State", "Attempt", "Worker", "Exit", "Duration", "Updated")
    for t in items:
        table.add_row(t["id"], t["name"] or "-", t["run_id"] or "-", _styled(t["state"]), str(t["attempt"]), t["worker"] or "-",
                      str(t.get("exit_code", "-")), _duration(t.get("duration_s")), _when(t["updated_at"]))
    return table


def task(t: dict) -> Group:
    spec = t["spec"]
    head = Text(f"{t['id']}  {t['name'] or ''}  run {t['run_id'] or '-'}  state ", style="bold")
    head.append_text(_styled(t["state"]))
    lines: list = [head, Text(f"argv: {' '.join(spec['argv'])}   timeout {spec['timeout_s']}s   retries {spec['max_retries']}")]
    history = _table("Attempt", "Worker", "From", "To", "Reason", "At", title="History")
    for h in t["history"]:
        history.add_row(str(h["attempt"]), h["worker"] or "-", h["from_state"] or "-", _styled(h["to_state"]), h["reason"], _when(h["at"]))
    lines.append(history)
    result = t.get("result")
    if result:
        lines.append(Text(f"exit {result.get('exit_code')}  {_duration(result.get('duration_s'))}  peak RSS {result.get('peak_rss_bytes', 0) // 1024} KiB"
                          f"  CPU {result.get('cpu_s', 0):.2f}s{'  (output truncated)' if result.get('truncated') else ''}"))
        if result.get("output_tail"):
            lines.append(Text("output (tail):\n" + result["output_tail"][-2000:], style="dim"))
    return Group(*lines)


def runs(items: list[dict]) -> Table:
    table = _table("Run", "Tasks", "Passed", "Failed", "Other", "Done", "Submitted")
    for r in items:
        passed = r["states"].get("succeeded", 0)
        failed = sum(n for s, n in r["states"].items() if s in FAILED)
        table.add_row(r["run_id"], str(r["total"]), str(passed), Text(str(failed), style="red" if failed else ""),
                      str(r["total"] - passed - failed), "yes" if r["done"] else "no", _when(r["submitted_at"]))
    return table


def run(summary: dict) -> Group:
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    passed = summary["states"].get("succeeded", 0)
    style = "bold green" if passed == summary["total"] else "bold red"
    parts: list = [Text(f"Run {summary['run_id']}: {passed}/{summary['total']} passed ({states})", style=style)]
    if summary["failures"]:
        failures = _table("Task", "Name", "State", "Reason", title="Failures")
        for f in summary["failures"]:
            failures.add_row(f["id"], f["name"] or "-", _styled(f["state"]), f["reason"])
        parts.append(failures)
    junit = summary["junit"]
    if junit["cases"]:
        parts.append(Text(f"JUnit: {junit['cases']} test cases, {junit['failed']} failed"))
        slow = _table("Test", "Class", "Duration", "Task", title="Slowest tests")
        for case in junit["slowest"]:
            slow.add_row(case["name"], case["classname"], _duration(case["duration_s"]), case["task"])
        parts.append(slow)
    return Group(*parts)


def workers(items: list[dict]) -> Table:
    table = _table("Worker", "State", "Slots", "CPUs", "Memory", "Labels", "Breaker")
    for w in items:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) or "-"
        breaker = w["breaker"]["state"] + (f" ({w['breaker']['failures']} failures)" if w["breaker"]["failures"] else "")
        table.add_row(w["id"], _styled(w["state"]), str(w["slots"]), f"{w['cpus']:g}", f"{w['memory_mb']} MiB", labels,
                      Text(breaker, style="" if w["breaker"]["state"] == "closed" else "yellow"))
    return table


def history(data: dict) -> Group:
    table = _table("At", "Term", "Leader", title="Leader changes")
    for change in data["leaders"]:
        table.add_row(_when(change["at"]), str(change["term"]), change["node"])
    recoveries = _table("At", "Node", "Failure", "Action", "Result", "Took", "Reason", title="Recovery actions (recoveryd)")
    for event in data.get("recoveries", []):
        result = Text(event["result"], style="green" if event["result"] in ("ok", "reported") else "red")
        recoveries.add_row(_when(event["started"]), event["node"], event["failure"], event["action"], result,
                           _duration(event["finished"] - event["started"]), event["reason"])
    return Group(table, recoveries)
