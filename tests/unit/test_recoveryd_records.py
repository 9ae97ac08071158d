"""Records: DuckDB row, JSON line and metric per action, once per id; the replicated RecordRecovery; dtfctl's view."""

from __future__ import annotations

import json
import time

from rich.console import Console

from dtfd.ctl import render
from dtfd.state.health import RecordRecovery
from dtfd.state.machine import Envelope, StateMachine, encode_envelope
from recoveryd.policy import PROCESS_ACTIONS
from recoveryd.records import Metrics, Record, Records


def record(action: str = "restart", result: str = "ok", started: float | None = None, id: str = "a1") -> Record:
    started = time.time() if started is None else started
    return Record(id=id, node="node2", failure="crash", action=action, reason="process gone", evidence=[{"at": started}],
                  result=result, detail="done", started=started, finished=started + 1.5)


def test_a_record_is_written_to_duckdb_json_and_metrics_once(tmp_path):
    metrics = Metrics()
    records = Records(str(tmp_path), tmp_path / "recovery.jsonl", metrics)
    records.write(record())
    records.write(record())  # the same action again (resumed after a restart): not recorded twice
    (row,) = records.history()
    assert (row["node"], row["failure"], row["action"], row["result"], row["duration_s"]) == ("node2", "crash", "restart", "ok", 1.5)
    assert row["evidence"]["id"] == "a1" and row["evidence"]["observations"] == [{"at": row["evidence"]["observations"][0]["at"]}]
    (line,) = (tmp_path / "recovery.jsonl").read_text().splitlines()
    assert json.loads(line)["result"] == "ok" and json.loads(line)["duration_s"] == 1.5
    assert b'dtf_recovery_actions_total{action="restart",failure="crash",result="ok"} 1.0' in metrics.render()
    records.close()


def test_restarts_in_the_window_survive_a_restart_of_recoveryd(tmp_path):
    records = Records(str(tmp_path), tmp_path / "recovery.jsonl", Metrics())
    now = time.time()
    records.write(record(started=now - 1000, id="old"))
    records.write(record(started=now - 10, id="new"))
    records.write(record(action="report", started=now - 5, id="report"))
    records.write(record(result="gave_up", started=now - 2, id="gave-up"))
    found = records.restarts_since(now - 600, PROCESS_ACTIONS)
    assert list(found) == ["node2"] and len(found["node2"]) == 1 and abs(found["node2"][0] - (now - 10)) < 1e-3
    records.close()


def test_recovery_events_are_replicated_state_and_shown_by_dtfctl():
    machine = StateMachine()
    event = RecordRecovery(node="node2", failure="corruption", action="reseed", result="ok", reason="exited 65", started=10.0, finished=14.0)
    result = machine.apply(1, encode_envelope(Envelope("recoveryd-x", 1, 20.0, event)))
    assert result.ok and result.value == {"node": "node2", "action": "reseed", "result": "ok"}
    (stored,) = machine.image.health.recoveries
    assert stored.at == 20.0 and stored.reason == "exited 65"
    other = StateMachine()
    other.apply(1, encode_envelope(Envelope("recoveryd-x", 1, 20.0, event)))
    assert other.checksum() == machine.checksum()
    console = Console(width=160, record=True)
    console.print(render.history({"leaders": [], "recoveries": [
        {"node": "node2", "failure": "corruption", "action": "reseed", "result": "ok", "reason": "exited 65", "started": 10.0, "finished": 14.0}]}))
    text = console.export_text()
    assert "reseed" in text and "corruption" in text and "4.0s" in text
