"""Which queued tasks a worker's lease request gets: labels and resources must fit, higher
priority first, FIFO within a priority, and runs share a worker fairly."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dtfd.scheduler.scheduler import Scheduler
from dtfd.state import tasks as t
from dtfd.state.machine import Envelope, StateMachine, encode_envelope


@dataclass
class Leader:
    """What the scheduler reads of a node: its state machine."""

    machine: StateMachine


class Workload:
    def __init__(self) -> None:
        self.node = Leader(StateMachine())
        self.scheduler = Scheduler(self.node)  # type: ignore[arg-type]

    def apply(self, command: t.WorkloadCommand) -> object:
        machine = self.node.machine
        result = machine.apply(machine.applied + 1, encode_envelope(Envelope("", 0, time.time(), command)))
        assert result.ok, result
        return result.value

    def submit(self, run_id: str = "", **spec: object) -> list[str]:
        return [item["id"] for item in self.apply(t.SubmitTasks([t.TaskSpec(argv=["true"], **spec)], run_id))]

    def pick(self, worker: str, most: int) -> list[str]:
        return [task.id for task in self.scheduler._pick(worker, most)]


def test_higher_priority_first_then_first_come_first_served():
    w = Workload()
    w.apply(t.RegisterWorker("w1", {"os": "linux"}, 4.0, 8192, 4))
    low, mid = w.submit(priority=0), w.submit(priority=5)
    later_mid, high = w.submit(priority=5), w.submit(priority=9)
    assert w.pick("w1", 4) == high + mid + later_mid + low


def test_only_tasks_whose_labels_and_resources_fit_and_never_more_than_free_slots():
    w = Workload()
    w.apply(t.RegisterWorker("small", {"os": "linux"}, 2.0, 1024, 2))
    gpu = w.submit(requirements=t.Requirements(labels={"gpu": "webgpu"}))
    big = w.submit(requirements=t.Requirements(min_memory_mb=4096))
    plain = w.submit() + w.submit() + w.submit()
    assert w.pick("small", 10) == plain[:2]
    assert gpu[0] not in w.pick("small", 10) and big[0] not in w.pick("small", 10)


def test_a_small_run_is_not_starved_behind_a_huge_one():
    w = Workload()
    w.apply(t.RegisterWorker("w1", {}, 4.0, 8192, 4))
    huge = [task for _ in range(50) for task in w.submit("huge")]
    small = w.submit("small") + w.submit("small")
    picked = w.pick("w1", 4)
    assert set(small) <= set(picked) and len(picked) == 4  # submitted last, still in the first lease
    assert [task for task in picked if task in huge] == huge[:2]
