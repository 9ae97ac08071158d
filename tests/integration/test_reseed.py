"""State transfer by hand: a node's data moved aside, it rejoins empty and catches up without voting first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dtfd.devcluster import write_configs
from tests.integration.support import running, until

pytestmark = pytest.mark.integration


def _reseed(data_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtfd.cli", "reseed", "--data-dir", str(data_dir), *extra],
                          capture_output=True, text=True, timeout=60)


def test_reseeded_follower_catches_up_through_a_snapshot_then_votes_again(tmp_path):
    with running(write_configs(tmp_path, raft={"snapshot_every_entries": 20})) as cluster:
        leader = cluster.wait_leader()
        follower = next(n for n in cluster.files.node_ids if n != leader)
        data_dir = tmp_path / "data" / follower
        with cluster.client(leader) as c:
            for n in range(60):
                assert c.put(f"/v1/kv/k{n}", json={"value": str(n)}).status_code == 200
        refused = _reseed(data_dir)
        assert refused.returncode == 75 and "stop the node first" in refused.stderr  # never under a running node
        cluster.stop(follower)
        result = _reseed(data_dir)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["rejoin_term"] >= 1 and report["old_term"] == report["rejoin_term"]
        assert (tmp_path / "data" / report["backup"]).is_dir()
        assert sorted(p.name for p in data_dir.iterdir()) == ["REJOIN"]
        term = cluster.status(leader)["term"]
        cluster.start(follower)
        until(lambda: (cluster.status(follower) or {}).get("rejoining") is True, what="node up and rejoining")
        with cluster.client(leader) as c:
            assert c.put("/v1/kv/rejoining", json={"value": "y"}).status_code == 200
        # The same leader catches it up, though it remembered a match index beyond the node's empty log.
        target = cluster.status(leader)["commit_index"]
        until(lambda: (s := cluster.status(follower)) and s["applied_index"] >= target, what="caught up by the same leader")
        assert (cluster.status(leader)["role"], cluster.status(leader)["term"]) == ("leader", term)
        assert cluster.status(follower)["rejoining"]  # it may have voted in this term: it votes again under a later leader
        # Writes through a leader of a later term let it vote again: hand leadership over once.
        other = next(n for n in cluster.files.node_ids if n not in (leader, follower))
        with cluster.client(leader) as c:
            assert c.post("/v1/leadership/transfer", json={"to": other}).status_code == 202
        until(lambda: cluster.wait_leader() == other, what="leadership moved")
        with cluster.client(other) as c:
            assert c.put("/v1/kv/after", json={"value": "x"}).status_code == 200
        leader_status = until(lambda: cluster.status(other), what="leader status")
        until(lambda: (s := cluster.status(follower)) and not s["rejoining"] and s["applied_index"] >= leader_status["applied_index"],
              what="caught up and voting again")
        until(lambda: not (data_dir / "REJOIN").exists(), what="the REJOIN marker dropped once caught up")
        assert "snapshot installed" in (tmp_path / f"{follower}.log").read_text()
        with cluster.client(follower) as c:
            assert c.get("/v1/kv/k59", params={"stale": "ok"}).json()["value"] == "59"
        backups = list((tmp_path / "data").glob(f"{follower}.backup-*"))
        assert len(backups) == 1 and (backups[0] / "wal").is_dir()  # nothing deleted


def test_reseed_needs_a_term_when_the_old_hard_state_is_unreadable(tmp_path):
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "hardstate").write_bytes(b"garbage")
    result = _reseed(data_dir)
    assert result.returncode == 65 and "--term" in result.stderr
    assert _reseed(data_dir, "--term", "7").returncode == 0
    assert (data_dir / "REJOIN").read_text().strip() == "7"
    assert _reseed(tmp_path / "absent").returncode == 66
