"""Queryable history in DuckDB (`history.duckdb` in the data dir).

Derived data, never the source of truth: every row comes from a committed log entry
(or snapshot) and can be rebuilt from them, which is why rows carry the raft_index
they came from and why losing or deleting this file loses nothing. Nothing reads it
to decide anything; it is for operators, dtfctl and reports.

Times are TIMESTAMP in UTC (naive): TIMESTAMPTZ would need pytz to read back in Python.
"""

from __future__ import annotations

import os

import duckdb

FILENAME = "history.duckdb"
SCHEMA_VERSION = 2  # 2: one entry may move a task twice (started, then finished)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS task_history (
        task_id VARCHAR NOT NULL,
        attempt INTEGER NOT NULL,
        worker VARCHAR,
        from_state VARCHAR,
        to_state VARCHAR NOT NULL,
        reason VARCHAR,
        "at" TIMESTAMP NOT NULL,  -- AT is a keyword in DuckDB: quote it in queries
        raft_index BIGINT NOT NULL,
        PRIMARY KEY (raft_index, task_id, to_state)
    )""",
    """CREATE TABLE IF NOT EXISTS task_results (
        task_id VARCHAR NOT NULL,
        attempt INTEGER NOT NULL,
        lease_id VARCHAR NOT NULL,
        exit_code INTEGER,
        duration_s DOUBLE,
        peak_rss BIGINT,
        cpu_s DOUBLE,
        output_tail VARCHAR,
        recorded_at TIMESTAMP NOT NULL,
        raft_index BIGINT NOT NULL,
        PRIMARY KEY (task_id, attempt)
    )""",
    """CREATE TABLE IF NOT EXISTS junit_cases (
        task_id VARCHAR NOT NULL,
        attempt INTEGER NOT NULL,
        name VARCHAR NOT NULL,
        classname VARCHAR,
        status VARCHAR NOT NULL,
        duration_s DOUBLE,
        message VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS node_recovery_history (
        node VARCHAR NOT NULL,
        failure VARCHAR NOT NULL,
        evidence JSON,
        action VARCHAR NOT NULL,
        result VARCHAR,
        started TIMESTAMP NOT NULL,
        finished TIMESTAMP,
        duration_s DOUBLE
    )""",
    "CREATE INDEX IF NOT EXISTS task_history_task ON task_history (task_id)",
    "CREATE INDEX IF NOT EXISTS junit_cases_task ON junit_cases (task_id, attempt)",
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
)


def open_history(data_dir: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the history database with its schema in place."""
    path = os.path.join(data_dir, FILENAME)
    if read_only:
        return duckdb.connect(path, read_only=True)
    conn = duckdb.connect(path)
    try:
        conn.execute("BEGIN")
        conn.execute(SCHEMA[-1])
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version").fetchall()]
        migrating = bool(versions) and max(versions) < 2
        if migrating:  # version 1 keyed task_history by (raft_index, task_id); DuckDB cannot change a key in place
            conn.execute("DROP INDEX IF EXISTS task_history_task")
            conn.execute("ALTER TABLE task_history RENAME TO task_history_v1")
        for statement in SCHEMA:
            conn.execute(statement)
        if migrating:
            conn.execute("INSERT INTO task_history SELECT * FROM task_history_v1")
            conn.execute("DROP TABLE task_history_v1")
        if max(versions, default=0) < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn

