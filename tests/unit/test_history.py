"""The DuckDB history schema: created idempotently, usable by the issues that fill it."""

from __future__ import annotations

import datetime as dt

import duckdb
import pytest

from dtfd.storage.history import FILENAME, SCHEMA_VERSION, open_history

TABLES = {
    "task_history": ["task_id", "attempt", "worker", "from_state", "to_state", "reason", "at", "raft_index"],
    "task_results": [
        "task_id", "attempt", "lease_id", "exit_code", "duration_s", "peak_rss", "cpu_s", "output_tail",
        "recorded_at", "raft_index",
    ],
    "junit_cases": ["task_id", "attempt", "name", "classname", "status", "duration_s", "message"],
    "node_recovery_history": ["node", "failure", "evidence", "action", "result", "started", "finished", "duration_s"],
}


def columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position", [table]
    ).fetchall()
    return [r[0] for r in rows]


def test_schema_is_created_once_and_reopens_idempotently(tmp_path):
    open_history(str(tmp_path)).close()
    conn = open_history(str(tmp_path))
    assert (tmp_path / FILENAME).exists()
    for table, cols in TABLES.items():
        assert columns(conn, table) == cols
    assert conn.execute("SELECT * FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_rows_round_trip_and_replays_are_idempotent(tmp_path):
    conn = open_history(str(tmp_path))
    at = dt.datetime(2025, 1, 2, 3, 4, 5)  # UTC
    row = ["t1", 1, "w1", "queued", "leased", "scheduled", at, 42]
    insert = "INSERT INTO task_history VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
    conn.execute(insert, row)
    conn.execute(insert, row)  # rebuilding from the log replays the same entry
    assert conn.execute('SELECT task_id, "at", raft_index FROM task_history').fetchall() == [("t1", at, 42)]
    conn.execute(
        "INSERT INTO node_recovery_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ["n1", "process crash", '{"pid": null, "health": "refused"}', "restart", "ok", at, at, 1.5],
    )
    assert conn.execute("SELECT evidence->>'health' FROM node_recovery_history").fetchall() == [("refused",)]
    conn.close()


def test_a_result_is_recorded_once_per_attempt(tmp_path):
    conn = open_history(str(tmp_path))
    row = ["t1", 1, "lease-1", 0, 1.0, 1024, 0.5, "ok", dt.datetime(2025, 1, 2), 7]
    conn.execute("INSERT INTO task_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    with pytest.raises(duckdb.ConstraintException):
        conn.execute("INSERT INTO task_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    conn.close()


def test_read_only_open_sees_the_data(tmp_path):
    open_history(str(tmp_path)).close()
    conn = open_history(str(tmp_path), read_only=True)
    assert conn.execute("SELECT count(*) FROM junit_cases").fetchone() == (0,)
    conn.close()


def test_one_entry_may_move_a_task_twice_and_a_version_1_file_is_migrated_with_its_rows(tmp_path):
    at = dt.datetime(2025, 1, 2)
    old = duckdb.connect(str(tmp_path / FILENAME))
    old.execute(
        "CREATE TABLE task_history (task_id VARCHAR NOT NULL, attempt INTEGER NOT NULL, worker VARCHAR, from_state VARCHAR,"
        ' to_state VARCHAR NOT NULL, reason VARCHAR, "at" TIMESTAMP NOT NULL, raft_index BIGINT NOT NULL, PRIMARY KEY (raft_index, task_id))'
    )
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (1)")
    old.execute("INSERT INTO task_history VALUES ('t1', 1, 'w1', 'queued', 'leased', 'scheduled', ?, 5)", [at])
    old.close()
    conn = open_history(str(tmp_path))
    insert = "INSERT OR IGNORE INTO task_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    conn.execute(insert, ["t1", 1, "w1", "leased", "running", "started", at, 9])
    conn.execute(insert, ["t1", 1, "w1", "running", "succeeded", "exit 0", at, 9])  # the same entry
    states = conn.execute("SELECT to_state FROM task_history ORDER BY raft_index, to_state").fetchall()
    assert states == [("leased",), ("running",), ("succeeded",)]
    assert conn.execute("SELECT * FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_the_recorders_batch_insert_keeps_every_value_and_ignores_a_replay(tmp_path):
    """Rows go to DuckDB as one JSON document: quotes, newlines, non-ASCII text, NULLs,
    microsecond timestamps and big integers must come out as they went in."""
    from dtfd.server.recorder import _insert

    at = dt.datetime(2026, 11, 23, 19, 30, 5, 123456)
    history = [("t1", 1, None, "", "queued", 'it\'s "quoted"\nand\ttabbed', at, 2**40), ("t2", 2, "w\u00e9", "leased", "running", "", at, 7)]
    results = [("t1", 1, "L1", -9, 0.25, 2**33, 1.5, "tail \u2603\n" * 3, at, 8)]
    junit = [("t1", 1, "test_a", "pkg.Mod", "failed", None, "AssertionError: 1 != 2")]
    conn = open_history(str(tmp_path))
    for _ in range(2):  # a replay after a restart
        _insert(conn, "task_history", history, or_ignore=True)
        _insert(conn, "task_results", results, or_ignore=True)
    _insert(conn, "junit_cases", junit)
    _insert(conn, "junit_cases", [])
    assert conn.execute("SELECT * FROM task_history ORDER BY raft_index").fetchall() == sorted(history, key=lambda row: row[-1])
    assert conn.execute("SELECT * FROM task_results").fetchall() == results
    assert conn.execute("SELECT * FROM junit_cases").fetchall() == junit
    conn.close()
