"""The workload rules every node applies alike: leases, retries, breakers, exactly one result."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtfd.state import tasks as t
from dtfd.state.machine import Envelope, StateMachine, encode_envelope


class Cluster:
    """One state machine fed commands as the leader would propose them."""

    def __init__(self) -> None:
        self.machine = StateMachine()
        self.now = 1000.0
        self._seq = itertools.count(1)

    def apply(self, command, at: float | None = None):
        if at is not None:
            self.now = at
        envelope = Envelope("test", next(self._seq), self.now, command)
        return self.machine.apply(self.machine.applied + 1, encode_envelope(envelope))

    @property
    def workload(self) -> t.Workload:
        return self.machine.image.workload

    def task(self, task_id: str) -> t.Task:
        return self.workload.tasks[task_id]

    def register(self, worker: str = "w1", labels: dict | None = None, slots: int = 4) -> None:
        assert self.apply(t.RegisterWorker(worker, labels or {"os": "linux"}, 4.0, 8192, slots)).ok

    def submit(self, **spec) -> str:
        spec.setdefault("argv", ["true"])
        result = self.apply(t.SubmitTasks([t.TaskSpec(**spec)]))
        assert result.ok, result
        return result.value[0]["id"]

    def lease(self, task_id: str, worker: str = "w1", lease_id: str | None = None) -> str | None:
        lease_id = lease_id or f"L{next(self._seq)}"
        result = self.apply(t.AssignTasks(worker, [t.Assignment(task_id, lease_id, self.now + 60)]))
        return lease_id if result.ok and result.value else None

    def fail_infrastructure(self, times: int, worker: str = "w1") -> None:
        """Tasks `worker` could not even run: what opens its breaker."""
        for _ in range(times):
            task_id = self.submit()
            self.finish(task_id, self.lease(task_id, worker), status="error", reason="argv[0] not found")

    def start(self, task_id: str, lease_id: str) -> dict:
        return self.apply(t.ReportTasks(started=[t.LeaseRef(task_id, lease_id)])).value["started"][0]

    def finish(self, task_id: str, lease_id: str, status: str = "succeeded", **outcome) -> dict:
        exit_code = 0 if status == "succeeded" else 1
        report = t.Report(task_id, lease_id, t.Outcome(status=status, exit_code=exit_code, **outcome))
        return self.apply(t.ReportTasks(finished=[report])).value["results"][0]


def test_task_runs_through_its_states_and_every_transition_is_recorded():
    c = Cluster()
    c.register()
    task_id = c.submit(name="unit")
    lease = c.lease(task_id)
    assert c.task(task_id).state == t.LEASED
    assert c.start(task_id, lease)["accepted"]
    assert c.finish(task_id, lease)["accepted"]
    task = c.task(task_id)
    assert task.state == t.SUCCEEDED and task.result.exit_code == 0
    assert [(h.from_state, h.to_state) for h in task.history] == [("", "queued"), ("queued", "leased"), ("leased", "running"), ("running", "succeeded")]


def test_result_for_a_stale_lease_is_refused_so_a_task_has_exactly_one_result():
    c = Cluster()
    c.register("w1")
    c.register("w2")
    task_id = c.submit(max_retries=1)
    first = c.lease(task_id, "w1")
    c.apply(t.RemoveWorker("w1", lost=True))  # w1 stopped heartbeating: requeued, attempt counted
    assert c.task(task_id).state == t.QUEUED and c.task(task_id).attempt == 1
    c.now = c.task(task_id).not_before
    second = c.lease(task_id, "w2")
    late = c.finish(task_id, first)
    assert late == {"task_id": task_id, "lease_id": first, "accepted": False, "error": "stale_lease"}
    assert c.finish(task_id, second)["accepted"]
    assert c.finish(task_id, second)["accepted"]  # a re-send is acknowledged, not applied twice
    task = c.task(task_id)
    assert task.state == t.SUCCEEDED and task.attempt == 2
    assert sum(1 for h in task.history if h.to_state == t.SUCCEEDED) == 1


def test_failures_retry_with_capped_deterministic_backoff_until_attempts_run_out():
    c = Cluster()
    c.register()
    task_id = c.submit(max_retries=2, backoff=t.Backoff(base_s=2.0, max_s=3.0))
    delays = []
    for attempt in range(1, 4):
        lease = c.lease(task_id)
        assert lease, attempt
        c.finish(task_id, lease, status="failed")
        task = c.task(task_id)
        if attempt < 3:
            assert task.state == t.QUEUED
            delays.append(task.not_before - c.now)
            assert c.lease(task_id) is None  # not before its backoff
            c.now = task.not_before
    assert c.task(task_id).state == t.FAILED and c.task(task_id).attempt == 3
    assert 1.0 <= delays[0] <= 2.0 and 1.5 <= delays[1] <= 3.0  # exponential, jittered in [50%, 100%], capped
    backoff = t.Backoff(base_s=2.0, max_s=3.0)
    assert delays == pytest.approx([t.retry_delay(task_id, 1, backoff), t.retry_delay(task_id, 2, backoff)])


def test_assignment_respects_labels_resources_slots_and_draining():
    c = Cluster()
    c.register("w1", {"os": "linux"}, slots=1)
    gpu = c.submit(requirements=t.Requirements(labels={"gpu": "webgpu"}))
    big = c.submit(requirements=t.Requirements(min_memory_mb=1 << 20))
    first, second = c.submit(), c.submit()
    assert c.lease(gpu) is None and c.lease(big) is None
    assert c.lease(first) is not None
    assert c.lease(second) is None  # one slot, already used
    c.register("w2")
    c.apply(t.SetDraining("w2", True))
    assert c.lease(second, "w2") is None
    c.apply(t.SetDraining("w2", False))
    assert c.lease(second, "w2") is not None


def test_breaker_opens_on_infrastructure_failures_lets_one_probe_through_and_closes_on_success():
    c = Cluster()
    c.register()
    c.fail_infrastructure(t.BREAKER_THRESHOLD)
    assert c.workload.workers["w1"].breaker.state == "open"
    probe, other = c.submit(), c.submit()
    assert c.lease(probe) is None  # open: nothing during the cool-down
    c.now += t.BREAKER_COOLDOWN_S
    lease = c.lease(probe)
    assert lease and c.workload.workers["w1"].breaker.state == "half_open"
    assert c.lease(other) is None  # exactly one probe
    c.finish(probe, lease)
    assert c.workload.workers["w1"].breaker.state == "closed"
    assert c.lease(other) is not None


def test_half_open_probe_failure_reopens_the_breaker():
    c = Cluster()
    c.register()
    c.fail_infrastructure(t.BREAKER_THRESHOLD)
    c.now += t.BREAKER_COOLDOWN_S
    probe = c.submit()
    c.finish(probe, c.lease(probe), status="failed")
    breaker = c.workload.workers["w1"].breaker
    assert breaker.state == "open" and breaker.opened_at == c.now


def test_a_task_failing_on_one_worker_and_passing_on_another_counts_against_the_first():
    c = Cluster()
    c.register("bad")
    c.register("good")
    for _ in range(t.BREAKER_THRESHOLD):
        task_id = c.submit(max_retries=1, backoff=t.Backoff(base_s=0.001, max_s=0.001))
        c.finish(task_id, c.lease(task_id, "bad"), status="failed")
        c.now += 1
        c.finish(task_id, c.lease(task_id, "good"))
    assert c.workload.workers["bad"].breaker.state == "open"
    assert c.workload.workers["good"].breaker.state == "closed"


def test_idempotency_key_returns_the_first_task_and_invalid_batches_apply_nothing():
    c = Cluster()
    first = c.submit(idempotency_key="build-42")
    again = c.apply(t.SubmitTasks([t.TaskSpec(argv=["other"], idempotency_key="build-42")])).value
    assert again == [{"id": first, "state": "queued", "duplicate": True}]
    before = dict(c.workload.tasks)
    bad = c.apply(t.SubmitTasks([t.TaskSpec(argv=["ok"]), t.TaskSpec(argv=["a", "b"], shell=True)]))
    assert not bad.ok and bad.error == "invalid" and "argv" in bad.value["problem"]
    out_of_bounds = c.apply(t.SubmitTasks([t.TaskSpec(argv=["ok"]), t.TaskSpec(argv=[])]))  # bounds hold when the entry decodes
    assert not out_of_bounds.ok and out_of_bounds.error == "undecodable"
    assert c.workload.tasks == before


def test_cancel_queued_at_once_running_through_the_worker():
    c = Cluster()
    c.register()
    queued, running = c.submit(), c.submit(max_retries=3)
    assert c.apply(t.CancelTask(queued)).value["state"] == t.CANCELLED
    lease = c.lease(running)
    c.start(running, lease)
    assert c.apply(t.CancelTask(running)).value["cancel_requested"]
    c.finish(running, lease, status="failed", reason="killed")  # even a failure ends it cancelled, no retry
    assert c.task(running).state == t.CANCELLED
    assert not c.apply(t.CancelTask(running)).ok


def test_expired_lease_times_a_running_attempt_out_and_requeues_one_never_started():
    c = Cluster()
    c.register()
    running = c.submit()
    lease = c.lease(running)
    c.start(running, lease)
    assert c.apply(t.ExpireLease(running, lease)).ok
    assert c.task(running).state == t.TIMED_OUT
    assert not c.apply(t.ExpireLease(running, lease)).ok
    unstarted = c.submit()
    lease = c.lease(unstarted)
    assert c.apply(t.ExpireLease(unstarted, lease)).ok  # it never ran, so it did not time out
    assert c.task(unstarted).state == t.QUEUED and c.task(unstarted).attempt == 0
    other = c.submit(max_retries=1)
    c.lease(other)
    c.apply(t.RemoveWorker("w1", lost=False))
    assert c.task(other).state == t.QUEUED
    assert c.task(other).history[-1].reason == "retry after worker deregistered"


def test_a_lease_never_taken_up_returns_to_the_queue_without_counting_the_attempt():
    c = Cluster()
    c.register()
    task_id = c.submit(max_retries=0)
    lease = c.lease(task_id)
    assert c.apply(t.ReturnLease(task_id, lease)).ok
    assert (c.task(task_id).state, c.task(task_id).attempt) == (t.QUEUED, 0)
    again = c.lease(task_id)
    c.start(task_id, again)
    assert not c.apply(t.ReturnLease(task_id, again)).ok  # a started lease is not "not taken up"
    assert c.finish(task_id, again)["accepted"] and c.task(task_id).state == t.SUCCEEDED


def test_a_cancelled_probe_releases_the_breaker_for_the_next_one():
    c = Cluster()
    c.register()
    c.fail_infrastructure(t.BREAKER_THRESHOLD)
    c.now += t.BREAKER_COOLDOWN_S
    probe, nxt = c.submit(), c.submit()
    lease = c.lease(probe)
    c.start(probe, lease)
    c.apply(t.CancelTask(probe))
    c.finish(probe, lease, status="cancelled")
    assert c.workload.workers["w1"].breaker.state == "open" and c.lease(nxt) is not None  # the next probe goes


commands = st.one_of(
    st.builds(t.RegisterWorker, st.sampled_from(["w1", "w2"]), st.just({"os": "linux"}), st.just(2.0), st.just(1024), st.integers(1, 3)),
    st.builds(t.SubmitTasks, st.lists(st.builds(t.TaskSpec, argv=st.just(["x"]), max_retries=st.integers(0, 2)), min_size=1, max_size=3)),
    st.builds(t.AssignTasks, st.sampled_from(["w1", "w2"]), st.lists(st.builds(t.Assignment, st.sampled_from([f"t{i}.0" for i in range(1, 12)]), st.text("abc", min_size=1, max_size=3), st.just(99.0)), max_size=2)),
    st.builds(
        t.ReportTasks,
        st.lists(st.builds(t.LeaseRef, st.sampled_from([f"t{i}.0" for i in range(1, 12)]), st.text("abc", min_size=1, max_size=3)), max_size=2),
        st.lists(st.builds(t.Report, st.sampled_from([f"t{i}.0" for i in range(1, 12)]), st.text("abc", min_size=1, max_size=3), st.builds(t.Outcome, status=st.sampled_from(get_args(t.Status)))), max_size=2),
    ),
    st.builds(t.RemoveWorker, st.sampled_from(["w1", "w2"]), st.booleans()),
    st.builds(t.CancelTask, st.sampled_from([f"t{i}.0" for i in range(1, 12)])),
    st.builds(t.ReturnLease, st.sampled_from([f"t{i}.0" for i in range(1, 12)]), st.text("abc", min_size=1, max_size=3)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(commands, st.floats(0, 100)), max_size=25), st.lists(st.tuples(commands, st.floats(0, 100)), max_size=8))
def test_workload_snapshot_restores_exactly_and_replicas_agree(prefix, suffix):
    a, b = Cluster(), Cluster()
    for command, at in prefix:
        assert a.apply(command, at) == b.apply(command, at)
    restored = Cluster()
    restored.machine.restore(a.machine.snapshot())
    restored._seq = itertools.count(len(prefix) + 1)
    a._seq = itertools.count(len(prefix) + 1)
    assert restored.machine.checksum() == a.machine.checksum()
    for command, at in suffix:
        assert restored.apply(command, at) == a.apply(command, at)
    assert restored.machine.checksum() == a.machine.checksum()
    assert set(a.workload.open) == {task.id for task in a.workload.tasks.values() if task.state not in t.TERMINAL}
    for task in a.workload.tasks.values():
        assert task.attempt <= task.spec.max_retries + 1
        assert sum(1 for h in task.history if h.to_state in t.TERMINAL) <= 1


def test_breaker_policy_comes_from_the_replicated_configuration():
    from dtfd.state.machine import SetConfig

    c = Cluster()
    c.apply(SetConfig("breaker.threshold", "1"))
    c.apply(SetConfig("breaker.cooldown_s", "2"))
    c.register()
    task_id = c.submit()
    c.finish(task_id, c.lease(task_id), status="error")
    assert c.workload.workers["w1"].breaker.state == "open"  # one failure is enough now
    probe = c.submit()
    c.now += 2
    assert c.lease(probe) is not None  # and the cool-down is 2 s


def test_the_open_index_holds_exactly_the_unfinished_tasks():
    """Scheduling scans this index, not every task ever submitted: it must never miss or keep one."""
    c = Cluster()
    c.register()
    ids = [c.submit(max_retries=1) for _ in range(4)]
    c.apply(t.CancelTask(ids[0]))
    lease = c.lease(ids[1])
    c.finish(ids[1], lease)
    lease = c.lease(ids[2])
    c.finish(ids[2], lease, status="failed")  # retried: still open
    assert set(c.workload.open) == {ids[2], ids[3]}
    assert set(c.workload.open) == {task.id for task in c.workload.tasks.values() if task.state not in t.TERMINAL}


def test_a_result_before_its_start_report_still_records_the_run_and_the_late_start_is_harmless():
    c = Cluster()
    c.register()
    task_id = c.submit()
    lease = c.lease(task_id)
    assert c.finish(task_id, lease)["accepted"]
    assert c.start(task_id, lease) == {"task_id": task_id, "lease_id": lease, "accepted": True, "error": "", "cancel_requested": False}
    task = c.task(task_id)
    assert task.state == t.SUCCEEDED
    assert [(h.from_state, h.to_state) for h in task.history] == [("", "queued"), ("queued", "leased"), ("leased", "running"), ("running", "succeeded")]


def test_starts_in_one_command_answer_each_lease_on_its_own():
    c = Cluster()
    c.register(slots=2)
    first, second = c.submit(), c.submit()
    lease_first, lease_second = c.lease(first), c.lease(second)
    c.apply(t.CancelTask(second))
    refs = [t.LeaseRef(first, lease_first), t.LeaseRef(second, lease_second), t.LeaseRef(first, "stale")]
    answers = c.apply(t.ReportTasks(started=refs)).value["started"]
    assert [(a["accepted"], a["error"], a["cancel_requested"]) for a in answers] == [(True, "", False), (True, "", True), (False, "stale_lease", False)]
    assert c.task(first).state == c.task(second).state == t.RUNNING


def _reference_pick(workload: t.Workload, worker: t.Worker, room: int, now: float) -> list[str]:
    """The rule without the queues: scan every task."""
    active = Counter(task.spec.run_id for task in workload.tasks.values() if task.state in t.ACTIVE)
    queued = [
        task
        for task in workload.tasks.values()
        if task.state == t.QUEUED and task.not_before <= now and not task.cancel_requested and t.fits(task.spec.requirements, worker)
    ]
    picked: list[str] = []
    while queued and len(picked) < room:
        best = min(queued, key=lambda task: (-task.spec.priority, active[task.spec.run_id], task.order))
        queued.remove(best)
        active[best.spec.run_id] += 1
        picked.append(best.id)
    return picked


def _random_step(c: Cluster, rng: random.Random, leases: dict[str, str]) -> None:
    """One command as a busy cluster would see it: mostly valid leases and reports, some stale."""
    workload, roll = c.workload, rng.random()
    workers = [w for w in workload.workers.values() if w.state == "active"]
    c.now += rng.choice([0.0, 0.5, 5.0])
    if roll < 0.1 or not workers:
        labels = rng.choice([{}, {"os": "linux"}, {"os": "linux", "gpu": "x"}])
        c.apply(t.RegisterWorker(rng.choice(["w1", "w2", "w3"]), labels, 4.0, 8192, rng.randint(1, 4)))
    elif roll < 0.35:
        specs = [
            t.TaskSpec(
                argv=["x"],
                max_retries=rng.randint(0, 2),
                priority=rng.randint(0, 1),
                run_id=rng.choice(["", "a", "b"]),
                requirements=rng.choice([t.Requirements(), t.Requirements(labels={"os": "linux"}), t.Requirements(labels={"gpu": "x"})]),
                backoff=t.Backoff(base_s=rng.choice([0.1, 10.0])),
            )
            for _ in range(rng.randint(1, 4))
        ]
        c.apply(t.SubmitTasks(specs))
    elif roll < 0.6:
        worker = rng.choice(workers)
        picked = workload.queues.pick(workload.tasks, worker, rng.randint(1, 3), c.now)
        assignments = [t.Assignment(task.id, f"L{c.machine.applied}.{n}", c.now + 60) for n, task in enumerate(picked)]
        for grant in c.apply(t.AssignTasks(worker.id, assignments)).value or []:
            leases[grant["task_id"]] = grant["lease_id"]
    elif leases:
        task_id = rng.choice(sorted(leases))
        lease_id = leases[task_id] if rng.random() < 0.9 else "stale"
        kind = rng.random()
        if kind < 0.3:
            c.apply(t.ReportTasks(started=[t.LeaseRef(task_id, lease_id)]))
        elif kind < 0.7:
            status = rng.choice(["succeeded", "failed", "error", "timed_out", "cancelled"])
            c.apply(t.ReportTasks(finished=[t.Report(task_id, lease_id, t.Outcome(status=status, exit_code=0 if status == "succeeded" else 1))]))
        elif kind < 0.8:
            c.apply(t.CancelTask(task_id))
        elif kind < 0.9:
            c.apply(t.ReturnLease(task_id, lease_id))
        elif kind < 0.95:
            c.apply(t.ExpireLease(task_id, lease_id))
        else:
            c.apply(t.RemoveWorker(rng.choice(["w1", "w2", "w3"]), lost=True))


@pytest.mark.parametrize("seed", range(40))
def test_the_queues_kept_as_tasks_move_pick_what_a_full_scan_picks(seed):
    """Every node keeps the queues as tasks move; a restored node builds them afresh: both
    must pick exactly what scanning every task would, and count the same active tasks."""
    rng, c, leases = random.Random(seed), Cluster(), {}
    for step in range(150):
        _random_step(c, rng, leases)
        if step % 10:
            continue
        restored = Cluster()
        restored.machine.restore(c.machine.snapshot())
        for workload in (c.workload, restored.workload):
            active = [task for task in workload.tasks.values() if task.state in t.ACTIVE]
            for worker in workload.workers:
                assert workload.queues.held_by(worker) == {task.id for task in active if task.lease.worker == worker}
            assert +workload.queues.active_per_run == Counter(task.spec.run_id for task in active)
            assert workload.queues.queued == sum(1 for task in workload.tasks.values() if task.state == t.QUEUED)
            for worker in workload.workers.values():
                for room in (1, 4):
                    picked = [task.id for task in workload.queues.pick(workload.tasks, worker, room, c.now)]
                    assert picked == _reference_pick(workload, worker, room, c.now)
