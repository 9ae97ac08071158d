"""The worker's loops: register, heartbeat, lease, run, report; drain on SIGTERM.

One nursery holds everything: the heartbeat, lease, reports and watchdog loops, each a
named task, and one task per running lease. Coordinator trouble never stops a running
task: results wait in `pending` (and in the spool in work_dir, so a restarted worker
re-sends them) until a coordinator acknowledges or refuses them.

A lease runs only once the coordinator has recorded its start: a lease whose start is
not recorded may be taken back without counting the attempt, and running it anyway
could run a task more than max_retries + 1 times. The leases of one answer are started
with one request. A result rides on the next lease request, which the finished task
triggers by freeing its slot (held up to LEASE_HOLD_S for the other slots to free too);
one the lease loop does not take within RESULT_HOLD_S goes on its own from the results
loop.
"""

from __future__ import annotations

import logging
import math
import signal

import msgspec
import trio

from dtfd.config import EX_CONFIG
from dtfd.journal import fields
from dtfd.server.notify import Notifier
from dtfd.worker.client import ApiError, Client, Unavailable
from dtfd.worker.config import WorkerConfig
from dtfd.worker.runner import Result, Settings, TaskRun, TaskSpec
from dtfd.worker.spool import Spool

log = logging.getLogger("dtf.worker.agent")

BATCH_BYTES = 512 << 10  # results per request, below the coordinator's default 1 MiB body limit
MIN_POLL_S = 1.0  # an empty lease answer sooner than this waits out the rest: no busy loop
LEASE_HOLD_S = 0.02  # while some slots are busy, a freed one waits this long for the others
RESULT_HOLD_S = 0.05  # a result waits this long for a lease request to carry it
CARRY_BYTES = 64 << 10  # results a lease request carries; bigger ones go on their own
FLUSH_S = 10.0  # on shutdown, how long unacknowledged results may take to go out
BACKOFF_MAX_S = 5.0
REFUSED_REGISTRATION = frozenset({401, 403, 422})
BAD_INPUT = frozenset({400, 413, 422})  # a result the coordinator will never take as sent


SHRUNK_OUTPUT_BYTES = 8192
SHRUNK_JUNIT_CASES = 200


def shrink(result: Result) -> Result | None:
    """A smaller result that still says what happened: the output's tail, failures first; None if already minimal."""
    if len(result.output_tail) <= SHRUNK_OUTPUT_BYTES and len(result.junit) <= SHRUNK_JUNIT_CASES:
        return None
    cases = sorted(result.junit, key=lambda case: case.status == "passed")[:SHRUNK_JUNIT_CASES]
    note = f"result shrunk to fit the coordinator's body limit ({len(result.junit)} JUnit cases, {len(result.output_tail)} output bytes)"
    return msgspec.structs.replace(
        result,
        output_tail=result.output_tail[-SHRUNK_OUTPUT_BYTES:],
        truncated=True,
        junit=cases,
        reason="; ".join(filter(None, (result.reason, note))),
    )


class Lease(msgspec.Struct, kw_only=True):
    lease_id: str
    task_id: str
    attempt: int = 1
    spec: dict = {}
    expires_at: float | str | None = None


class Refused(Exception):
    """The coordinator will not take this worker (bad token or registration): retrying cannot help."""


class Wakeup:
    """An edge to wait for: `fire()` wakes everyone waiting now."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Agent:
    def __init__(self, cfg: WorkerConfig, client: Client, notifier: Notifier) -> None:
        self.cfg = cfg
        self.client = client
        self.notifier = notifier
        tasks = cfg.config.tasks
        self.settings = Settings(
            work_dir=cfg.work_dir,
            output_cap_bytes=tasks.output_cap_bytes,
            kill_grace_s=tasks.kill_grace_s,
            junit_max_bytes=tasks.junit_max_bytes,
        )
        self.slots = cfg.config.worker.slots
        self.timeout_s = cfg.config.coordinator.request_timeout_s
        self.heartbeat_s = 2.0
        self.lost_after_s = 10.0
        self.running: dict[str, TaskRun] = {}
        self.abandoned: set[str] = set()  # leases the coordinator does not hold: their results are not sent
        self.pending: dict[str, Result] = {}  # lease id -> result not yet answered
        self.due: dict[str, float] = {}  # lease id -> when its result goes on its own, if no lease request took it
        self.in_flight: set[str] = set()  # lease ids whose result a request carries now
        self.one_at_a_time = False  # after a batch was refused as bad input, until the backlog is gone
        self.registered = False
        self.draining = False
        self.reachable = True
        self.last_cycle = trio.current_time()  # the liveness loop (registration, then heartbeats) last went round
        self.changed = Wakeup()  # a task ended, a result came or went
        self.spool = Spool(cfg.work_dir / f"results-{cfg.id}.jsonl", legacy=cfg.work_dir / f"results-{cfg.id}.json") if tasks.spool else None
        self._leasing = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    @property
    def path(self) -> str:
        return f"/v1/workers/{self.cfg.id}"

    async def run(self, stop: trio.Event) -> int:
        """Work until `stop` is set, then drain; the process exit code."""
        self._load_spool()
        try:
            return await self._work(stop)
        finally:
            if self.spool is not None:
                self.spool.close()

    async def _work(self, stop: trio.Event) -> int:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._stop_on, stop, nursery.cancel_scope, name="drain")
            nursery.start_soon(self._watchdog_loop, name="watchdog")
            try:
                await self._register()
            except Refused as exc:
                log.critical("registration refused %s", fields(worker=self.cfg.id, error=exc))
                nursery.cancel_scope.cancel()
                return EX_CONFIG
            self.notifier.ready()
            self._status()
            nursery.start_soon(self._heartbeat_loop, name="heartbeat")
            nursery.start_soon(self._results_loop, name="results")
            nursery.start_soon(self._lease_loop, name="lease")
        return 0

    # registration

    async def _register(self) -> None:
        worker, cfg = self.cfg.config.worker, self.cfg
        body = {"id": cfg.id, "labels": worker.labels, "cpus": cfg.cpus, "memory_mb": cfg.memory_mb, "slots": self.slots}
        backoff = 0.5
        while True:
            self.last_cycle = trio.current_time()
            try:
                answer = await self.client.call("POST", "/v1/workers/register", body, deadline_s=self.timeout_s * 2)
            except Unavailable as exc:
                log.warning("cannot register yet %s", fields(worker=cfg.id, error=exc))
            except ApiError as exc:
                if exc.status in REFUSED_REGISTRATION:
                    raise Refused(str(exc)) from None
                log.warning("registration failed %s", fields(worker=cfg.id, error=exc))
            else:
                self.heartbeat_s = float(answer.get("heartbeat_s") or self.heartbeat_s)
                self.lost_after_s = float(answer.get("lost_after_s") or self.lost_after_s)
                self.registered = True
                log.info(
                    "registered %s",
                    fields(worker=cfg.id, slots=self.slots, cpus=cfg.cpus, memory_mb=cfg.memory_mb, heartbeat_s=self.heartbeat_s),
                )
                return
            await trio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_MAX_S)

    # heartbeats: liveness, cancels, unknown leases

    async def _heartbeat_loop(self) -> None:
        while True:
            started = self.last_cycle = trio.current_time()
            try:
                answer = await self.client.call("POST", f"{self.path}/heartbeat", {"leases": list(self.running)}, deadline_s=self.heartbeat_s)
            except Unavailable as exc:
                self._set_reachable(False, exc)
            except ApiError as exc:
                self._set_reachable(True)
                if exc.status == 404 and not self.draining:
                    log.warning("the coordinator does not know this worker; registering again %s", fields(worker=self.cfg.id))
                    with trio.move_on_after(self.lost_after_s):
                        await self._register()
                else:
                    log.warning("heartbeat refused %s", fields(worker=self.cfg.id, error=exc))
            else:
                self._set_reachable(True)
                self._apply(answer)
            await trio.sleep_until(started + self.heartbeat_s)

    def _set_reachable(self, reachable: bool, error: object = "") -> None:
        if reachable != self.reachable:
            self.reachable = reachable
            if reachable:
                log.info("coordinator reachable again %s", fields(worker=self.cfg.id, url=self.client.urls[self.client.current]))
            else:
                log.warning("no coordinator reachable; running tasks continue %s", fields(worker=self.cfg.id, error=error))
            self._status()

    def _apply(self, answer: dict) -> None:
        for lease_id in answer.get("cancel") or ():
            run = self.running.get(lease_id)
            if run is not None and run.stopped is None:
                log.info("cancel requested %s", run.context)
                run.stop("cancelled", "cancelled by the coordinator")
        for lease_id in answer.get("unknown") or ():
            run = self.running.get(lease_id)
            if run is not None and lease_id not in self.abandoned:
                log.warning("lease unknown to the coordinator; stopping the task %s", run.context)
                self.abandoned.add(lease_id)
                run.stop("cancelled", "lease unknown to the coordinator")

    # leasing and running

    async def _lease_loop(self) -> None:
        wait_s = self.cfg.config.coordinator.lease_wait_s
        backoff = 0.5
        with self._leasing:
            while True:
                free = await self._free_slots()
                started = trio.current_time()
                results = self._take_results(CARRY_BYTES) if not self.one_at_a_time else []
                body = {"max": free, "wait_s": wait_s, "results": results}
                try:
                    answer = await self.client.call(
                        "POST", f"{self.path}/lease", body, deadline_s=wait_s + 2 * self.timeout_s, timeout_s=wait_s + self.timeout_s
                    )
                except (Unavailable, ApiError) as exc:
                    if isinstance(exc, ApiError) and exc.status in BAD_INPUT and results:
                        self.one_at_a_time = True  # the results loop finds the result it will not take
                        continue
                    log.warning("lease request failed %s", fields(worker=self.cfg.id, error=exc))
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                    continue
                finally:
                    self._untake(results)  # also when cancelled: the results loop sends them then
                    self.changed.fire()
                backoff = 0.5
                if results:
                    self._acknowledged(answer)
                leases = [lease for lease in map(self._lease, answer.get("leases") or []) if lease is not None]
                for run in await self._confirm_starts(leases):
                    self._start(run)
                if not leases:
                    await trio.sleep_until(started + MIN_POLL_S)

    async def _free_slots(self) -> int:
        """Slots to lease for: all of them at once, or what is free LEASE_HOLD_S after a first one freed.

        Leasing for every slot as it frees costs a lease and a start round per task when
        tasks are short; holding a freed slot briefly lets one round carry a slot-full."""
        hold_until = math.inf
        while True:
            free = self.slots - len(self.running)
            if free >= self.slots or (free > 0 and trio.current_time() >= hold_until):
                return free
            if free > 0 and hold_until == math.inf:
                hold_until = trio.current_time() + LEASE_HOLD_S
            with trio.move_on_at(hold_until):
                await self.changed.wait()

    def _lease(self, raw: object) -> tuple[TaskRun, str] | None:
        try:
            lease = msgspec.convert(raw, Lease)
        except msgspec.ValidationError as exc:
            log.error("unusable lease ignored %s", fields(error=exc, lease=str(raw)[:200]))
            return None
        if lease.lease_id in self.running:
            return None
        try:
            spec = msgspec.convert(lease.spec, TaskSpec)
        except msgspec.ValidationError as exc:
            spec, problem = TaskSpec(argv=[]), f"unusable task spec: {exc}"
        else:
            problem = ""
        return TaskRun(lease.task_id, lease.lease_id, lease.attempt, spec, self.settings), problem

    async def _confirm_starts(self, leases: list[tuple[TaskRun, str]]) -> list[tuple[TaskRun, str]]:
        """The leases whose start the coordinator recorded, with one request for all of them.

        Not one if no coordinator answers: each lease is then taken back, its attempt not counted."""
        if not leases:
            return []
        body = {"started": [{"task_id": run.task_id, "lease_id": run.lease_id} for run, _ in leases]}
        try:
            answer = await self.client.call("POST", "/v1/results", body, deadline_s=self.lost_after_s)
        except (Unavailable, ApiError) as exc:
            log.warning("could not report starts; not running the tasks (their leases will be taken back) %s", fields(count=len(leases), error=exc))
            return []
        verdicts = {str(item.get("lease_id")): item for item in answer.get("started") or ()}
        confirmed = []
        for run, problem in leases:
            verdict = verdicts.get(run.lease_id, {"error": "no answer"})
            if not verdict.get("accepted"):
                log.warning("start refused; not running the task %s", run.context + " " + fields(error=verdict.get("error")))
                continue
            if verdict.get("cancel_requested"):
                run.stop("cancelled", "cancelled by the coordinator")
            confirmed.append((run, problem))
        return confirmed

    def _start(self, lease: tuple[TaskRun, str]) -> None:
        run, problem = lease
        self.running[run.lease_id] = run
        self._status()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_lease, run, problem, name=f"task {run.task_id} lease {run.lease_id}")

    async def _run_lease(self, run: TaskRun, problem: str) -> None:
        try:
            if problem:
                result = Result(task_id=run.task_id, lease_id=run.lease_id, status="error", reason=problem)
            else:
                result = await run.run()
        finally:
            del self.running[run.lease_id]
            self.changed.fire()
            self._status()
        if run.lease_id in self.abandoned:
            self.abandoned.discard(run.lease_id)
            log.info("result not sent: the coordinator does not hold the lease %s", run.context)
            return
        self.pending[run.lease_id] = result
        self.due[run.lease_id] = trio.current_time() + RESULT_HOLD_S
        if self.spool is not None:
            self.spool.add(result)
        self.changed.fire()

    # results

    async def _results_loop(self) -> None:
        backoff = 0.1
        while True:
            due = min((at for lease_id, at in self.due.items() if lease_id not in self.in_flight), default=None)
            if due is None or due > trio.current_time():
                with trio.move_on_at(due if due is not None else math.inf):
                    await self.changed.wait()
                continue
            batch = self._take_results(BATCH_BYTES)
            try:
                answer = await self.client.call("POST", "/v1/results", {"results": batch}, deadline_s=2 * self.timeout_s)
            except Unavailable as exc:
                log.warning("results not delivered yet %s", fields(count=len(batch), error=exc))
                answered = 0
            except ApiError as exc:
                answered = self._refused(batch, exc)
            else:
                answered = self._acknowledged(answer)
            finally:
                self._untake(batch)
            if answered:
                backoff = 0.1
            else:
                for item in batch:
                    if item["lease_id"] in self.due:
                        self.due[item["lease_id"]] = trio.current_time() + backoff
                backoff = min(2 * backoff, BACKOFF_MAX_S)
            self.changed.fire()

    def _take_results(self, limit: int) -> list[dict]:
        """Results no request carries now, up to `limit` bytes; in flight until `_untake`."""
        batch = self._batch(limit)
        self.in_flight.update(item["lease_id"] for item in batch)
        return batch

    def _untake(self, batch: list[dict]) -> None:
        self.in_flight.difference_update(item["lease_id"] for item in batch)

    def _batch(self, limit: int) -> list[dict]:
        self.one_at_a_time = self.one_at_a_time and len(self.pending) > 1
        batch, size = [], 0
        for result in self.pending.values():
            if result.lease_id in self.in_flight:
                continue
            item = msgspec.to_builtins(result)
            item_size = len(msgspec.json.encode(item))
            if batch and (self.one_at_a_time or size + item_size > limit):
                break
            if item_size > limit and limit < BATCH_BYTES:
                continue  # too big to ride on a lease request: the reports loop sends it
            batch.append(item)
            size += item_size
        return batch

    def _acknowledged(self, answer: dict) -> int:
        answered = []
        for item in answer.get("results") or ():
            result = self.pending.pop(str(item.get("lease_id")), None)
            if result is None:
                continue
            self.due.pop(result.lease_id, None)
            answered.append(result.lease_id)
            context = fields(task=result.task_id, lease=result.lease_id, status=result.status)
            if item.get("accepted"):
                log.debug("result accepted %s", context)  # "task finished" already said it at info
            elif item.get("error") == "stale_lease":
                log.warning("result refused: stale lease (the task was leased again); dropped %s", context)
            else:
                log.error("result refused; dropped %s", context + " " + fields(error=item.get("error")))
        if self.spool is not None:
            self.spool.done(answered)
        return len(answered)

    def _refused(self, batch: list[dict], exc: ApiError) -> int:
        """A whole request refused as bad input: results then go one at a time, and the one refused is dropped."""
        if exc.status not in BAD_INPUT:
            log.warning("results not delivered yet %s", fields(count=len(batch), error=exc))
            return 0
        if len(batch) > 1:
            self.one_at_a_time = True
            return 0
        result = self.pending[batch[0]["lease_id"]]
        smaller = shrink(result) if exc.status == 413 else None
        if smaller is not None:  # too big for the coordinator's body limit: send less, never nothing
            self.pending[result.lease_id] = smaller
            if self.spool is not None:
                self.spool.add(smaller)
            log.warning("result too large; resending it shrunk %s", fields(task=result.task_id, lease=result.lease_id))
            return 1
        del self.pending[result.lease_id]
        self.due.pop(result.lease_id, None)
        if self.spool is not None:
            self.spool.done([result.lease_id])
        log.error("result refused; dropped %s", fields(task=result.task_id, lease=result.lease_id, error=exc))
        return 1

    # shutdown

    async def _stop_on(self, stop: trio.Event, scope: trio.CancelScope) -> None:
        await stop.wait()
        await self._drain()
        scope.cancel()

    async def _drain(self) -> None:
        """Stop leasing, let running tasks finish within drain_timeout_s, report, deregister."""
        self.notifier.stopping()
        self.draining = True
        self._leasing.cancel()
        self._status()
        if not self.registered:
            return
        tasks = self.cfg.config.tasks
        log.info("draining %s", fields(worker=self.cfg.id, running=len(self.running), drain_timeout_s=tasks.drain_timeout_s))
        await self._quietly("POST", f"{self.path}/drain", {"draining": True})
        with trio.move_on_after(tasks.drain_timeout_s):
            while self.running:
                await self.changed.wait()
        for run in self.running.values():
            log.warning("task still running at the drain deadline; ending it %s", run.context)
            run.stop("cancelled", "worker shutdown")
        with trio.move_on_after(tasks.kill_grace_s + 5):
            while self.running:
                await self.changed.wait()
        with trio.move_on_after(FLUSH_S):
            while self.pending:
                await self.changed.wait()
        if self.pending:
            log.warning("results not delivered before exit %s", fields(count=len(self.pending), spooled=self.spool is not None))
        if await self._quietly("DELETE", self.path):
            log.info("deregistered %s", fields(worker=self.cfg.id))

    async def _quietly(self, method: str, path: str, body: object = None) -> bool:
        try:
            await self.client.call(method, path, body, deadline_s=self.timeout_s)
        except (Unavailable, ApiError) as exc:
            log.warning("request failed during shutdown %s", fields(method=method, path=path, error=exc))
            return False
        return True

    # systemd and the spool

    def _status(self) -> None:
        text = f"running {len(self.running)}/{self.slots}"
        if self.draining:
            text += ", draining"
        if not self.reachable:
            text += ", no coordinator reachable"
        if self.pending:
            text += f", {len(self.pending)} results unsent"
        self.notifier.status(text)

    async def _watchdog_loop(self) -> None:
        """Pet systemd's watchdog while registration or heartbeats keep cycling (coordinator outages do not count)."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            # one cycle takes at most a call's deadline plus a backoff; allow two
            if trio.current_time() - self.last_cycle < 2 * (self.heartbeat_s + 2 * self.timeout_s + BACKOFF_MAX_S):
                self.notifier.watchdog()
            self._status()
            await trio.sleep(interval)

    def _load_spool(self) -> None:
        if self.spool is None:
            return
        results = self.spool.load()
        self.pending.update((r.lease_id, r) for r in results)
        self.due.update((r.lease_id, 0.0) for r in results)
        if results:
            log.info("spooled results to re-send %s", fields(count=len(results), path=self.spool.path))


async def serve(cfg: WorkerConfig) -> int:
    """Run the agent until SIGTERM or SIGINT, then drain; the exit code."""
    coordinator = cfg.config.coordinator
    async with Client(coordinator.urls, cfg.token, ca_file=coordinator.ca_file, request_timeout_s=coordinator.request_timeout_s) as client:
        agent = Agent(cfg, client, Notifier())
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("stopping %s", fields(worker=cfg.id, signal=signal.Signals(signum).name))
                        stop.set()

                nursery.start_soon(on_signal, name="signals")
                code = await agent.run(stop)
                nursery.cancel_scope.cancel()
    log.info("dtf-worker stopped %s", fields(worker=cfg.id, code=code))
    return code
