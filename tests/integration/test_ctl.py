"""dtfctl against a real cluster: what an operator sees, and what a script can rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from dtfd.devcluster import LocalCluster, write_configs
from tests.integration.support import running

pytestmark = pytest.mark.integration
STATUS_KEYS = {"verdict", "exit_code", "leader", "term", "quorum", "tasks", "workers", "problems", "nodes"}
NODE_KEYS = {"name", "url", "state", "role", "term", "commit_index", "applied_index", "lag", "checksum_ok", "uptime_s"}


def dtfctl(cluster: LocalCluster, *args: str, token: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    urls = ",".join(f"http://{a}" for a in cluster.files.api.values())
    command = [sys.executable, "-m", "dtfd.ctl", "--cluster", urls, f"--token={token or cluster.files.admin_token}", *args]  # a token may start with "-"
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def cluster(tmp_path):
    with running(write_configs(tmp_path)) as local:
        yield local


def _status(cluster: LocalCluster) -> tuple[int, dict]:
    result = dtfctl(cluster, "status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_status_exit_codes_follow_cluster_health_and_json_is_stable(cluster):
    code, view = _status(cluster)
    assert code == 0 and view["verdict"] == "healthy" and view["quorum"] == "3/3"
    assert set(view) == STATUS_KEYS and all(set(node) == NODE_KEYS for node in view["nodes"])
    assert sum(node["role"] == "leader" for node in view["nodes"]) == 1
    table = dtfctl(cluster, "status")
    assert table.returncode == 0 and "healthy" in table.stdout and view["leader"] in table.stdout

    follower = next(n for n in cluster.files.node_ids if n != view["leader"])
    cluster.stop(follower)
    code, view = _status(cluster)
    assert code == 1 and view["verdict"] == "degraded" and any("down" in p for p in view["problems"])
    assert "Traceback" not in dtfctl(cluster, "status").stderr

    other = next(n for n in cluster.files.node_ids if n not in (follower, view["leader"]))
    cluster.stop(other)
    deadline = time.monotonic() + 20
    while (code := _status(cluster)[0]) != 2 and time.monotonic() < deadline:  # the leader steps down (CheckQuorum)
        time.sleep(0.2)
    assert code == 2


def test_no_reachable_node_is_one_line_and_exit_two(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dtfd.ctl", "--cluster", "http://127.0.0.1:9", "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_switchover_moves_leadership_and_history_records_it(cluster):
    before = _status(cluster)[1]["leader"]
    target = next(n for n in cluster.files.node_ids if n != before)
    result = dtfctl(cluster, "switchover", "--to", target, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"from": before, "to": target, "term": json.loads(result.stdout)["term"]}
    assert cluster.wait_leader() == target
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leaders = json.loads(dtfctl(cluster, "history", "--json").stdout)["leaders"]
        if [c["node"] for c in leaders][-2:] == [before, target]:
            break
        time.sleep(0.2)
    assert [c["node"] for c in leaders][-2:] == [before, target]


def test_tasks_submit_list_show_cancel_and_workers_drain(cluster):
    submitted = dtfctl(cluster, "tasks", "submit", "--name", "hello", "--run", "r1", "--json", "--", "echo", "hi")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["tasks"][0]["id"]
    listed = json.loads(dtfctl(cluster, "tasks", "list", "--run", "r1", "--json").stdout)["tasks"]
    assert [t["id"] for t in listed] == [task_id]
    shown = json.loads(dtfctl(cluster, "tasks", "show", task_id, "--json").stdout)
    assert shown["spec"]["argv"] == ["echo", "hi"] and shown["state"] == "queued"
    assert dtfctl(cluster, "tasks", "cancel", task_id).returncode == 0
    assert json.loads(dtfctl(cluster, "tasks", "show", task_id, "--json").stdout)["state"] == "cancelled"
    assert dtfctl(cluster, "tasks", "show", "t-nope").returncode == 1
    runs = json.loads(dtfctl(cluster, "runs", "list", "--json").stdout)["runs"]
    assert runs[0]["run_id"] == "r1" and runs[0]["done"]

    with httpx.Client(base_url=f"http://{cluster.files.api[cluster.wait_leader()]}",
                      headers={"Authorization": f"Bearer {cluster.files.worker_token}"}) as worker:
        assert worker.post("/v1/workers/register", json={"id": "w1", "slots": 2}).status_code == 200
    assert dtfctl(cluster, "workers", "drain", "w1").returncode == 0
    workers = json.loads(dtfctl(cluster, "workers", "list", "--json").stdout)["workers"]
    assert workers[0]["state"] == "draining"
    assert dtfctl(cluster, "workers", "undrain", "w1").returncode == 0
    assert json.loads(dtfctl(cluster, "workers", "list", "--json").stdout)["workers"][0]["state"] == "active"


def test_errors_are_one_line_with_a_nonzero_exit(cluster):
    reader = dtfctl(cluster, "tasks", "submit", "--", "true", token=cluster.files.reader_token)
    assert reader.returncode == 1 and reader.stderr.count("\n") == 1 and "403" in reader.stderr
    assert dtfctl(cluster, "tasks").returncode == 64  # usage


def test_config_init_writes_a_set_that_starts_a_cluster(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dtfd.ctl", "config", "init", "--dir", str(tmp_path), "--workers", "2", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    for path in [written["cluster"], written["dtfctl"], *written["workers"], str(tmp_path / "cluster.secret"), str(tmp_path / "tokens.toml")]:
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o600, path
    import tomllib

    client_config = tomllib.loads((tmp_path / "dtfctl.toml").read_text())
    procs = [subprocess.Popen([sys.executable, "-m", "dtfd.cli", "--config", written["cluster"], "--node", f"node{n}"],
                              stderr=subprocess.DEVNULL) for n in (1, 2, 3)]
    try:
        deadline = time.monotonic() + 30
        while True:
            status = subprocess.run([sys.executable, "-m", "dtfd.ctl", "--config", written["dtfctl"], "status", "--json"],
                                    capture_output=True, text=True, timeout=60)
            if status.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert status.returncode == 0 and json.loads(status.stdout)["quorum"] == "3/3"
        assert len(client_config["cluster"]) == 3
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
