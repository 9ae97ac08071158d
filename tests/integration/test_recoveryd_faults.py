"""recoveryd against real faults that need more than a kill: exhaustion, split brain and term
divergence, state divergence, a slow follower. Three real dtfd nodes under write load, a real
recoveryd in local mode; the faults are real conditions (a small tmpfs filled up, fds and memory
leaked inside the node, Raft messages dropped inside the node, its state changed behind Raft's
back) injected through dtfd's test-only switches (dtfd.server.faults).

Each: fault injected -> detected -> repaired by the safe action for it -> cluster healthy,
every acknowledged write still there, the action in DuckDB, the JSON log and the cluster's
replicated history.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from dtfd.devcluster import write_configs
from dtfd.server.faults import FAULTS_ENV, command
from recoveryd.local import TEST_TIMING, Watched
from tests.integration.support import running, until
from tests.integration.test_recoveryd import (
    assert_detected_in_time, assert_recorded_everywhere, record_of, under_load,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where each node (and each node recoveryd restarts) looks for its fault commands."""
    directory = tmp_path / "faults"
    directory.mkdir()
    monkeypatch.setenv(FAULTS_ENV, str(directory / "{node}"))
    return directory


def inject(faults: Path, node: str, *lines: str) -> float:
    command(str(faults / node), *lines)
    until(lambda: not (faults / node).exists(), timeout=10, interval=0.01, what=f"{node} took the fault command")
    return time.time()


def thresholds(**values: float) -> dict:
    return {"thresholds": {**TEST_TIMING["thresholds"], **values}}


def status(watched: Watched, node: str) -> dict:
    return until(lambda: watched.cluster.status(node), timeout=10, what=f"{node} status")


# ---- resource exhaustion -------------------------------------------------------------

TMPFS_BYTES = 64 << 20
DISK_FREE_MIN = 24 << 20


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")


def _free(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


class Filler:
    """Overwrites a few keys with big values through the leader: the log grows, the state does not."""

    def __init__(self, watched: Watched) -> None:
        self.watched, self.stop = watched, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        value, n = "x" * (64 << 10), 0
        while not self.stop.is_set():
            leader = self.watched.cluster.wait_leader(among=self.watched.files.node_ids)
            with self.watched.cluster.client(leader) as c:
                while not self.stop.is_set():
                    n += 1
                    try:
                        if c.put(f"/v1/kv/fill-{n % 4}", json={"value": value}).status_code != 200:
                            break
                    except httpx.HTTPError:
                        break

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_a_disk_nearly_full_is_relieved_by_cleaning_backups_and_compacting_without_a_restart(tmp_path):
    data = tmp_path / "data"
    node = "node3"
    _mount_tmpfs(data / node)  # node3's data dir is a small file system of its own
    for day in (1, 2, 3):  # backups of earlier reseeds, beside the data dir
        (data / f"{node}.backup-2020010{day}T000000Z").mkdir()
    sections = {**thresholds(disk_free_min_bytes=DISK_FREE_MIN), "policy": {**TEST_TIMING["policy"], "backups_keep": 1}}
    dtfd = {"raft": {"snapshot_every_entries": 1_000_000}, "storage": {"segment_bytes": 1 << 20}}
    try:
        with under_load(tmp_path, sections, dtfd) as (watched, writer, _, _):
            pid = watched.pid(node)
            filler = Filler(watched)
            try:
                until(lambda: _free(data / node) < DISK_FREE_MIN, timeout=60, interval=0.01, what="the disk nearly full")
                fault_at = time.time()
            finally:
                filler.close()
            record = record_of(watched, "relief recorded", node=node, failure="exhaustion")
            assert record["action"] == "relieve" and record["result"] == "ok", record
            assert "disk free" in record["reason"]
            assert_detected_in_time(record, fault_at, probes=2)
            assert "removed_backups=2" in record["detail"] and "compact=snapshot at" in record["detail"], record["detail"]
            assert "after_compaction=within thresholds" in record["detail"] and "restart=not needed" in record["detail"]
            assert _free(data / node) > DISK_FREE_MIN and watched.pid(node) == pid  # compaction did it, no restart
            assert [p.name for p in data.glob(f"{node}.backup-*")] == [f"{node}.backup-20200103T000000Z"]
            assert_recorded_everywhere(watched, record)
    finally:
        subprocess.run(["umount", "-l", str(data / node)], check=False)


@pytest.mark.parametrize(("fault", "limit", "words"), [
    ("leak_fds 2000", {"open_fds_max": 1000}, "open fds"),
    (f"leak_rss {600 << 20}", {"rss_max_bytes": 400 << 20}, "RSS"),
], ids=["fd-leak", "memory"])
def test_a_leaking_leader_hands_over_then_is_restarted_as_the_last_step(tmp_path, faults, fault, limit, words):
    with under_load(tmp_path, thresholds(**limit)) as (watched, writer, leader, _):
        pid = watched.pid(leader)
        fault_at = inject(faults, leader, fault)
        record = record_of(watched, "relief recorded", node=leader, failure="exhaustion")
        assert record["action"] == "relieve" and record["result"] == "ok", record
        assert words in record["reason"]
        assert_detected_in_time(record, fault_at, probes=2)
        detail = record["detail"]
        assert "compact=snapshot at" in detail and f"after_compaction={words}" in detail and "restart=done" in detail, detail
        assert watched.pid(leader) not in (0, pid)
        assert _role_when_stopped(watched, leader) == "follower", detail  # handed over (or already lost) before the restart
        usage = psutil.Process(watched.pid(leader))
        assert usage.num_fds() < limit.get("open_fds_max", 1 << 30) and usage.memory_info().rss < limit.get("rss_max_bytes", 1 << 62)
        assert_recorded_everywhere(watched, record)


def _role_when_stopped(watched: Watched, node: str) -> str:
    """The role the node's first process last logged (it logs each change of leader it sees)."""
    log = (watched.state_dir / "local" / f"{node}.log").read_text()
    first_run = log.split("dtfd started")[1]
    changes = [line for line in first_run.splitlines() if " dtf.node: leader " in line]
    return changes[-1].rpartition("role=")[2].strip()


# ---- split brain and term divergence -------------------------------------------------

def test_split_brain_gets_a_step_down_of_the_stale_leader_and_term_divergence_is_reported_never_a_restart(tmp_path, faults):
    """No CheckQuorum and no PreVote (the original design's settings): a leader cut off from its peers keeps leading in
    its old term while the others elect a new one; once it stepped down it campaigns alone and its term runs away."""
    dtfd = {"raft": {"check_quorum": False, "pre_vote": False}}
    with under_load(tmp_path, thresholds(term_gap=3), dtfd) as (watched, writer, stale, _):
        pid = watched.pid(stale)
        old_term = status(watched, stale)["term"]
        inject(faults, stale, "isolate")
        others = [n for n in watched.files.node_ids if n != stale]
        until(lambda: any((v := watched.cluster.status(n)) and v["role"] == "leader" for n in others),
              interval=0.01, what="a second leader elected by the majority")
        two_leaders_at = time.time()
        record = record_of(watched, "split brain recorded", node=stale, failure="split_brain")
        assert record["action"] == "step_down" and record["result"] == "ok", record
        assert_detected_in_time(record, two_leaders_at, probes=2)
        views = record["views"]
        assert sorted(views) == sorted(watched.files.node_ids)  # every node's view is kept as evidence
        assert [n for n, v in views.items() if v.get("role") == "leader" and v["term"] == old_term] == [stale]
        assert any(v.get("role") == "leader" and v["term"] > old_term for v in views.values())
        assert f"{stale} (term {old_term}) stepped down" in record["detail"]

        diverged = record_of(watched, "term divergence reported", node=stale, failure="term_divergence")
        assert diverged["action"] == "report" and diverged["result"] == "reported", diverged
        assert sorted(diverged["views"]) == sorted(watched.files.node_ids)
        assert watched.pid(stale) == pid  # no restart: the evidence stays
        assert not [r for r in watched.records() if r["action"] in ("restart", "reseed", "relieve")]
        inject(faults, stale, "heal")  # its high term makes the others hold a new election, which it cannot win
        assert_recorded_everywhere(watched, record)


# ---- state divergence ----------------------------------------------------------------

def test_a_node_whose_state_diverged_gets_a_state_transfer_from_the_leader(tmp_path, faults):
    dtfd = {"raft": {"checksum_every_entries": 20, "snapshot_every_entries": 200}}
    with under_load(tmp_path, dtfd=dtfd) as (watched, writer, _, follower):
        fault_at = inject(faults, follower, "diverge")
        record = record_of(watched, "state transfer recorded", node=follower, failure="divergence")
        assert record["action"] == "reseed" and record["result"] == "ok", record
        assert "the majority" in record["reason"]
        assert_detected_in_time(record, fault_at, probes=2)
        assert set(record["views"]) == set(watched.files.node_ids)
        assert_recorded_everywhere(watched, record)
    backups = list((watched.files.directory / "data").glob(f"{follower}.backup-*"))
    assert len(backups) == 1 and (backups[0] / "wal").is_dir()  # kept for the post-mortem


# ---- slow follower -------------------------------------------------------------------

def test_a_slow_follower_is_caught_up_by_snapshot_and_reported_when_that_does_not_last(tmp_path, faults):
    slow = {"slow_follower_lag": 100, "slow_follower_s": 1.0}
    with under_load(tmp_path, thresholds(**slow)) as (watched, writer, leader, follower):
        inject(faults, follower, "drop append")  # it hears heartbeats, gets no entries
        record = record_of(watched, "catch-up recorded", node=follower, failure="slow_follower")
        assert record["action"] == "catch_up" and record["result"] == "ok", record
        assert f"from {leader}" in record["detail"] and "snapshot at" in record["detail"]
        lasted = float(re.search(r"for ([0-9.]+)s$", record["reason"]).group(1))
        assert lasted >= slow["slow_follower_s"], record["reason"]  # only once it lasted
        assert_recorded_everywhere(watched, record)

        inject(faults, follower, "drop append snapshot")  # now the snapshot cannot reach it either
        persists = record_of(watched, "lasting lag reported", node=follower, failure="slow_follower", result="failed")
        assert "persists" in persists["detail"] and "after the snapshot catch-up" in persists["detail"], persists
        inject(faults, follower, "heal")
        assert watched.pid(follower) and not [r for r in watched.records() if r["action"] == "restart"]
    assert "snapshot installed" in (tmp_path / "recoveryd" / "local" / f"{follower}.log").read_text()



# ---- the dtfd routes recoveryd acts through ------------------------------------------

def test_the_admin_routes_recoveryd_uses_act_or_refuse_clearly(tmp_path):
    with running(write_configs(tmp_path, storage={"segment_bytes": 64 << 10})) as cluster:
        leader = cluster.wait_leader()
        follower = next(n for n in cluster.files.node_ids if n != leader)
        with cluster.client(leader) as c:
            for n in range(200):
                assert c.put(f"/v1/kv/k{n}", json={"value": "v" * 1000}).status_code == 200
        until(lambda: (cluster.status(leader) or {}).get("peers", {}).get(follower, {}).get("lag") == 0, what="follower caught up")
        wal = tmp_path / "data" / follower / "wal"
        segments = len(list(wal.glob("*.wal")))
        with cluster.client(follower) as c:
            compacted = c.post("/v1/admin/compact", json={}).json()
            assert compacted["node"] == follower and compacted["snapshot_index"] > compacted["previous_snapshot_index"]
            assert len(list(wal.glob("*.wal"))) < segments  # the log behind the snapshot is gone
            refused = c.post("/v1/admin/step-down", json={})
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_leader"
            assert c.post("/v1/admin/compact", json={"now": True}).status_code == 422  # unknown field named
            forwarded = c.post("/v1/admin/catch-up", json={"to": follower})  # a follower forwards to the leader
            assert forwarded.status_code == 409 and forwarded.json()["error"]["code"] == "caught_up"
        with cluster.client(leader) as c:
            assert c.post("/v1/admin/catch-up", json={"to": leader}).status_code == 422
            assert c.post("/v1/admin/catch-up", json={"to": "node9"}).status_code == 422
            stepped = c.post("/v1/admin/step-down", json={})
            assert stepped.status_code == 200 and stepped.json()["node"] == leader
        until(lambda: cluster.wait_leader() and all(cluster.status(n) for n in cluster.files.node_ids), what="a leader again")
