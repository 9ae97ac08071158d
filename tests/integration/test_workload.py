"""The coordinator's side of the workload on a real cluster: leases, loss, failover, shedding, history."""

from __future__ import annotations

import time

import duckdb
import httpx
import pytest

from dtfd.devcluster import LocalCluster, write_configs
from tests.integration.support import running
from tests.integration.workload_helpers import call
from tests.integration.support import until as _until

pytestmark = pytest.mark.integration
FAST = {"heartbeat_s": 0.25, "lost_after_s": 1.0, "submit_rate_per_s": 5.0, "submit_burst": 30}


@pytest.fixture
def cluster(tmp_path):
    with running(write_configs(tmp_path, workload=FAST)) as local:
        yield local


class Worker:
    """The worker protocol spoken by hand, against whichever node answers."""

    def __init__(self, cluster: LocalCluster, name: str, labels: dict | None = None, slots: int = 4) -> None:
        self.cluster, self.name = cluster, name
        self.register(labels or {"os": "linux"}, slots)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> httpx.Response:
        return call(self.cluster, method, path, body, self.cluster.files.worker_token, timeout)

    def register(self, labels: dict, slots: int) -> None:
        assert self.call("POST", "/v1/workers/register", {"id": self.name, "labels": labels, "slots": slots}).status_code == 200

    def heartbeat(self, leases: list[str]) -> dict:
        return self.call("POST", f"/v1/workers/{self.name}/heartbeat", {"leases": leases}).json()

    def lease(self, most: int = 4, wait_s: float = 0.5) -> list[dict]:
        return self.call("POST", f"/v1/workers/{self.name}/lease", {"max": most, "wait_s": wait_s}).json()["leases"]

    def start(self, lease: dict) -> int:
        return self.call("POST", f"/v1/leases/{lease['lease_id']}/start", {"task_id": lease["task_id"]}).status_code

    def report(self, lease: dict, status: str = "succeeded", **extra) -> dict:
        result = {"task_id": lease["task_id"], "lease_id": lease["lease_id"], "status": status,
                  "exit_code": 0 if status == "succeeded" else 1, **extra}
        return self.call("POST", "/v1/results", {"results": [result]}).json()["results"][0]


def _submit(cluster: LocalCluster, node: str, tasks: list[dict], **extra) -> httpx.Response:
    with cluster.client(node) as c:
        return c.post("/v1/tasks", json={"tasks": tasks, **extra})


def _task(cluster: LocalCluster, task_id: str) -> dict:
    with cluster.client(cluster.wait_leader()) as c:
        return c.get(f"/v1/tasks/{task_id}").json()


def test_tasks_flow_from_submit_through_leases_to_results(cluster):
    follower = next(n for n in cluster.files.node_ids if n != cluster.wait_leader())
    reply = _submit(cluster, follower, [
        {"argv": ["true"], "name": "pass"},
        {"argv": ["false"], "name": "fail"},
        {"argv": ["nvidia-smi"], "name": "gpu", "requirements": {"labels": {"gpu": "webgpu"}}},
    ], run_id="run-1")
    assert reply.status_code == 201
    ids = [t["id"] for t in reply.json()["tasks"]]
    worker = Worker(cluster, "w1")
    leases = worker.lease(most=5)
    assert sorted(lease["task_id"] for lease in leases) == sorted(ids[:2])  # the gpu task does not fit w1
    by_task = {lease["task_id"]: lease for lease in leases}
    for lease in leases:
        assert worker.start(lease) == 200
    junit = [{"name": "test_a", "classname": "suite", "status": "passed", "duration_s": 1.5, "message": ""}]
    assert worker.report(by_task[ids[0]], junit=junit)["accepted"]
    assert worker.report(by_task[ids[1]], status="failed")["accepted"]
    assert _task(cluster, ids[0])["state"] == "succeeded"
    failed = _task(cluster, ids[1])
    assert failed["state"] == "failed" and [h["to_state"] for h in failed["history"]] == ["queued", "leased", "running", "failed"]
    with cluster.client(follower, cluster.files.reader_token) as c:
        summary = c.get("/v1/runs/run-1").json()
    assert summary["states"] == {"succeeded": 1, "failed": 1, "queued": 1}
    assert summary["failures"][0]["id"] == ids[1]
    assert summary["junit"]["slowest"][0]["name"] == "test_a"


def test_long_poll_returns_as_soon_as_work_arrives(cluster):
    worker = Worker(cluster, "poller")
    leader = cluster.wait_leader()
    started = time.monotonic()
    with cluster.client(leader, cluster.files.worker_token) as c:
        import threading

        submitter = threading.Timer(0.5, lambda: _submit(cluster, leader, [{"argv": ["true"]}]))
        submitter.start()
        leases = c.post("/v1/workers/poller/lease", json={"max": 1, "wait_s": 8}, timeout=15).json()["leases"]
        submitter.join()
    assert len(leases) == 1
    assert time.monotonic() - started < 6  # woke on the submission, not at the end of the poll
    again = worker.lease(wait_s=0)
    assert [lease["lease_id"] for lease in again] == [leases[0]["lease_id"]], "an unstarted lease is handed over again, and no other task exists"
    assert worker.start(again[0]) == 200
    assert worker.lease(wait_s=0) == []


def test_lost_worker_tasks_are_requeued_and_its_late_result_refused(cluster):
    leader = cluster.wait_leader()
    task_id = _submit(cluster, leader, [{"argv": ["true"], "max_retries": 1, "backoff": {"base_s": 0.1, "max_s": 0.1}}]).json()["tasks"][0]["id"]
    silent = Worker(cluster, "silent")
    (first,) = silent.lease()
    silent.start(first)
    # "silent" stops heartbeating: after lost_after_s its task goes back to the queue, attempt counted.
    _until(lambda: _task(cluster, task_id)["state"] == "queued", what="requeue after worker loss")
    healthy = Worker(cluster, "healthy")
    (second,) = _until(lambda: healthy.lease(), what="second lease")
    assert second["attempt"] == 2
    assert silent.report(first) == {"task_id": task_id, "lease_id": first["lease_id"], "accepted": False, "error": "stale_lease"}
    assert healthy.report(second)["accepted"]
    task = _task(cluster, task_id)
    assert task["state"] == "succeeded" and task["result"]["exit_code"] == 0
    assert [h["reason"] for h in task["history"]].count("exit 0") == 1
    beat = silent.call("POST", "/v1/workers/silent/heartbeat", {"leases": [first["lease_id"]]})
    assert beat.status_code == 404  # declared lost: it must register again before it gets work


def test_leader_kill_keeps_every_task_and_lease(cluster):
    leader = cluster.wait_leader()
    ids = [t["id"] for t in _submit(cluster, leader, [{"argv": ["true"]} for _ in range(20)]).json()["tasks"]]
    worker = Worker(cluster, "w1", slots=5)
    leases = worker.lease(most=5)
    assert len(leases) == 5
    cluster.kill(leader)
    survivors = [n for n in cluster.files.node_ids if n != leader]
    new_leader = cluster.wait_leader(among=survivors)
    worker.heartbeat([lease["lease_id"] for lease in leases])
    for lease in leases:
        assert worker.report(lease)["accepted"]
    with cluster.client(new_leader) as c:
        states = {t["id"]: t["state"] for t in c.get("/v1/tasks", params={"limit": 100}).json()["tasks"]}
    assert set(states) == set(ids)
    assert sorted(states.values()).count("succeeded") == 5 and sorted(states.values()).count("queued") == 15


def test_submissions_past_the_rate_are_shed_whole_with_retry_after(cluster):
    leader = cluster.wait_leader()
    assert _submit(cluster, leader, [{"argv": ["true"]}] * 30).status_code == 201
    shed = _submit(cluster, leader, [{"argv": ["true"]}] * 10)
    assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1
    with cluster.client(leader) as c:
        assert len(c.get("/v1/tasks", params={"limit": 500}).json()["tasks"]) == 30  # nothing of the shed batch


def test_invalid_submissions_name_the_field_and_apply_nothing(cluster):
    leader = cluster.wait_leader()
    for tasks, field in (
        ([{"argv": []}], "tasks[0].argv"),
        ([{"argv": ["x"]}, {"argv": "not a list"}], "tasks[1].argv"),
        ([{"argv": ["x"], "timeout_s": -1}], "tasks[0].timeout_s"),
        ([{"argv": ["x"], "requirements": {"gpu": "x"}}], "tasks[0].requirements"),
    ):
        reply = _submit(cluster, leader, tasks)
        assert reply.status_code == 422 and field in reply.json()["error"]["message"], reply.text
    with cluster.client(leader) as c:
        assert c.get("/v1/tasks").json()["tasks"] == []


def test_results_are_recorded_in_duckdb_history(tmp_path):
    local = LocalCluster(write_configs(tmp_path, nodes=1, workload=FAST))
    local.start_all()
    try:
        local.wait_leader()
        task_id = _submit(local, "node1", [{"argv": ["true"]}]).json()["tasks"][0]["id"]
        worker = Worker(local, "w1")
        (lease,) = worker.lease()
        worker.start(lease)
        junit = [{"name": f"test_{n}", "classname": "s", "status": "passed", "duration_s": 0.1, "message": ""} for n in range(3)]
        worker.report(lease, junit=junit)
        time.sleep(1.0)  # the recorder flushes every 0.5 s; the row count below is the real check
    finally:
        local.stop_all()
    conn = duckdb.connect(str(tmp_path / "data" / "node1" / "history.duckdb"), read_only=True)
    states = [r[0] for r in conn.execute("SELECT to_state FROM task_history WHERE task_id = ? ORDER BY raft_index", [task_id]).fetchall()]
    assert states == ["queued", "leased", "running", "succeeded"]
    assert conn.execute("SELECT exit_code FROM task_results WHERE task_id = ?", [task_id]).fetchall() == [(0,)]
    assert conn.execute("SELECT count(*) FROM junit_cases WHERE task_id = ?", [task_id]).fetchone() == (3,)
