"""A lease request that carries results: one replication round for the report and the
assignment, and the slots the results free are leased again at once."""

from __future__ import annotations

import time

import trio

from dtfd.scheduler.scheduler import Scheduler
from dtfd.server.node import Node
from dtfd.state import tasks as t
from dtfd.state.machine import Envelope
from dtfd.storage.memory import MemoryStorage
from tests.unit.nodes import single_node, until_leader


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


async def lead(nursery: trio.Nursery, node: Node, slots: int, tasks: int) -> None:
    """Run `node` until it leads, with worker w1 of `slots` slots registered and `tasks` no-op tasks queued."""
    nursery.start_soon(node.run)
    await until_leader(node)
    for command in (t.RegisterWorker("w1", {}, 1.0, 1024, slots), t.SubmitTasks([t.TaskSpec(argv=["true"])] * tasks)):
        assert (await node.propose(Envelope("", 0, time.time(), command))).ok


async def test_results_and_the_next_lease_share_one_round_and_the_freed_slot_is_leased_again():
    storage = CountingStorage()
    node = single_node(storage)
    scheduler = Scheduler(node)
    async with trio.open_nursery() as nursery:
        await lead(nursery, node, slots=1, tasks=2)
        (first,), _ = await scheduler.lease("w1", 1, 0)
        syncs = storage.syncs
        await node.propose(Envelope("", 0, time.time(), t.ReportTasks(started=[t.LeaseRef(first["task_id"], first["lease_id"])])))
        one_command = storage.syncs - syncs
        assert await scheduler.lease("w1", 1, 0) == ([], None), "its one slot is busy"

        syncs = storage.syncs
        done = t.Report(first["task_id"], first["lease_id"], t.Outcome(status="succeeded", exit_code=0))
        (second,), reported = await scheduler.lease("w1", 1, 0, t.ReportTasks(finished=[done]))
        assert reported is not None and reported.value["results"][0]["accepted"]
        assert second["task_id"] != first["task_id"], "the slot the result freed is leased in the same request"
        assert storage.syncs - syncs == one_command, "the report and the assignment cost what one command costs"
        assert node.machine.image.workload.tasks[first["task_id"]].state == t.SUCCEEDED
        nursery.cancel_scope.cancel()


async def test_a_lease_whose_answer_was_lost_is_handed_over_again_on_the_next_request():
    node = single_node(MemoryStorage())
    scheduler = Scheduler(node)
    async with trio.open_nursery() as nursery:
        await lead(nursery, node, slots=2, tasks=3)
        lost, _ = await scheduler.lease("w1", 2, 0)  # this answer never reaches the worker
        assert len(lost) == 2

        again, _ = await scheduler.lease("w1", 2, 0)
        assert [(g["task_id"], g["lease_id"], g["attempt"]) for g in again] == [(g["task_id"], g["lease_id"], g["attempt"]) for g in lost]
        assert all(g["spec"].argv == ["true"] for g in again)
        workload = node.machine.image.workload
        assert [workload.tasks[g["task_id"]].attempt for g in again] == [1, 1], "handing a lease over again is not a new attempt"

        started = [t.LeaseRef(g["task_id"], g["lease_id"]) for g in again[:1]]
        await node.propose(Envelope("", 0, time.time(), t.ReportTasks(started=started)))
        (still,), _ = await scheduler.lease("w1", 1, 0)
        assert still["lease_id"] == again[1]["lease_id"], "a started lease is not handed over again, and the unstarted one fills the free slot"
        nursery.cancel_scope.cancel()
