"""recoveryd against a real 3-node cluster under write load, with real faults, in local mode.

Each test: fault injected -> detected within 2 probe intervals (plus the probe's own cost)
-> repaired -> cluster healthy, every acknowledged write still there, the action in
recoveryd's DuckDB (its /v1/history), its JSON log and the cluster's replicated history.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from dtfd.devcluster import write_configs
from dtfd.storage.wal import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from recoveryd.local import TEST_TIMING, Watched, write_config
from tests.integration.support import until
from tests.integration.test_cluster import Writer

pytestmark = pytest.mark.integration

INTERVAL = TEST_TIMING["probes"]["interval_s"]
DETECTION_SLACK_S = 1.5  # a probe cycle's own cost (process spawn, HTTP) on a loaded 2-core machine


@contextmanager
def watching(tmp_path: Path, sections: dict | None = None, dtfd: dict | None = None, env: dict | None = None) -> Iterator[Watched]:
    """Nodes and a recoveryd watching them; `dtfd` holds write_configs' sections (raft, storage), `env` recoveryd's extra environment."""
    files = write_configs(tmp_path, **(dtfd or {}))
    watched = Watched(files, write_config(files, tmp_path, sections))
    try:
        watched.start_nodes()
        watched.start_recoveryd(env)
        yield watched
    finally:
        watched.stop_all()


@contextmanager
def under_load(tmp_path: Path, sections: dict | None = None, dtfd: dict | None = None,
               env: dict | None = None) -> Iterator[tuple[Watched, Writer, str, str]]:
    """A watched cluster with a client writing; afterwards (writes stopped) it must be healthy and complete."""
    with watching(tmp_path, sections, dtfd, env) as watched:
        with Writer(watched.cluster, "w") as writer:
            until(lambda: len(writer.acked) > 50, what="write load running")
            leader, follower = leader_and_follower(watched)
            yield watched, writer, leader, follower
        assert_healthy_and_complete(watched, writer)


def record_of(watched: Watched, what: str, timeout: float = 60, **match: str) -> dict:
    """The first record (JSON line) whose fields match."""
    return until(lambda: next((r for r in watched.records() if all(r[k] == v for k, v in match.items())), None),
                 timeout=timeout, what=what)


def leader_and_follower(watched: Watched) -> tuple[str, str]:
    leader = watched.cluster.wait_leader(among=watched.files.node_ids)
    return leader, next(n for n in watched.files.node_ids if n != leader)


def assert_detected_in_time(record: dict, fault_at: float, probes: int) -> None:
    first_bad = record["evidence"][-probes]["at"]
    assert first_bad - fault_at <= INTERVAL + DETECTION_SLACK_S, "the first probe after the fault did not see it"
    assert record["started"] - fault_at <= probes * INTERVAL + DETECTION_SLACK_S


def assert_healthy_and_complete(watched: Watched, writer: Writer) -> None:
    """One leader, every node voting and at the same applied index and checksum, every acknowledged write readable."""
    nodes = watched.files.node_ids
    leader = watched.cluster.wait_leader(among=nodes)

    def converged() -> bool:
        views = [watched.cluster.status(n) for n in nodes]
        return all(views) and not any(v["rejoining"] for v in views) and len({(v["applied_index"], v["checksum"]) for v in views}) == 1

    until(converged, timeout=30, what="every node at one applied index and checksum")
    assert writer.acked, "the write load made no progress"
    with watched.cluster.client(leader) as c:
        for key, value in writer.acked.items():
            assert c.get(f"/v1/kv/{key}", params={"stale": "ok"}).json().get("value") == value, key


def assert_recorded_everywhere(watched: Watched, record: dict) -> None:
    rows = [r for r in watched.history() if r["evidence"]["id"] == record["id"]]
    assert len(rows) == 1 and rows[0]["result"] == record["result"] and rows[0]["action"] == record["action"]
    leader = watched.cluster.wait_leader(among=watched.files.node_ids)

    def replicated() -> list:
        with watched.cluster.client(leader) as c:
            events = c.get("/v1/history").json()["recoveries"]
        return [e for e in events if e["node"] == record["node"] and e["action"] == record["action"] and e["result"] == record["result"]]

    until(replicated, timeout=10, what="the action in the cluster's replicated history")


def test_kill_9_of_the_leader_is_restarted(tmp_path):
    with under_load(tmp_path) as (watched, writer, leader, _):
        os.kill(watched.pid(leader), signal.SIGKILL)
        fault_at = time.time()
        record = record_of(watched, "restart recorded", node=leader, failure="crash")
        assert record["action"] == "restart" and record["result"] == "ok", record
        assert "last exit 137" in record["reason"]
        assert_detected_in_time(record, fault_at, probes=2)
        acked = len(writer.acked)
        until(lambda: len(writer.acked) > acked + 50, what="writes continue")
        assert_recorded_everywhere(watched, record)


def test_sigstop_hang_is_restarted_after_n_failed_probes(tmp_path):
    with under_load(tmp_path) as (watched, writer, _, follower):
        old_pid = watched.pid(follower)
        os.kill(old_pid, signal.SIGSTOP)
        fault_at = time.time()
        record = record_of(watched, "hang recorded", node=follower, failure="hang")
        assert record["action"] == "restart" and record["result"] == "ok", record
        hang_probes = TEST_TIMING["thresholds"]["hang_probes"]
        assert all(o["health"]["outcome"] == "timeout" for o in record["evidence"][-hang_probes:])
        assert_detected_in_time(record, fault_at, probes=hang_probes)
        assert watched.pid(follower) not in (0, old_pid)
        assert_recorded_everywhere(watched, record)


def corrupt_first_record(data_dir: Path) -> None:
    """Flip a byte of the first record's CRC in the first segment (a leader's no-op has no payload): valid records follow, so it is corruption."""
    segment = sorted((data_dir / "wal").glob("*.wal"))[0]
    with open(segment, "r+b") as f:
        offset = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE - 4
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def corrupt_and_crash(watched: Watched, node: str) -> None:
    corrupt_first_record(watched.files.directory / "data" / node)
    os.kill(watched.pid(node), signal.SIGKILL)


def test_corrupt_log_is_reseeded_through_a_snapshot_and_rejoins(tmp_path):
    with under_load(tmp_path) as (watched, writer, _, follower):
        corrupt_and_crash(watched, follower)
        record = record_of(watched, "reseed recorded", node=follower, failure="corruption")
        assert record["action"] == "reseed" and record["result"] == "ok", record
        assert "exited 65" in record["reason"]
        assert "transfer=" in record["detail"]  # the leader's term was not above the rejoin term
        assert_recorded_everywhere(watched, record)
    data = watched.files.directory / "data"
    backups = list(data.glob(f"{follower}.backup-*"))
    assert len(backups) == 1 and (backups[0] / "wal").is_dir()  # backed up before the destructive step
    assert not (data / follower / "REJOIN").exists()


def _bind(sock: socket.socket, host: str, port: int) -> bool:
    try:
        sock.bind((host, port))
        return True
    except OSError:
        return False


def test_restart_limit_gives_up_then_reseed_refused_without_quorum(tmp_path):
    sections = {"policy": {**TEST_TIMING["policy"], "max_restart_attempts": 2, "restart_window_s": 120.0}}
    with watching(tmp_path, sections) as watched:
        leader, follower = leader_and_follower(watched)
        other = next(n for n in watched.files.node_ids if n not in (leader, follower))
        host, port = watched.files.api[follower].rsplit(":", 1)
        os.kill(watched.pid(follower), signal.SIGKILL)
        with socket.socket() as squatter:  # its API port taken: every start exits 69, a crash loop
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            until(lambda: _bind(squatter, host, int(port)), timeout=5, interval=0.005, what="the dead node's port free")
            squatter.listen()
            gave_up = record_of(watched, "gave up", node=follower, result="gave_up")
            assert "max_restart_attempts 2" in gave_up["detail"]
            restarts = [r for r in watched.records() if r["node"] == follower and r["action"] == "restart" and r["result"] == "failed"]
            assert len(restarts) == 2 and all("exited 69" in r["detail"] for r in restarts)
            metrics = httpx.get(f"{watched.url}/metrics").text
            assert f'dtf_recovery_node_failed{{node="{follower}"}} 1.0' in metrics
            assert "giving up on node" in (tmp_path / "recoveryd.log").read_text()

            corrupt_and_crash(watched, other)
            refused = record_of(watched, "reseed refused", node=other, action="reseed", result="refused")
            assert "needed for a quorum" in refused["detail"] and leader in refused["detail"]
            assert not list((watched.files.directory / "data").glob(f"{other}.backup-*"))  # nothing touched
            assert (watched.files.directory / "data" / other / "wal").is_dir()


def test_recoveryd_killed_mid_state_transfer_finishes_after_restart(tmp_path):
    with under_load(tmp_path) as (watched, writer, _, follower):
        corrupt_and_crash(watched, follower)
        journal = watched.state_dir / "actions" / f"{follower}.json"
        until(lambda: journal.exists() and b'"done":["stop","reseed"' in journal.read_bytes(),
              timeout=60, interval=0.005, what="reseed step done")
        watched.stop_recoveryd(signal.SIGKILL)
        assert journal.exists()
        watched.start_recoveryd()
        record = record_of(watched, "reseed recorded", node=follower, action="reseed")
        assert record["result"] == "ok", record
        assert "resuming action interrupted" in (tmp_path / "recoveryd.log").read_text()
    assert len(list((watched.files.directory / "data").glob(f"{follower}.backup-*"))) == 1  # reseeded once
    assert len([r for r in watched.records() if r["action"] == "reseed"]) == 1


def _paused_child(pid: int, word: str) -> psutil.Process | None:
    """A child process of `pid` with `word` in its command line, stopped (SIGSTOP) at a test pause point."""
    try:
        children = psutil.Process(pid).children(recursive=True)
        return next((c for c in children if word in c.cmdline() and c.status() == psutil.STATUS_STOPPED), None)
    except psutil.Error:
        return None


def test_recoveryd_killed_between_moving_the_data_dir_and_the_marker_finishes_the_reseed(tmp_path):
    """The reseed's rename paused by a test-only pause point, recoveryd and the reseed killed there: restarted, it finishes."""
    with under_load(tmp_path, env={"DTF_TEST_PAUSE_AT": "reseed_swapped"}) as (watched, writer, _, follower):
        data = watched.files.directory / "data"
        corrupt_and_crash(watched, follower)
        reseeding = until(lambda: _paused_child(watched.proc.pid, "reseed"), timeout=60, interval=0.01, what="reseed paused mid-swap")
        assert sorted(p.name for p in (data / follower).iterdir()) == ["REJOIN"]  # never an unmarked empty dir
        assert (data / f"{follower}.reseed" / "wal").is_dir()  # the old data, not yet named a backup
        watched.stop_recoveryd(signal.SIGKILL)
        reseeding.kill()
        watched.start_recoveryd()
        record = record_of(watched, "reseed recorded", node=follower, action="reseed")
        assert record["result"] == "ok", record
    backups = list(data.glob(f"{follower}.backup-*"))
    assert len(backups) == 1 and (backups[0] / "wal").is_dir() and str(backups[0]) in record["detail"]
    assert not (data / f"{follower}.reseed").exists()


NODE = '[[nodes]]\nname = "node1"\nurl = "http://127.0.0.1:7001"\ndata_dir = "/tmp/x"\n'
TOKEN = f'token = "{"t" * 20}"\n'


@pytest.mark.parametrize(("text", "key"), [
    ("[recoveryd]\n" + TOKEN + '[probes]\ninterval_s = "fast"\n' + NODE, "probes.interval_s"),
    ("[recoveryd]\n" + TOKEN + "[policy]\nmax_restarts = 3\n" + NODE, "policy: Object contains unknown field `max_restarts`"),
    ('[recoveryd]\nmode = "docker"\n' + TOKEN + NODE, "recoveryd.mode"),
    ('[recoveryd]\ntoken = "short"\n' + NODE, "recoveryd.token"),
    ("[recoveryd]\n" + TOKEN, "nodes"),
])
def test_bad_config_exits_78_naming_the_key(tmp_path, text, key):
    path = tmp_path / "recoveryd.toml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "recoveryd", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 78, done.stderr
    assert key in done.stderr and done.stderr.count("\n") == 1, done.stderr  # one line naming the key
