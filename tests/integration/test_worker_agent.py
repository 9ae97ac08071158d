"""dtf-worker against the fake coordinator: the loops, failover, cancels, stale leases, SIGTERM drain."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import tomli_w
import trio

from dtfd.devcluster import LocalCluster, write_configs
from dtfd.server.notify import Notifier
from dtfd.worker import config
from dtfd.worker.agent import BATCH_BYTES, CARRY_BYTES, LEASE_HOLD_S, Agent
from dtfd.worker.client import Client
from dtfd.worker.runner import Result
from dtfd.worker.spool import Spool
from tests.integration.fake_coordinator import TOKEN, FakeCoordinator
from tests.integration.test_workload import _until

pytestmark = pytest.mark.integration
PY = sys.executable
DEAD_URL = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


async def wait_for(predicate: Callable[[], object], fake: FakeCoordinator, timeout: float = 15) -> None:
    """Until `predicate()` holds; re-checked whenever the fake sees a request, and every 50 ms."""
    with trio.fail_after(timeout):
        while not predicate():
            with trio.move_on_after(0.05):
                await fake.changed.wait()


def waits_for(marker: Path, then: str = "") -> str:
    """A task script that runs until `marker` exists: the test decides when the task ends."""
    return f"import os, time\nwhile not os.path.exists({str(marker)!r}): time.sleep(0.02)\n{then}"


def write_config(tmp_path: Path, urls: list[str], **tasks: object) -> Path:
    path = tmp_path / "worker.toml"
    document = {
        "coordinator": {"urls": urls, "token": TOKEN, "request_timeout_s": 1.0, "lease_wait_s": 1.0},
        "worker": {"id": "w1", "labels": {"os": "linux"}, "slots": 2, "work_dir": str(tmp_path / "work")},
        "tasks": {"kill_grace_s": 1.0, **tasks},
    }
    path.write_text(tomli_w.dumps(document))
    return path


@asynccontextmanager
async def running_agent(tmp_path: Path, urls: list[str], **tasks: object) -> AsyncIterator[tuple[Agent, trio.Event]]:
    cfg = config.load(write_config(tmp_path, urls, **tasks))
    stop = trio.Event()
    async with Client(cfg.config.coordinator.urls, cfg.token, request_timeout_s=1.0) as client:
        agent = Agent(cfg, client, Notifier())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run, stop)
            yield agent, stop
            stop.set()


async def test_registers_leases_runs_and_reports(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        async with running_agent(tmp_path, [front.url]):
            ids = [fake.submit([PY, "-c", f"print('task {n}')"]) for n in range(3)]
            await wait_for(lambda: all(i in fake.results for i in ids), fake)
        nursery.cancel_scope.cancel()
    registration = fake.workers["w1"]
    assert registration["labels"] == {"os": "linux"} and registration["slots"] == 2
    assert registration["cpus"] >= 1 and registration["memory_mb"] >= 1
    for n, task_id in enumerate(ids):
        result = fake.results[task_id]
        assert (result["status"], result["exit_code"], result["output_tail"]) == ("succeeded", 0, f"task {n}\n")
    lease_calls = [c for c in fake.calls if c.route == "lease"]
    assert all(1 <= c.body["max"] <= 2 for c in lease_calls)
    assert not registration["registered"]  # deregistered on stop
    assert any(c.body.get("results") for c in lease_calls)  # results ride on the next lease request


async def test_several_leases_at_once_started_with_one_request(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        ids = [fake.submit([PY, "-c", "pass"]) for _ in range(2)]
        async with running_agent(tmp_path, [front.url]):
            await wait_for(lambda: all(i in fake.results for i in ids), fake)
        nursery.cancel_scope.cancel()
    first_lease = next(c for c in fake.calls if c.route == "lease")
    assert first_lease.body["max"] == 2
    assert fake.tasks[ids[0]].lease_id != fake.tasks[ids[1]].lease_id
    starts = [c for c in fake.calls if c.route == "start"]
    assert len(starts) == 1 and sorted(s["task_id"] for s in starts[0].body["started"]) == sorted(ids)


async def test_results_not_in_flight_go_together_and_big_ones_do_not_ride_on_leases(tmp_path):
    cfg = config.load(write_config(tmp_path, [DEAD_URL]))
    async with Client(cfg.config.coordinator.urls, cfg.token) as client:
        agent = Agent(cfg, client, Notifier())
    for n in range(3):
        agent.pending[f"L{n}"] = Result(task_id=f"t{n}", lease_id=f"L{n}", status="succeeded")
    agent.pending["big"] = Result(task_id="tb", lease_id="big", status="failed", output_tail="x" * CARRY_BYTES)
    agent.in_flight = {"L0"}
    carried = agent._take_results(CARRY_BYTES)
    assert [r["lease_id"] for r in carried] == ["L1", "L2"]
    alone = agent._take_results(BATCH_BYTES)
    assert [r["lease_id"] for r in alone] == ["big"]
    agent._untake(carried + alone)
    assert agent.in_flight == {"L0"}


async def test_a_freed_slot_waits_briefly_for_the_others_so_one_lease_round_carries_several(tmp_path, autojump_clock):
    cfg = config.load(write_config(tmp_path, [DEAD_URL]))  # 2 slots
    async with Client(cfg.config.coordinator.urls, cfg.token) as client:
        agent = Agent(cfg, client, Notifier())
    for frees_after in ([0.0], [0.0, 0.005]):
        agent.running = {"a": None, "b": None}
        asked: list[tuple[float, int]] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                free = await agent._free_slots()
                asked.append((trio.current_time(), free))

            nursery.start_soon(ask)
            started = trio.current_time()
            for lease_id, at in zip(("a", "b"), frees_after):
                await trio.sleep_until(started + at)
                del agent.running[lease_id]
                agent.changed.fire()
        ((when, free),) = asked
        if len(frees_after) == 1:
            assert (free, when - started) == (1, pytest.approx(LEASE_HOLD_S)), "one free slot is leased for after the hold"
        else:
            assert (free, when - started) == (2, pytest.approx(0.005)), "once every slot is free there is nothing to wait for"


async def test_results_are_resent_after_503_and_fail_over_to_the_next_url(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        first, second = await fake.listen(nursery), await fake.listen(nursery)
        first.failing["results"] = 503
        async with running_agent(tmp_path, [first.url, second.url]):
            task_id = fake.submit([PY, "-c", "print('done')"])
            await wait_for(lambda: task_id in fake.results, fake)
        nursery.cancel_scope.cancel()
    assert fake.count("results", "node1") >= 1 and fake.count("results", "node2") >= 1
    assert fake.results[task_id]["status"] == "succeeded"


async def test_running_task_survives_coordinator_outage_and_result_is_delivered(tmp_path):
    """The worker's node goes away mid-task; the task keeps running; the result goes to another node."""
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        first, second = await fake.listen(nursery), await fake.listen(nursery)
        second.failing.update(results=503, heartbeat=503)  # second is no help at first
        marker = tmp_path / "go"
        script = waits_for(marker, then="print('finished')")
        async with running_agent(tmp_path, [DEAD_URL, first.url, second.url]):
            task_id = fake.submit([PY, "-c", script])
            await wait_for(lambda: fake.tasks[task_id].state == "running", fake)
            first.scope.cancel()  # node1 is gone: its connections and its port
            calls = len(fake.calls)
            await wait_for(lambda: fake.count("heartbeat", "node2") >= 2 and len(fake.calls) > calls + 2, fake)
            marker.touch()
            await wait_for(lambda: fake.count("results", "node2") >= 2, fake)
            assert task_id not in fake.results
            second.failing.clear()
            await wait_for(lambda: task_id in fake.results, fake)
        nursery.cancel_scope.cancel()
    result = fake.results[task_id]
    assert (result["status"], result["output_tail"]) == ("succeeded", "finished\n")


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for its reaper has ended)."""
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def _descendants() -> list[psutil.Process]:
    return _alive(psutil.Process().children(recursive=True))


async def test_cancel_from_the_heartbeat_kills_the_running_task(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        async with running_agent(tmp_path, [front.url]):
            task_id = fake.submit(["sleep", "300"])
            await wait_for(lambda: fake.tasks[task_id].state == "running" and _descendants(), fake)
            fake.cancel(task_id)
            await wait_for(lambda: task_id in fake.results, fake)
            assert not _descendants()
        nursery.cancel_scope.cancel()
    result = fake.results[task_id]
    assert (result["status"], result["reason"]) == ("cancelled", "cancelled by the coordinator")


async def test_unknown_lease_is_stopped_and_not_reported(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            task_id = fake.submit(["sleep", "300"])
            await wait_for(lambda: fake.tasks[task_id].state == "running" and _descendants(), fake)
            fake.forget(task_id)
            await wait_for(lambda: not agent.running and not _descendants(), fake)
            assert not agent.pending
        nursery.cancel_scope.cancel()
    assert fake.result_posts(fake.tasks[task_id].lease_id) == 0


async def test_stale_lease_refusal_is_accepted_without_retries(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        marker = tmp_path / "go"
        script = waits_for(marker)
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            task_id = fake.submit([PY, "-c", script])
            await wait_for(lambda: fake.tasks[task_id].state == "running", fake)
            lease_id = fake.tasks[task_id].lease_id
            fake.requeue(task_id)
            marker.touch()
            await wait_for(lambda: fake.result_posts(lease_id) == 1 and not agent.pending, fake)
            heartbeats = fake.count("heartbeat")
            await wait_for(lambda: fake.count("heartbeat") >= heartbeats + 3, fake)
            assert fake.result_posts(lease_id) == 1
        nursery.cancel_scope.cancel()
    assert task_id not in fake.results


async def test_a_batch_refused_as_invalid_goes_one_by_one_and_only_the_bad_result_is_dropped(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        marker = tmp_path / "go"
        script = waits_for(marker)
        good, bad = (fake.submit([PY, "-c", script]) for _ in range(2))
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            await wait_for(lambda: len(agent.running) == 2, fake)
            front.failing.update(results=503, lease=503)  # results pile up while both tasks finish
            marker.touch()
            await wait_for(lambda: len(agent.pending) == 2, fake)
            fake.invalid.add(bad)
            front.failing.clear()
            await wait_for(lambda: not agent.pending, fake)
            bad_lease = fake.tasks[bad].lease_id
            refused = fake.result_posts(bad_lease)
            heartbeats = fake.count("heartbeat")
            await wait_for(lambda: fake.count("heartbeat") >= heartbeats + 3, fake)
            assert fake.result_posts(bad_lease) == refused  # dropped once refused alone: never sent again
        nursery.cancel_scope.cancel()
    assert good in fake.results and bad not in fake.results
    alone = [c for c in fake.calls if c.route == "results" and [r["task_id"] for r in c.body["results"]] == [bad]]
    assert alone, "after the batch was refused, the bad result went on its own"


async def test_start_refused_as_stale_means_the_task_does_not_run(tmp_path):
    fake = FakeCoordinator()
    fake.refuse_starts = True
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            task_id = fake.submit([PY, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
            await wait_for(lambda: any(c.body.get("started") for c in fake.calls) and not agent.running, fake)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "ran").exists() and task_id not in fake.results
    assert fake.result_posts(fake.tasks[task_id].lease_id) == 0


async def test_a_start_no_coordinator_records_means_the_task_does_not_run(tmp_path):
    """An unrecorded start lets the coordinator take the lease back without counting the attempt
    (found by the chaos suite: a task ran max_retries + 2 times), so the task must not run."""
    fake = FakeCoordinator(lost_after_s=1.0)
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        front.failing["start"] = 503
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            task_id = fake.submit([PY, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
            await wait_for(lambda: fake.count("start") >= 2 and not agent.running, fake)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "ran").exists() and task_id not in fake.results and fake.count("results") == 0


async def test_unacknowledged_results_are_spooled_and_resent_by_the_next_worker(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        front.failing["results"] = 503
        async with running_agent(tmp_path, [front.url], drain_timeout_s=5.0) as (agent, stop):
            task_id = fake.submit([PY, "-c", "print('spooled')"])
            await wait_for(lambda: agent.pending, fake)
        assert b"spooled" in (tmp_path / "work" / "results-w1.jsonl").read_bytes()
        assert task_id not in fake.results
        front.failing.clear()
        async with running_agent(tmp_path, [front.url]):
            await wait_for(lambda: task_id in fake.results, fake)
        nursery.cancel_scope.cancel()
    assert fake.results[task_id]["output_tail"] == "spooled\n"
    assert Spool(tmp_path / "work" / "results-w1.jsonl").load() == []


def _worker_command() -> list[str]:
    script = shutil.which("dtf-worker") or str(Path(sys.executable).parent / "dtf-worker")
    return [script]


async def test_a_result_spooled_before_kill_9_is_sent_once_by_the_restarted_worker(tmp_path):
    """The spool outlives a SIGKILL of the worker: the next one sends the result once, and the one after that not at all."""
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        write_config(tmp_path, [front.url])
        marker = tmp_path / "go"
        task_id = fake.submit([PY, "-c", waits_for(marker, then="print('spooled')")])
        with open(tmp_path / "worker.log", "wb") as stderr:
            proc = await trio.lowlevel.open_process([*_worker_command(), "--config", str(tmp_path / "worker.toml")], stderr=stderr)
            try:
                await wait_for(lambda: fake.tasks[task_id].state == "running", fake)
                lease_id = fake.tasks[task_id].lease_id
                front.failing.update(results=503, lease=503)  # the result can be spooled, not delivered
                marker.touch()
                await wait_for(lambda: fake.result_posts(lease_id) >= 1, fake)
                proc.kill()
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
        assert b"spooled" in (tmp_path / "work" / "results-w1.jsonl").read_bytes()
        front.failing.clear()
        sent_before = fake.result_posts(lease_id)
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            await wait_for(lambda: task_id in fake.results and not agent.pending, fake)
            heartbeats = fake.count("heartbeat")
            await wait_for(lambda: fake.count("heartbeat") >= heartbeats + 2, fake)
        assert fake.result_posts(lease_id) == sent_before + 1
        async with running_agent(tmp_path, [front.url]) as (agent, _):
            heartbeats = fake.count("heartbeat")
            await wait_for(lambda: fake.count("heartbeat") >= heartbeats + 2, fake)
            assert not agent.pending
        assert fake.result_posts(lease_id) == sent_before + 1
        nursery.cancel_scope.cancel()
    assert (fake.results[task_id]["status"], fake.results[task_id]["output_tail"]) == ("succeeded", "spooled\n")


async def sigterm_worker(tmp_path: Path, fake: FakeCoordinator, started: Callable[[], object], env: dict | None = None) -> tuple[int, list]:
    """Run the real dtf-worker, SIGTERM it once `started()` holds and it has task processes.

    Returns its exit code and the task processes it had when signalled."""
    with open(tmp_path / "worker.log", "wb") as stderr:
        proc = await trio.lowlevel.open_process([*_worker_command(), "--config", str(tmp_path / "worker.toml")], env=env, stderr=stderr)
        try:
            await wait_for(lambda: started() and psutil.Process(proc.pid).children(recursive=True), fake)
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
    return code, children


async def test_sigterm_drains_finishes_the_running_task_deregisters_and_exits_zero(tmp_path):
    fake = FakeCoordinator()
    notify_path = str(tmp_path / "notify.sock")
    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    seen: list[str] = []

    async def collect() -> None:
        while True:
            seen.append((await notify.recv(4096)).decode())

    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        nursery.start_soon(collect)
        write_config(tmp_path, [front.url])
        marker = tmp_path / "started"
        task_id = fake.submit([PY, "-c", f"import time; open({str(marker)!r}, 'w'); time.sleep(1); print('finished')"])
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
        code, children = await sigterm_worker(tmp_path, fake, marker.exists, env)
        log = (tmp_path / "worker.log").read_text()
        assert code == 0, log
        await wait_for(lambda: any("STOPPING=1" in s for s in seen), fake)
        nursery.cancel_scope.cancel()
    assert fake.results[task_id]["status"] == "succeeded" and fake.results[task_id]["output_tail"] == "finished\n"
    assert fake.workers["w1"]["draining"] and not fake.workers["w1"]["registered"]
    assert children and not _alive(children)
    assert "READY=1" in seen and "WATCHDOG=1" in seen and any(s.startswith("STATUS=running 1/2") for s in seen)
    assert seen.index("READY=1") < seen.index("STOPPING=1")
    assert "Traceback" not in log and "deregistered" in log


async def test_sigterm_past_the_drain_deadline_cancels_the_task_as_worker_shutdown(tmp_path):
    fake = FakeCoordinator()
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        write_config(tmp_path, [front.url], drain_timeout_s=0.5)
        task_id = fake.submit(["sleep", "300"])
        code, children = await sigterm_worker(tmp_path, fake, lambda: fake.tasks[task_id].state == "running")
        assert code == 0, (tmp_path / "worker.log").read_text()
        nursery.cancel_scope.cancel()
    result = fake.results[task_id]
    assert (result["status"], result["reason"]) == ("cancelled", "worker shutdown")
    assert children and not _alive(children)


def test_bad_config_exits_78_with_one_line(tmp_path):
    path = tmp_path / "worker.toml"
    path.write_text('[worker]\nslotz = 2\n')
    result = subprocess.run([*_worker_command(), "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "worker: Object contains unknown field `slotz`" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_against_a_real_cluster_with_a_leader_kill(tmp_path):
    """The real coordinator: results, JUnit, a cancel, a leader killed mid-task, SIGTERM deregistering."""
    cluster = LocalCluster(write_configs(tmp_path / "cluster", workload={"heartbeat_s": 0.5, "lost_after_s": 3.0}))
    cluster.start_all()
    worker = None
    try:
        cluster.wait_leader()
        files = cluster.files
        path = write_config(tmp_path, [f"http://{files.api[n]}" for n in files.node_ids])
        document = tomllib.loads(path.read_text())
        document["coordinator"]["token"] = files.worker_token
        path.write_text(tomli_w.dumps(document))
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([*_worker_command(), "--config", str(path)], stderr=log)
        log.close()

        def call(method: str, route: str, body: dict | None = None) -> dict:
            leader = cluster.wait_leader()
            with cluster.client(leader) as c:
                return c.request(method, route, json=body).json()

        def task(task_id: str) -> dict:
            return call("GET", f"/v1/tasks/{task_id}")

        marker = tmp_path / "go"
        report = '<testsuite><testcase classname="s" name="ok" time="0.5"/><testcase classname="s" name="bad"><failure message="no"/></testcase></testsuite>'
        specs = [
            {"argv": [PY, "-c", "print('pass')"], "name": "pass"},
            {"argv": [PY, "-c", "raise SystemExit(3)"], "name": "fail"},
            {"argv": [PY, "-c", f"open('r.xml', 'w').write({report!r})"], "junit": "r.xml", "name": "junit"},
            {"argv": [PY, "-c", waits_for(marker, then="print('survived')")]},
        ]
        ids = [t["id"] for t in call("POST", "/v1/tasks", {"tasks": specs})["tasks"]]
        done = ("succeeded", "failed", "timed_out", "cancelled")
        _until(lambda: all(task(i)["state"] in done for i in ids[:3]), what="first tasks finished")
        passed, failed, junit = (task(i) for i in ids[:3])
        assert passed["state"] == "succeeded" and passed["result"]["output_tail"] == "pass\n"
        assert failed["state"] == "failed" and failed["result"]["exit_code"] == 3
        assert [(c["name"], c["status"]) for c in junit["result"]["junit"]] == [("ok", "passed"), ("bad", "failed")]

        _until(lambda: task(ids[3])["state"] == "running", what="long task running")
        leader = cluster.wait_leader()
        cluster.kill(leader)
        survivors = [n for n in files.node_ids if n != leader]
        cluster.wait_leader(among=survivors)
        marker.touch()
        survived = _until(lambda: (t := task(ids[3]))["state"] in done and t, what="task finished after the leader kill")
        assert survived["state"] == "succeeded" and survived["result"]["output_tail"] == "survived\n"
        assert survived["attempt"] == 1

        sleeper = call("POST", "/v1/tasks", {"tasks": [{"argv": ["sleep", "300"]}]})["tasks"][0]["id"]
        _until(lambda: task(sleeper)["state"] == "running", what="sleeper running")
        call("POST", f"/v1/tasks/{sleeper}/cancel")
        cancelled = _until(lambda: (t := task(sleeper))["state"] in done and t, what="sleeper cancelled")
        assert cancelled["state"] == "cancelled" and cancelled["result"]["reason"] == "cancelled by the coordinator"

        worker.terminate()
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
        workers = {w["id"]: w for w in call("GET", "/v1/workers")["workers"]}
        assert workers["w1"]["state"] == "gone"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        cluster.stop_all()
