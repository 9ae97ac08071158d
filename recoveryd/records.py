"""Every detection and action, written down four ways: DuckDB, a JSON line, journald, Prometheus.

The DuckDB file (STATE_DIR/history.duckdb, dtfd's schema, table node_recovery_history)
is what `recoveryd`'s /v1/history serves; the JSON lines file is for log shippers and
grep; the cluster's replicated history (POST /v1/recovery) is what `dtfctl history` shows.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from dtfd.journal import fields
from dtfd.storage.history import open_history

log = logging.getLogger("dtf.recoveryd")


class Record(msgspec.Struct, kw_only=True):
    id: str  # unique per action; also the client id of its report to the cluster
    node: str
    failure: str
    action: str
    reason: str
    evidence: list = []  # the node's observations that confirmed the failure
    views: dict = {}  # every node's view, for failures seen by comparing them (split brain, divergence, lag)
    result: str = ""  # ok | failed | gave_up | refused | reported
    detail: str = ""
    started: float = 0.0  # wall clock, seconds
    finished: float = 0.0

    @property
    def duration_s(self) -> float:
        return round(max(0.0, self.finished - self.started), 3)


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).replace(tzinfo=None)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.actions = Counter("dtf_recovery_actions", "Recovery actions by failure, action and result.",
                               ["failure", "action", "result"], registry=self.registry)
        self.detections = Counter("dtf_recovery_detections", "Failures confirmed by consecutive probes.", ["failure"], registry=self.registry)
        self.failed = Gauge("dtf_recovery_node_failed", "1 while recoveryd has given up on the node.", ["node"], registry=self.registry)
        self.in_flight = Gauge("dtf_recovery_actions_in_flight", "Actions running now.", registry=self.registry)
        self.cycles = Counter("dtf_recovery_probe_cycles", "Probe cycles completed.", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Records:
    def __init__(self, state_dir: str, recovery_log: Path, metrics: Metrics) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.db = open_history(state_dir)
        self.recovery_log = recovery_log
        self.metrics = metrics

    def close(self) -> None:
        self.db.close()

    def write(self, record: Record) -> None:
        """One finished action (or report, refusal, give-up): DuckDB row, JSON line, metric, log line.

        Once per action id: an action resumed after recoveryd died between writing its record
        and dropping its journal is not recorded twice.
        """
        if self.db.execute("SELECT count(*) FROM node_recovery_history WHERE json_extract_string(evidence, '$.id') = ?",
                           [record.id]).fetchone()[0]:
            return
        self.db.execute(
            "INSERT INTO node_recovery_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [record.node, record.failure, json.dumps({"id": record.id, "reason": record.reason, "detail": record.detail,
                                                      "observations": msgspec.to_builtins(record.evidence),
                                                      "views": record.views}),
             record.action, record.result, _utc(record.started), _utc(record.finished), record.duration_s],
        )
        line = {**msgspec.to_builtins(record), "duration_s": record.duration_s}
        with open(self.recovery_log, "a") as out:
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.metrics.actions.labels(record.failure, record.action, record.result).inc()
        level = logging.INFO if record.result in ("ok", "reported") else logging.ERROR
        log.log(level, "recovery %s %s", record.result, fields(
            node=record.node, failure=record.failure, action=record.action, reason=record.reason,
            detail=record.detail, duration_s=record.duration_s, id=record.id,
        ))

    def restarts_since(self, since: float, actions: frozenset[str]) -> dict[str, list[float]]:
        """Process restarts per node since `since`, so limits survive a restart of recoveryd."""
        rows = self.db.execute(
            f"SELECT node, epoch(started) FROM node_recovery_history WHERE started >= ? AND action IN ({', '.join('?' * len(actions))}) "
            "AND result NOT IN ('refused', 'gave_up') ORDER BY started", [_utc(since), *sorted(actions)],
        ).fetchall()
        found: dict[str, list[float]] = {}
        for node, started in rows:
            found.setdefault(node, []).append(float(started))
        return found

    def history(self, node: str = "", limit: int = 100) -> list[dict]:
        where, params = ("WHERE node = ?", [node]) if node else ("", [])
        rows = self.db.execute(
            f"SELECT node, failure, action, result, started, finished, duration_s, evidence FROM node_recovery_history {where} "
            "ORDER BY started DESC LIMIT ?", [*params, limit],
        ).fetchall()
        keys = ("node", "failure", "action", "result", "started", "finished", "duration_s", "evidence")
        out = []
        for row in rows:
            item = dict(zip(keys, row))
            item["started"] = item["started"].isoformat() + "Z"
            item["finished"] = item["finished"].isoformat() + "Z" if item["finished"] else None
            item["evidence"] = json.loads(item["evidence"]) if item["evidence"] else None
            out.append(item)
        return out
