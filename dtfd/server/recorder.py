"""Copies task transitions, results and JUnit cases into the node's DuckDB history.

Derived data: rows are taken from the state right after each command is applied and
written in batches off the event loop; INSERT OR IGNORE keyed by the Raft index makes a
replay after restart harmless. Nothing reads these tables to make a decision.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import duckdb
import msgspec
import trio

from dtfd.journal import fields
from dtfd.state import tasks as t
from dtfd.state.machine import Result
from dtfd.storage.history import open_history

log = logging.getLogger("dtf.history")


def _when(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).replace(tzinfo=None)


def _touched(command: object, result: Result) -> list[str]:
    """Ids of the tasks a command changed, from the command and its result."""
    if isinstance(command, t.SubmitTasks | t.AssignTasks) and isinstance(result.value, list):
        return [item.get("id") or item.get("task_id") for item in result.value if not item.get("duplicate")]
    if isinstance(command, t.ReportTasks):
        return list(dict.fromkeys([ref.task_id for ref in command.started] + [report.task_id for report in command.finished]))
    if isinstance(command, t.CancelTask | t.ExpireLease):
        return [command.task_id]
    if isinstance(command, t.RemoveWorker) and isinstance(result.value, dict):
        return list(result.value.get("requeued", []))
    return []


class Recorder:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._recorded: dict[str, int] = {}  # task id -> history rows already queued
        self._results: set[tuple[str, str]] = set()
        self._history: list[tuple] = []
        self._result_rows: list[tuple] = []
        self._junit: list[tuple] = []
        self._connection: duckdb.DuckDBPyConnection | None = None

    def observe(self, index: int, command: object, result: Result, workload: t.Workload) -> None:
        for task_id in _touched(command, result):
            task = workload.tasks.get(task_id)
            if task is None:
                continue
            # A task first seen since this process started: earlier rows were recorded before.
            start = self._recorded.get(task_id, len(task.history) - 1)
            for transition in task.history[start:]:
                self._history.append(
                    (task_id, transition.attempt, transition.worker, transition.from_state, transition.to_state,
                     transition.reason, _when(transition.at), index)
                )
            self._recorded[task_id] = len(task.history)
            if isinstance(command, t.ReportTasks):
                self._observe_results(index, command, task)

    def _observe_results(self, index: int, command: t.ReportTasks, task: t.Task) -> None:
        for report in command.finished:
            key = (report.task_id, report.lease_id)
            if report.task_id != task.id or key in self._results or report.lease_id not in task.reported:
                continue
            self._results.add(key)
            attempt = next((h.attempt for h in reversed(task.history) if h.from_state in t.ACTIVE), task.attempt)
            o = report.outcome
            self._result_rows.append(
                (task.id, attempt, report.lease_id, o.exit_code, o.duration_s, o.peak_rss_bytes, o.cpu_s, o.output_tail,
                 _when(task.updated_at), index)
            )
            self._junit.extend((task.id, attempt, c.name, c.classname, c.status, c.duration_s, c.message) for c in o.junit)

    async def run(self, interval_s: float = 0.5) -> None:
        try:
            while True:
                await trio.sleep(interval_s)
                await self._flush()
        finally:
            with trio.CancelScope(shield=True):  # a graceful stop keeps what was applied
                await self._flush()
            if self._connection is not None:
                self._connection.close()

    async def _flush(self) -> None:
        if self._history or self._result_rows or self._junit:
            batch = (self._history, self._result_rows, self._junit)
            self._history, self._result_rows, self._junit = [], [], []
            await trio.to_thread.run_sync(self._write, *batch)

    def _write(self, history: list[tuple], results: list[tuple], junit: list[tuple]) -> None:
        try:
            if self._connection is None:
                self._connection = open_history(str(self.data_dir))
            conn = self._connection
            conn.execute("BEGIN")
            _insert(conn, "task_history", history, or_ignore=True)
            _insert(conn, "task_results", results, or_ignore=True)
            if junit:
                attempts = sorted({(row[0], row[1]) for row in junit})
                for task_id, attempt in attempts:  # replay-safe: a result's cases replace its earlier copy
                    conn.execute("DELETE FROM junit_cases WHERE task_id = ? AND attempt = ?", [task_id, attempt])
                _insert(conn, "junit_cases", junit)
            conn.execute("COMMIT")
        except duckdb.Error as exc:
            log.error("history write failed; rows dropped (derived data) %s", fields(error=exc, rows=len(history) + len(results)))
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _insert(conn: duckdb.DuckDBPyConnection, table: str, rows: list[tuple], *, or_ignore: bool = False) -> None:
    """All rows in one JSON parameter that DuckDB unpacks itself.

    Binding Python values costs DuckDB ~0.1 ms of CPU a row (one placeholder each;
    executemany is slower still): at four rows a task on every node, a quarter of the
    cluster's CPU per no-op task. from_json takes ~0.013 ms a row in batches of 2,000."""
    if not rows:
        return
    layout = _layouts.get(table)
    if layout is None:
        described = conn.execute(f"DESCRIBE {table}").fetchall()
        layout = _layouts[table] = ([name for name, *_ in described], json.dumps([{name: kind for name, kind, *_ in described}]))
    names, shape = layout
    document = msgspec.json.encode([dict(zip(names, row)) for row in rows]).decode()
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    conn.execute(f"{verb} INTO {table} SELECT unnest(from_json($rows::JSON, $shape), recursive := true)", {"rows": document, "shape": shape})


_layouts: dict[str, tuple[list[str], str]] = {}  # table -> its column names and from_json's shape of its rows
