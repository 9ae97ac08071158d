"""Leader-only scheduling: matches queued tasks to workers and watches workers and leases.

It keeps nothing a new leader could not rebuild. What it decides (an assignment, a lost
worker, an expired lease) it proposes as a command, and the state machine re-checks it
when applied, so a decision made on a stale view is refused there, not acted on. The
only memory of its own is when each worker was last heard from; a new leader starts
everyone with a fresh grace period.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import trio

from dtfd.journal import fields
from dtfd.server.node import Node, NotLeaderError, Unavailable
from dtfd.state import tasks as t
from dtfd.state.health import RecordLeader
from dtfd.state.machine import Envelope, Result

log = logging.getLogger("dtf.scheduler")
UNTAKEN_LEASE_GRACE_S = 5.0  # an unstarted lease the worker does not report is taken back after this


@dataclass(frozen=True)
class Policy:
    heartbeat_s: float = 2.0
    lost_after_s: float = 10.0
    lease_grace_s: float = 60.0  # past timeout_s + this without a result, the attempt is timed out
    sweep_s: float = 0.25
    max_wait_s: float = 20.0
    max_queued: int = 100_000


class Scheduler:
    def __init__(self, node: Node, policy: Policy = Policy()) -> None:
        self.node = node
        self.policy = policy
        self._last_seen: dict[str, float] = {}
        self._promised: set[str] = set()  # tasks picked for an assignment not applied yet: not picked again meanwhile
        self._work = trio.Event()
        self._term = -1

    @property
    def workload(self) -> t.Workload:
        return self.node.machine.image.workload

    def require_leader(self) -> None:
        """Raise NotLeaderError off the leader, so the API forwards the request there."""
        if not self.node.is_leader:
            raise NotLeaderError(self.node.core.leader)
        if self._term != self.node.core.term:  # newly elected: every worker gets a fresh grace period
            self._term = self.node.core.term
            self._last_seen.clear()

    async def propose(self, command: t.WorkloadCommand) -> Result:
        (result,) = await self.propose_all([command])
        return result

    async def propose_all(self, commands: list[t.WorkloadCommand]) -> list[Result]:
        """The scheduler's commands, in order in one Ready; no client session (they are not retried)."""
        now = time.time()
        return await self.node.propose_all([Envelope("", 0, now, command) for command in commands])

    def wake(self) -> None:
        """New work may be leasable (a submit, a requeue, a worker freed a slot)."""
        self._work.set()
        self._work = trio.Event()

    # ---- worker requests ------------------------------------------------------------

    async def heartbeat(self, worker: str, running: list[str]) -> dict[str, list[str]]:
        """Tell the worker what to stop; take back leases it never took up.

        A lease granted to a long-poll whose answer never reached the worker (the worker
        restarted, the leader died mid-answer) would otherwise hold the task until its
        lease expires. A lease still unstarted, unreported and older than the grace period
        goes back to the queue without counting the attempt.
        """
        self.require_leader()
        self._last_seen[worker] = time.monotonic()
        held = {task.lease.id: task for task in self._held(worker)}
        reported = set(running)
        grace = time.time() - max(2 * self.policy.heartbeat_s, UNTAKEN_LEASE_GRACE_S)
        for lease_id, task in held.items():
            if task.state == t.LEASED and lease_id not in reported and task.lease.granted_at < grace:
                result = await self.propose(t.ReturnLease(task.id, lease_id))
                if result.ok:
                    log.warning("lease not taken up, task requeued %s", fields(task=task.id, lease=lease_id, worker=worker))
                    self.wake()
        return {
            "cancel": [lease for lease in running if lease in held and held[lease].cancel_requested],
            "unknown": [lease for lease in running if lease not in held],
        }

    def seen(self, worker: str) -> None:
        self.require_leader()
        self._last_seen[worker] = time.monotonic()

    async def lease(self, worker: str, most: int, wait_s: float, report: t.ReportTasks | None = None) -> tuple[list[dict], Result | None]:
        """Long-poll: leases for up to `most` tasks, waiting up to `wait_s` for any to appear.

        The worker's `report` (starts and results) goes first, in the same Ready as the first
        assignment, and the slots its results free count for it: one replication round for
        both instead of one after the other. Its result comes back beside the leases.

        A worker asks again only once it has taken up (or given up) every lease of its last
        answer, so a lease of its still unstarted was granted to an answer that never reached
        it (the leader died mid-answer, the connection broke): it is handed over again, first.
        """
        self.require_leader()
        self._last_seen[worker] = time.monotonic()
        deadline = trio.current_time() + min(max(wait_s, 0.0), self.policy.max_wait_s)
        reported: Result | None = None
        while True:
            picks = self._pick(worker, most - len(self._unstarted(worker)), freed=self._freed(worker, report))
            commands: list[t.WorkloadCommand] = [report] if report is not None else []
            if picks:
                expiry = time.time() + self.policy.lease_grace_s
                commands.append(t.AssignTasks(worker, [t.Assignment(task.id, uuid.uuid4().hex, expiry + task.spec.timeout_s) for task in picks]))
            granted: list[dict] = []
            if commands:
                self._promised.update(task.id for task in picks)
                try:
                    results = await self.propose_all(commands)
                finally:
                    self._promised.difference_update(task.id for task in picks)
                if report is not None:
                    reported, report = results[0], None
                    self.wake()  # freed slots, requeued tasks: other pollers may find work
                if picks and results[-1].ok:
                    specs = {task.id: task.spec for task in picks}
                    granted = [dict(grant, spec=specs[grant["task_id"]]) for grant in results[-1].value or ()]
                elif picks:
                    return [], reported
            fresh = {grant["task_id"] for grant in granted}
            again = [task for task in self._unstarted(worker) if task.id not in fresh]
            if granted or again:
                return [_grant(task) for task in again] + granted, reported
            work = self._work
            with trio.move_on_at(deadline):
                await work.wait()
            if trio.current_time() >= deadline:
                return [], reported
            self.require_leader()

    def _held(self, worker: str) -> list[t.Task]:
        tasks = self.workload.tasks
        return sorted((tasks[task_id] for task_id in self.workload.queues.held_by(worker)), key=lambda task: task.order)

    def _unstarted(self, worker: str) -> list[t.Task]:
        return [task for task in self._held(worker) if task.state == t.LEASED]

    def _freed(self, worker_id: str, report: t.ReportTasks | None) -> int:
        """Slots of `worker_id` that `report`'s results will free once applied."""
        if report is None:
            return 0
        freed = 0
        for result in report.finished:
            task = self.workload.tasks.get(result.task_id)
            lease = task.lease if task is not None else None
            freed += task is not None and task.state in t.ACTIVE and lease is not None and lease.id == result.lease_id and lease.worker == worker_id
        return freed

    def _pick(self, worker_id: str, most: int, freed: int = 0) -> list[t.Task]:
        """Highest priority first; within it, the run with the fewest active tasks; then FIFO."""
        worker = self.workload.workers.get(worker_id)
        now = time.time()
        policy = t.BreakerPolicy.from_config(self.node.machine.image.config)
        if worker is None or worker.state != "active" or not t.breaker_admits(worker.breaker, now, policy):
            return []
        queues = self.workload.queues
        room = min(most, worker.slots - queues.active_on(worker_id) + freed, 1 if worker.breaker.state != "closed" else most)
        if room <= 0:
            return []
        return queues.pick(self.workload.tasks, worker, room, now, self._promised)

    # ---- the sweep ------------------------------------------------------------------

    async def run(self) -> None:
        """While leading: declare silent workers lost, time out expired leases, wake pollers for retries."""
        while True:
            await trio.sleep(self.policy.sweep_s)
            if not self.node.is_leader:
                continue
            try:
                self.require_leader()
                await self._sweep()
            except (NotLeaderError, Unavailable) as exc:
                log.info("scheduler sweep interrupted %s", fields(node=self.node.id, reason=exc))

    async def _sweep(self) -> None:
        leaders = self.node.machine.image.health.leaders
        if not leaders or leaders[-1].term < self.node.core.term:
            await self.propose(RecordLeader(self.node.id, self.node.core.term))
        monotonic, now = time.monotonic(), time.time()
        for worker in list(self.workload.workers.values()):
            if worker.state not in ("active", "draining"):
                continue
            last = self._last_seen.setdefault(worker.id, monotonic)
            if monotonic - last > self.policy.lost_after_s:
                result = await self.propose(t.RemoveWorker(worker.id, lost=True))
                log.warning("worker lost %s", fields(worker=worker.id, silent_s=round(monotonic - last, 1), requeued=len((result.value or {}).get("requeued", []))))
                self.wake()
        for task in self.workload.open_tasks():
            lease = task.lease
            if task.state in t.ACTIVE and lease is not None and lease.expires_at < now:
                await self.propose(t.ExpireLease(task.id, lease.id))
                log.warning("lease expired %s", fields(task=task.id, lease=lease.id, worker=lease.worker))
                self.wake()
        if any(task.state == t.QUEUED and task.not_before <= now for task in self.workload.open_tasks()):
            self.wake()


def _grant(task: t.Task) -> dict:
    """An answer's lease for a task leased earlier, as AssignTasks answers a new one."""
    lease = task.lease
    assert lease is not None
    return {"lease_id": lease.id, "task_id": task.id, "attempt": task.attempt, "expires_at": lease.expires_at, "spec": task.spec}
