"""The workload end to end: real dtfd nodes, real dtf-worker processes, real task processes.

Where test_workload.py speaks the worker protocol by hand, here the agents do, so these
tests show what a user of dtf sees when workers and coordinators crash, pause and drain.
Timing is shrunk through the [workload] options so the whole file runs in a few minutes.
"""

from __future__ import annotations

import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import httpx
import psutil
import pytest
import tomli_w

from dtfd.devcluster import LocalCluster, write_configs, write_worker_config
from dtfd.state.tasks import TERMINAL
from tests.integration.support import running, until
from tests.integration.workload_helpers import call

pytestmark = pytest.mark.integration

# Workers heartbeat every 0.3 s and are lost after 1.5 s; a lease without a result ends 2 s past the task's timeout.
QUICK = {"heartbeat_s": 0.3, "lost_after_s": 1.5, "lease_grace_s": 2.0, "submit_rate_per_s": 10_000.0, "submit_burst": 10_000}
NO_SUCH_COMMAND = "/nonexistent/dtf-e2e-no-such-command"
RETRY_SOON = {"base_s": 0.05, "max_s": 0.1}


def wait_for_file(path: Path) -> str:
    """A shell script that blocks until `path` exists: a task the test finishes when it chooses."""
    return f"while [ ! -e {path} ]; do sleep 0.05; done"


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Starts a cluster with QUICK timing (overridable); stops its workers and nodes afterwards."""
    started: list[LocalCluster] = []

    def start(nodes: int = 3, **workload: float) -> LocalCluster:
        cluster = LocalCluster(write_configs(tmp_path / "cluster", nodes=nodes, workload={**QUICK, **workload}))
        started.append(cluster)
        cluster.start_all()
        cluster.wait_leader()
        return cluster

    yield start
    for cluster in started:
        cluster.stop_all()


def start_worker(cluster: LocalCluster, name: str, labels: dict[str, str] | None = None, slots: int = 2) -> subprocess.Popen:
    """A real dtf-worker; short request timeouts and kill grace so failovers and cancels are quick."""
    path = write_worker_config(cluster.files, name, labels={"os": "linux", **(labels or {})}, slots=slots)
    document = tomllib.loads(path.read_text())
    document["coordinator"].update(request_timeout_s=1.0, lease_wait_s=2.0)
    document["tasks"] = {"kill_grace_s": 1.0, "drain_timeout_s": 5.0}
    path.write_text(tomli_w.dumps(document))
    return cluster.start_worker(path)


def submit(cluster: LocalCluster, tasks: list[dict], **extra: object) -> list[dict]:
    reply = call(cluster, "POST", "/v1/tasks", {"tasks": tasks, **extra})
    assert reply.status_code == 201, reply.text
    return reply.json()["tasks"]


def task(cluster: LocalCluster, task_id: str) -> dict:
    return call(cluster, "GET", f"/v1/tasks/{task_id}").json()


def state_of(cluster: LocalCluster, task_id: str) -> str:
    return task(cluster, task_id)["state"]


def worker_view(cluster: LocalCluster, worker: str) -> dict:
    return {w["id"]: w for w in call(cluster, "GET", "/v1/workers").json()["workers"]}.get(worker, {})


def run_done(cluster: LocalCluster, run_id: str) -> dict | None:
    summary = call(cluster, "GET", f"/v1/runs/{run_id}").json()
    return summary if summary["done"] else None


def terminal(view: dict) -> list[dict]:
    """The task's transitions into a terminal state: exactly one for a task recorded once."""
    return [h for h in view["history"] if h["to_state"] in TERMINAL]


def leases(view: dict) -> list[dict]:
    return [h for h in view["history"] if h["to_state"] == "leased"]


def history_counts(cluster: LocalCluster, node: str, queries: list[str]) -> list[int]:
    """Counts from a stopped node's history.duckdb (a running node holds its lock); 0s if it was never written."""
    path = cluster.files.directory / "data" / node / "history.duckdb"
    if not path.exists():
        return [0] * len(queries)
    with duckdb.connect(str(path), read_only=True) as db:
        return [db.execute(query).fetchone()[0] for query in queries]


def log_of(cluster: LocalCluster, name: str) -> str:
    return (cluster.files.directory / f"{name}.log").read_text()


# ---- a mixed run ------------------------------------------------------------------------


JUNIT = (
    "cat > report.xml <<'EOF'\n"
    '<testsuite name="s"><testcase classname="s" name="test_ok" time="0.25"/>'
    '<testcase classname="s" name="test_bad" time="0.5"><failure message="boom"/></testcase></testsuite>\n'
    "EOF"
)


def mixed_specs(markers: Path) -> dict[str, list[dict]]:
    """200 tasks by kind; some of the passing and JUnit ones need a label only two workers have."""
    gpu = {"labels": {"gpu": "webgpu"}}
    flaky = "[ -e {m} ] && exit 0; touch {m}; exit 1"  # fails on its first attempt, passes on the retry
    return {
        "pass": [{"argv": ["true"], "requirements": gpu if n % 3 == 0 else {}} for n in range(100)],
        "fail": [{"argv": ["false"], "max_retries": 1, "backoff": RETRY_SOON} for _ in range(30)],
        "flaky": [{"argv": [flaky.format(m=markers / f"flaky-{n}")], "shell": True, "max_retries": 2, "backoff": RETRY_SOON} for n in range(30)],
        "timeout": [{"argv": ["sleep", "30"], "timeout_s": 1} for _ in range(10)],
        "junit": [{"argv": [JUNIT], "shell": True, "junit": "report.xml", "requirements": gpu if n % 2 else {}} for n in range(30)],
    }


def test_a_mixed_run_over_labelled_workers_ends_every_task_right(start_cluster, tmp_path):
    cluster = start_cluster()
    for n in range(4):
        start_worker(cluster, f"w{n}", labels={"gpu": "webgpu"} if n < 2 else {}, slots=4)
    kinds = mixed_specs(tmp_path)
    specs = [dict(spec, name=f"{kind}-{n}") for kind, group in kinds.items() for n, spec in enumerate(group)]
    ids = {spec["name"]: submitted["id"] for spec, submitted in zip(specs, submit(cluster, specs, run_id="mixed"))}
    assert len(ids) == 200

    summary = until(lambda: run_done(cluster, "mixed"), timeout=120, what="every task of the run ended")
    views = {name: task(cluster, task_id) for name, task_id in ids.items()}
    expected = {"pass": ("succeeded", 1), "fail": ("failed", 2), "flaky": ("succeeded", 2), "timeout": ("timed_out", 1), "junit": ("succeeded", 1)}
    for name, view in views.items():
        state, attempts = expected[name.split("-")[0]]
        assert (view["state"], view["attempt"], len(leases(view))) == (state, attempts, attempts), (name, view["history"])
        assert view["attempt"] <= view["spec"]["max_retries"] + 1
        assert len(terminal(view)) == 1, (name, view["history"])
        if view["spec"]["requirements"]["labels"]:
            assert {h["worker"] for h in leases(view)} <= {"w0", "w1"}, name
    assert views["timeout-0"]["result"]["reason"].startswith("timed out after 1s")
    assert [h["reason"] for h in views["fail-0"]["history"]] == ["submitted", "leased", "started", "retry after exit 1", "leased", "started", "exit 1"]
    assert [(c["name"], c["status"]) for c in views["junit-1"]["result"]["junit"]] == [("test_ok", "passed"), ("test_bad", "failed")]

    assert summary["total"] == 200 and summary["states"] == {"succeeded": 160, "failed": 30, "timed_out": 10}
    assert {f["id"] for f in summary["failures"]} == {ids[n] for n in ids if n.startswith(("fail", "timeout"))}
    assert (summary["junit"]["cases"], summary["junit"]["failed"]) == (60, 30)
    assert summary["junit"]["slowest"][0]["name"] == "test_bad"

    attempts = sum(view["attempt"] for view in views.values())
    cluster.stop_all()
    for node in cluster.files.node_ids:
        counts = history_counts(cluster, node, [
            "SELECT count(*) FROM junit_cases",
            "SELECT count(*) FROM junit_cases WHERE status = 'failed'",
            "SELECT count(*) FROM task_results",
            f"SELECT count(*) FROM task_history WHERE to_state IN {tuple(TERMINAL)}",
        ])
        assert counts == [60, 30, attempts, 200], node  # every attempt's result, one terminal row per task


def test_a_graceful_stop_keeps_every_history_row(tmp_path):
    """Submit, then stop at once, three times over: the recorder's write can fall in between only by luck."""
    for attempt in range(3):
        with running(write_configs(tmp_path / f"try{attempt}", nodes=1, workload=QUICK)) as cluster:
            submit(cluster, [{"argv": ["true"]}] * 10)
        assert cluster.procs["node1"].returncode == 0
        assert history_counts(cluster, "node1", ["SELECT count(*) FROM task_history"]) == [10]


# ---- worker failures ------------------------------------------------------------------------


def test_a_worker_killed_mid_task_has_its_tasks_requeued_and_recorded_once(start_cluster, tmp_path):
    cluster = start_cluster()
    start_worker(cluster, "victim", slots=2)
    go = tmp_path / "go"
    ids = [t["id"] for t in submit(cluster, [{"argv": [wait_for_file(go)], "shell": True, "max_retries": 1}] * 2)]
    until(lambda: all(state_of(cluster, i) == "running" for i in ids), what="both tasks running on the victim")
    start_worker(cluster, "rescuer", slots=2)
    until(lambda: worker_view(cluster, "rescuer").get("state") == "active", what="rescuer registered")
    killed_at = time.time()
    cluster.kill("victim")  # its task processes live on (their own sessions) and finish when `go` appears
    until(lambda: all(state_of(cluster, i) == "running" for i in ids), what="tasks running again on the rescuer")
    go.touch()
    until(lambda: all(state_of(cluster, i) == "succeeded" for i in ids), what="tasks succeeded on the rescuer")
    for task_id in ids:
        view = task(cluster, task_id)
        requeue = next(h for h in view["history"] if h["reason"] == "retry after worker lost")
        assert requeue["at"] >= killed_at + QUICK["lost_after_s"] - QUICK["heartbeat_s"]  # not before the worker was due
        assert [h["worker"] for h in leases(view)] == ["victim", "rescuer"] and view["attempt"] == 2
        assert [(h["to_state"], h["worker"]) for h in terminal(view)] == [("succeeded", "rescuer")]
    assert worker_view(cluster, "victim")["state"] == "lost"


def test_a_paused_worker_late_result_is_refused(start_cluster, tmp_path):
    cluster = start_cluster()
    start_worker(cluster, "sleepy", slots=1)
    go = tmp_path / "go"
    (task_id,) = (t["id"] for t in submit(cluster, [{"argv": [wait_for_file(go) + "; echo done"], "shell": True, "max_retries": 1}]))
    until(lambda: state_of(cluster, task_id) == "running", what="task running on sleepy")
    stale_lease = task(cluster, task_id)["lease"]["id"]
    cluster.signal("sleepy", signal.SIGSTOP)
    try:
        until(lambda: task(cluster, task_id)["attempt"] == 1 and state_of(cluster, task_id) == "queued", what="requeue of the paused worker's task")
        start_worker(cluster, "awake", slots=1)
        until(lambda: state_of(cluster, task_id) == "running", what="task running on awake")
        go.touch()  # both attempts' processes finish: the paused worker's result is ready when it wakes
        until(lambda: state_of(cluster, task_id) == "succeeded", what="awake's result recorded")
    finally:
        cluster.signal("sleepy", signal.SIGCONT)
    refused = "result refused: stale lease"
    not_sent = "result not sent: the coordinator does not hold the lease"
    until(lambda: refused in log_of(cluster, "sleepy") or not_sent in log_of(cluster, "sleepy"), what="the late result dealt with")
    assert stale_lease in log_of(cluster, "sleepy").split(refused if refused in log_of(cluster, "sleepy") else not_sent)[1].splitlines()[0]
    view = task(cluster, task_id)
    assert [(h["to_state"], h["worker"]) for h in terminal(view)] == [("succeeded", "awake")]
    assert view["result"]["output_tail"] == "done\n" and view["lease"]["worker"] == "awake"


def test_a_worker_back_from_a_pause_gets_work_again(start_cluster):
    cluster = start_cluster(nodes=1)
    start_worker(cluster, "sleepy", labels={"pool": "only-sleepy"})
    until(lambda: worker_view(cluster, "sleepy").get("state") == "active", what="sleepy registered")
    cluster.signal("sleepy", signal.SIGSTOP)
    until(lambda: worker_view(cluster, "sleepy")["state"] == "lost", what="sleepy declared lost")
    cluster.signal("sleepy", signal.SIGCONT)
    (task_id,) = (t["id"] for t in submit(cluster, [{"argv": ["true"], "requirements": {"labels": {"pool": "only-sleepy"}}}]))
    until(lambda: state_of(cluster, task_id) == "succeeded", timeout=5, what="task run by the worker that came back")


def test_a_lease_granted_to_a_vanished_poll_is_given_back(start_cluster):
    cluster = start_cluster(nodes=1, lost_after_s=15.0)  # w1 is never silent long enough to be lost
    token = cluster.files.worker_token
    assert call(cluster, "POST", "/v1/workers/register", {"id": "w1", "labels": {"pool": "solo"}, "slots": 1}, token).status_code == 200
    with cluster.client("node1", token) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/workers/w1/lease", json={"max": 1, "wait_s": 15}, timeout=0.5)  # the worker dies mid-poll (kill -9)
    (task_id,) = (t["id"] for t in submit(cluster, [{"argv": ["true"], "timeout_s": 1, "requirements": {"labels": {"pool": "solo"}}}]))
    until(lambda: state_of(cluster, task_id) == "leased", what="the abandoned poll leased the task")
    start_worker(cluster, "w1", labels={"pool": "solo"}, slots=1)  # the worker restarted: it holds no lease
    view = until(lambda: (v := task(cluster, task_id))["state"] in TERMINAL and v, what="task ended")
    assert view["state"] == "succeeded", view["history"]


# ---- coordinator failures --------------------------------------------------------------------


def test_leader_killed_twice_mid_run_loses_nothing_and_records_each_result_once(start_cluster):
    cluster = start_cluster()
    for n in range(4):
        start_worker(cluster, f"w{n}", slots=3)
    spec = {"argv": ["sleep", "0.1"], "timeout_s": 5}

    def submit_batch(seq: int) -> None:
        """Retried through the failover under one client/seq: applied once whatever happens."""
        reply = call(cluster, "POST", "/v1/tasks", {"tasks": [spec] * 50, "run_id": "failover", "client": "e2e", "seq": seq}, timeout=20)
        assert reply.status_code == 201, reply.text

    def ended() -> int:
        states = call(cluster, "GET", "/v1/runs/failover").json()["states"]
        return sum(n for state, n in states.items() if state in TERMINAL)

    submit_batch(1)
    for round_ in (1, 2):
        until(lambda: ended() >= 30 * round_, timeout=30, what=f"progress before kill {round_}")
        leader = cluster.wait_leader()
        cluster.kill(leader)
        submit_batch(round_ + 1)  # straight into the election
        cluster.start(leader)
        cluster.wait_leader(timeout=30)
    summary = until(lambda: run_done(cluster, "failover"), timeout=60, what="the run completes")
    assert summary["total"] == 150  # no batch lost, none applied twice
    views = [task(cluster, brief["id"]) for brief in call(cluster, "GET", "/v1/tasks?run=failover&limit=500").json()["tasks"]]
    for view in views:
        assert (view["attempt"], len(terminal(view))) == (1, 1), view["history"]
    # A lease whose grant died with the leader is taken back (heartbeat or expiry), never left to time out unrun.
    assert [view["id"] for view in views if view["state"] != "succeeded"] == []

    def converged() -> bool:
        views = [cluster.status(n) for n in cluster.files.node_ids]
        return all(views) and len({(v["applied_index"], v["checksum"]) for v in views}) == 1

    until(converged, what="every node at the same applied index with the same checksum")


# ---- circuit breaker -------------------------------------------------------------------------


def set_breaker(cluster: LocalCluster, threshold: int, cooldown_s: float) -> None:
    for key, value in (("breaker.threshold", threshold), ("breaker.cooldown_s", cooldown_s)):
        assert call(cluster, "PUT", f"/v1/config/{key}", {"value": str(value)}).status_code == 200


def open_breaker(cluster: LocalCluster, worker: str, label: dict[str, str], failures: int) -> dict:
    """Tasks only `worker` may run, whose command does not exist: each an infrastructure failure there."""
    submit(cluster, [{"argv": [NO_SUCH_COMMAND], "requirements": {"labels": label}}] * failures)
    return until(lambda: (b := worker_view(cluster, worker).get("breaker", {})).get("state") == "open" and b, what="breaker open")


def test_breaker_opens_lets_one_probe_through_after_the_cooldown_and_closes(start_cluster, tmp_path):
    cluster = start_cluster(nodes=1)
    set_breaker(cluster, threshold=2, cooldown_s=2.0)
    label = {"pool": "breaker"}
    start_worker(cluster, "shaky", labels=label, slots=2)
    breaker = open_breaker(cluster, "shaky", label, failures=2)
    assert breaker["failures"] == 2
    go = tmp_path / "go"
    probe, follower = (t["id"] for t in submit(cluster, [
        {"argv": [wait_for_file(go)], "shell": True, "requirements": {"labels": label}},
        {"argv": ["true"], "requirements": {"labels": label}},
    ]))
    until(lambda: state_of(cluster, probe) == "running", what="the probe running")
    assert leases(task(cluster, probe))[0]["at"] >= breaker["opened_at"] + 2.0
    assert worker_view(cluster, "shaky")["breaker"]["state"] == "half_open" and worker_view(cluster, "shaky")["breaker"]["probe"] == probe
    assert state_of(cluster, follower) == "queued"  # a free slot, but the half-open breaker admits only the probe
    go.touch()
    until(lambda: state_of(cluster, follower) == "succeeded", what="work flowing again once the probe passed")
    assert worker_view(cluster, "shaky")["breaker"] == {"state": "closed", "failures": 0, "opened_at": 0.0, "probe": ""}
    assert leases(task(cluster, follower))[0]["at"] >= terminal(task(cluster, probe))[0]["at"]


def test_a_cancelled_probe_does_not_wedge_the_breaker(start_cluster):
    cluster = start_cluster(nodes=1)
    set_breaker(cluster, threshold=1, cooldown_s=1.0)
    label = {"pool": "breaker"}
    start_worker(cluster, "shaky", labels=label, slots=2)
    open_breaker(cluster, "shaky", label, failures=1)
    (probe,) = (t["id"] for t in submit(cluster, [{"argv": ["sleep", "300"], "requirements": {"labels": label}}]))
    until(lambda: state_of(cluster, probe) == "running", what="the probe running")
    assert call(cluster, "POST", f"/v1/tasks/{probe}/cancel").status_code == 200
    until(lambda: state_of(cluster, probe) == "cancelled", what="probe cancelled")
    (after,) = (t["id"] for t in submit(cluster, [{"argv": ["true"], "requirements": {"labels": label}}]))
    until(lambda: state_of(cluster, after) == "succeeded", timeout=5, what="a new probe after the cancelled one")


# ---- client features ---------------------------------------------------------------------------


def test_an_idempotency_key_returns_the_first_task(start_cluster):
    cluster = start_cluster(nodes=1)
    start_worker(cluster, "w1")
    spec = {"argv": ["true"], "idempotency_key": "build-42/test_a", "run_id": "idem"}
    first, same_batch = submit(cluster, [spec, spec])
    assert not first["duplicate"] and same_batch == {"id": first["id"], "state": "queued", "duplicate": True}
    until(lambda: state_of(cluster, first["id"]) == "succeeded", what="the task ran")
    (again,) = submit(cluster, [dict(spec, argv=["false"])])
    assert again == {"id": first["id"], "state": "succeeded", "duplicate": True}
    assert call(cluster, "GET", "/v1/runs/idem").json()["total"] == 1
    assert len(leases(task(cluster, first["id"]))) == 1


def test_cancel_a_queued_task_at_once_and_a_running_one_by_killing_its_process_group(start_cluster):
    cluster = start_cluster(nodes=1)
    worker = start_worker(cluster, "w1", slots=1)
    running, queued = (t["id"] for t in submit(cluster, [{"argv": ["sleep 300 & sleep 300; wait"], "shell": True}, {"argv": ["true"]}]))
    group = until(lambda: len(kids := psutil.Process(worker.pid).children(recursive=True)) == 3 and kids, what="sh and both sleeps running")
    until(lambda: state_of(cluster, running) == "running", what="the worker reported the start")
    reply = call(cluster, "POST", f"/v1/tasks/{queued}/cancel")
    assert reply.json()["state"] == "cancelled" and [h["reason"] for h in task(cluster, queued)["history"]] == ["submitted", "cancelled while queued"]
    reply = call(cluster, "POST", f"/v1/tasks/{running}/cancel")
    assert reply.json() == {"task_id": running, "state": "running", "cancel_requested": True}
    until(lambda: state_of(cluster, running) == "cancelled", what="the running task cancelled")
    assert task(cluster, running)["result"]["reason"] == "cancelled by the coordinator"
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert call(cluster, "POST", f"/v1/tasks/{running}/cancel").status_code == 409


def test_a_full_queue_sheds_submissions_until_workers_drain_it(start_cluster):
    cluster = start_cluster(nodes=1, max_queued_tasks=20)
    assert len(submit(cluster, [{"argv": ["true"], "run_id": "shed"}] * 20)) == 20
    shed = call(cluster, "POST", "/v1/tasks", {"tasks": [{"argv": ["true"], "run_id": "shed"}]})
    assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1 and "queue is full" in shed.json()["error"]["message"]
    assert call(cluster, "GET", "/v1/runs/shed").json()["total"] == 20  # nothing of the shed submission
    start_worker(cluster, "w1", slots=4)
    until(lambda: run_done(cluster, "shed"), what="the worker drained the queue")
    assert len(submit(cluster, [{"argv": ["true"], "run_id": "shed"}] * 20)) == 20


def test_sigterm_drains_a_worker_it_finishes_its_task_deregisters_and_exits_zero(start_cluster, tmp_path):
    cluster = start_cluster(nodes=1)
    label = {"pool": "draining"}
    worker = start_worker(cluster, "w1", labels=label, slots=2)
    go = tmp_path / "go"
    (first,) = (t["id"] for t in submit(cluster, [{"argv": [wait_for_file(go) + "; echo finished"], "shell": True, "requirements": {"labels": label}}]))
    until(lambda: state_of(cluster, first) == "running", what="task running")
    cluster.signal("w1", signal.SIGTERM)
    until(lambda: worker_view(cluster, "w1")["state"] == "draining", what="worker draining")
    (second,) = (t["id"] for t in submit(cluster, [{"argv": ["true"], "requirements": {"labels": label}}]))
    go.touch()
    assert worker.wait(timeout=30) == 0, log_of(cluster, "w1")
    view = task(cluster, first)
    assert view["state"] == "succeeded" and view["result"]["output_tail"] == "finished\n"
    assert [h["to_state"] for h in task(cluster, second)["history"]] == ["queued"]  # a free slot, but no more leasing
    assert worker_view(cluster, "w1")["state"] == "gone" and "deregistered" in log_of(cluster, "w1")
