"""HTTP routes of the workload: submit and follow tasks, and the worker protocol.

The contract is docs/workload-api.md. Submissions are validated whole (422 naming the
task and field) and shed (429 + Retry-After) before anything is proposed, so nothing
half-submitted remains. Worker routes run on the leader; followers forward them.
"""

from __future__ import annotations

import math
import time

import msgspec

from dtfd.scheduler.scheduler import Scheduler
from dtfd.scheduler.shedding import RateLimiter
from dtfd.server import auth
from dtfd.server import bodies as b
from dtfd.server.api import Api, BadRequest
from dtfd.server.http import Request, Response, error_response, json_response
from dtfd.state import tasks as t
from dtfd.state.machine import Envelope, Result

WORKER_OR_ADMIN = frozenset({"admin", "worker"})


class WorkloadApi:
    def __init__(self, api: Api, scheduler: Scheduler, limiter: RateLimiter | None = None) -> None:
        self.api, self.node, self.scheduler = api, api.node, scheduler
        self.limiter = limiter or RateLimiter(rate_per_s=200.0, burst=2000.0)
        tid, wid = r"(?P<task_id>[^/]+)", r"(?P<worker>[^/]+)"
        api.add_routes(
            [
                ("POST", "/v1/tasks", auth.ADMIN, self.submit, "/v1/tasks", b.SubmitBody, b.SubmitAnswer),
                ("GET", "/v1/tasks", auth.READ, self.list_tasks, "/v1/tasks", None, b.TaskPage, b.TaskQuery),
                ("GET", f"/v1/tasks/{tid}", auth.READ, self.get_task, "/v1/tasks/{id}", None, b.TaskAnswer),
                ("POST", f"/v1/tasks/{tid}/cancel", auth.ADMIN, self.cancel, "/v1/tasks/{id}/cancel", None, b.CancelAnswer),
                ("GET", "/v1/runs", auth.READ, self.list_runs, "/v1/runs", None, b.RunsAnswer),
                ("GET", r"/v1/runs/(?P<run_id>[^/]+)", auth.READ, self.run_summary, "/v1/runs/{id}", None, b.Run),
                ("GET", "/v1/workers", auth.READ, self.list_workers, "/v1/workers", None, b.WorkersAnswer),
                ("POST", "/v1/workers/register", WORKER_OR_ADMIN, self.register, "/v1/workers/register", b.RegisterBody, b.RegisterAnswer),
                ("POST", f"/v1/workers/{wid}/heartbeat", WORKER_OR_ADMIN, self.heartbeat, "/v1/workers/{id}/heartbeat", b.HeartbeatBody,
                 b.HeartbeatAnswer),
                ("POST", f"/v1/workers/{wid}/lease", WORKER_OR_ADMIN, self.lease, "/v1/workers/{id}/lease", b.LeaseBody, b.LeaseAnswer),
                ("POST", f"/v1/workers/{wid}/drain", WORKER_OR_ADMIN, self.drain, "/v1/workers/{id}/drain", b.DrainBody, b.WorkerStateAnswer),
                ("DELETE", f"/v1/workers/{wid}", WORKER_OR_ADMIN, self.deregister, "/v1/workers/{id}", None, b.RemovedAnswer),
                ("POST", r"/v1/leases/(?P<lease_id>[^/]+)/start", WORKER_OR_ADMIN, self.start, "/v1/leases/{id}/start", b.StartBody,
                 b.StartAnswer),
                ("POST", "/v1/results", WORKER_OR_ADMIN, self.results, "/v1/results", b.ResultsBody, b.ResultsAnswer),
            ]
        )

    @property
    def workload(self) -> t.Workload:
        return self.node.machine.image.workload

    async def _apply(self, request: Request, command: t.WorkloadCommand, client: str = "", seq: int = 0) -> Result:
        result = await self.node.propose(Envelope(client, seq, time.time(), command))
        if result.ok:
            self.scheduler.wake()
        return result

    # ---- tasks ----------------------------------------------------------------------

    async def submit(self, request: Request, body: b.SubmitBody) -> Response:
        for n, spec in enumerate(body.tasks):
            problem = t.spec_problem(spec)
            if problem:
                raise BadRequest(422, "invalid", f"tasks[{n}].{problem}")
        self.scheduler.require_leader()  # shedding is decided where the queue is
        wait = self.limiter.retry_after(request.principal, cost=len(body.tasks))
        if wait:
            return _shed(f"client {request.principal!r} is over its submission rate", wait)
        queued = self.workload.queues.queued
        limit = self.scheduler.policy.max_queued
        if queued + len(body.tasks) > limit:
            return _shed(f"queue is full ({queued} tasks queued, limit {limit})", 5.0)
        result = await self._apply(request, t.SubmitTasks(body.tasks, body.run_id), body.client, body.seq)
        if not result.ok:
            raise BadRequest(422, "invalid", f"tasks[{result.value['task']}].{result.value['problem']}")
        return json_response(201, {"tasks": result.value, "duplicate": result.duplicate})

    async def list_tasks(self, request: Request, query: b.TaskQuery) -> Response:
        await self._read(request)
        q = query
        matching = sorted(
            (
                task
                for task in self.workload.tasks.values()
                if task.order > q.after
                and (not q.run or task.spec.run_id == q.run)
                and (not q.state or task.state == q.state)
                and (not q.worker or (task.lease and task.lease.worker == q.worker) or q.worker in task.failed_on)
            ),
            key=lambda task: task.order,
        )
        page = matching[: q.limit]
        next_cursor = str(page[-1].order) if len(matching) > q.limit else ""
        return json_response(200, {"tasks": [_task_view(task, brief=True) for task in page], "next": next_cursor})

    async def get_task(self, request: Request, task_id: str) -> Response:
        await self._read(request)
        task = self.workload.tasks.get(task_id)
        if task is None:
            return error_response(404, "not_found", f"no task {task_id!r}")
        return json_response(200, _task_view(task, brief=False))

    async def cancel(self, request: Request, task_id: str) -> Response:
        result = await self._apply(request, t.CancelTask(task_id))
        if not result.ok:
            status = 404 if result.error == "unknown_task" else 409
            return error_response(status, result.error, f"task {task_id} cannot be cancelled: {result.error}")
        return json_response(200, result.value)

    async def list_runs(self, request: Request) -> Response:
        await self._read(request)
        runs: dict[str, dict] = {}
        for task in sorted(self.workload.tasks.values(), key=lambda task: task.order):
            if not task.spec.run_id:
                continue
            run = runs.setdefault(task.spec.run_id, {"run_id": task.spec.run_id, "total": 0, "states": {}, "submitted_at": task.submitted_at})
            run["total"] += 1
            run["states"][task.state] = run["states"].get(task.state, 0) + 1
        for run in runs.values():
            run["done"] = all(state in t.TERMINAL for state in run["states"])
        return json_response(200, {"runs": list(runs.values())})

    async def run_summary(self, request: Request, run_id: str) -> Response:
        await self._read(request)
        members = [task for task in self.workload.tasks.values() if task.spec.run_id == run_id]
        if not members:
            return error_response(404, "not_found", f"no run {run_id!r}")
        by_state: dict[str, int] = {}
        for task in members:
            by_state[task.state] = by_state.get(task.state, 0) + 1
        failures = [
            {"id": task.id, "name": task.spec.name, "state": task.state, "reason": task.history[-1].reason}
            for task in sorted(members, key=lambda task: task.order)
            if task.state in (t.FAILED, t.TIMED_OUT, t.LOST)
        ]
        cases = [(case, task.id) for task in members if task.result for case in task.result.junit]
        slowest = sorted(cases, key=lambda pair: -pair[0].duration_s)[:10]
        return json_response(
            200,
            {
                "run_id": run_id,
                "total": len(members),
                "states": by_state,
                "done": all(task.state in t.TERMINAL for task in members),
                "failures": failures,
                "junit": {
                    "cases": len(cases),
                    "failed": sum(1 for case, _ in cases if case.status in ("failed", "error")),
                    "slowest": [{"task": tid, "name": c.name, "classname": c.classname, "duration_s": c.duration_s} for c, tid in slowest],
                },
            },
        )

    # ---- workers ---------------------------------------------------------------------

    async def list_workers(self, request: Request) -> Response:
        await self._read(request)
        return json_response(200, {"workers": [msgspec.to_builtins(w) for w in self.workload.workers.values()]})

    async def register(self, request: Request, body: b.RegisterBody) -> Response:
        self.scheduler.seen(body.id)
        await self._apply(request, t.RegisterWorker(body.id, body.labels, body.cpus, body.memory_mb, body.slots))
        policy = self.scheduler.policy
        return json_response(200, {"heartbeat_s": policy.heartbeat_s, "lost_after_s": policy.lost_after_s})

    async def heartbeat(self, request: Request, body: b.HeartbeatBody, worker: str) -> Response:
        self.scheduler.require_leader()  # only the leader's view says whether a worker is known
        if not self._registered(worker):
            return error_response(404, "unknown_worker", f"worker {worker!r} is not registered (or was declared lost); register again")
        return json_response(200, await self.scheduler.heartbeat(worker, body.leases))

    def _registered(self, worker: str) -> bool:
        """Known and not lost or gone: a worker declared lost must register again to get work."""
        record = self.workload.workers.get(worker)
        return record is not None and record.state in ("active", "draining")

    async def lease(self, request: Request, body: b.LeaseBody, worker: str) -> Response:
        self.scheduler.require_leader()
        if not self._registered(worker):
            return error_response(404, "unknown_worker", f"worker {worker!r} is not registered; register again")
        leases, reported = await self.scheduler.lease(worker, body.max, body.wait_s, self._report_command(body))
        reports = reported.value if reported is not None else {"started": [], "results": []}
        return json_response(200, {"leases": [msgspec.to_builtins(lease) for lease in leases], **reports})

    async def drain(self, request: Request, body: b.DrainBody, worker: str) -> Response:
        result = await self._apply(request, t.SetDraining(worker, body.draining))
        if not result.ok:
            return error_response(404, result.error, f"worker {worker!r} is not registered")
        return json_response(200, result.value)

    async def deregister(self, request: Request, worker: str) -> Response:
        result = await self._apply(request, t.RemoveWorker(worker, lost=False))
        if not result.ok:
            return error_response(404, result.error, f"worker {worker!r} is not registered")
        return json_response(200, result.value)

    async def start(self, request: Request, body: b.StartBody, lease_id: str) -> Response:
        answer = (await self._report(request, b.ResultsBody(started=[b.StartedBody(body.task_id, lease_id)])))["started"][0]
        if not answer["accepted"]:
            return error_response(409, answer["error"], f"lease {lease_id} no longer holds task {body.task_id}")
        return json_response(200, answer)

    async def results(self, request: Request, body: b.ResultsBody) -> Response:
        return json_response(200, await self._report(request, body))

    async def _report(self, request: Request, body: b.ResultsBody) -> dict[str, list]:
        """Apply a worker's reports as one command; an answer for each start and each result."""
        command = self._report_command(body)
        if command is None:
            return {"started": [], "results": []}
        result = await self._apply(request, command)
        return result.value

    @staticmethod
    def _report_command(body: b.ResultsBody) -> t.ReportTasks | None:
        if not body.results and not body.started:
            return None
        finished = [
            t.Report(r.task_id, r.lease_id, t.Outcome(**{f: getattr(r, f) for f in t.Outcome.__struct_fields__}))
            for r in body.results
        ]
        return t.ReportTasks([t.LeaseRef(s.task_id, s.lease_id) for s in body.started], finished)

    async def _read(self, request: Request) -> None:
        if request.query.get("stale") != "ok":
            await self.node.read_barrier()


def _shed(message: str, retry_after: float) -> Response:
    return error_response(429, "overloaded", message, [("Retry-After", str(max(1, math.ceil(retry_after))))])


def _task_view(task: t.Task, brief: bool) -> dict:
    view = {
        "id": task.id,
        "name": task.spec.name,
        "run_id": task.spec.run_id,
        "state": task.state,
        "attempt": task.attempt,
        "worker": task.lease.worker if task.lease else (task.history[-1].worker if task.history else ""),
        "priority": task.spec.priority,
        "submitted_at": task.submitted_at,
        "updated_at": task.updated_at,
        "order": task.order,
    }
    if task.result is not None:
        view["exit_code"] = task.result.exit_code
        view["duration_s"] = task.result.duration_s
    if not brief:
        view["spec"] = msgspec.to_builtins(task.spec)
        view["cancel_requested"] = task.cancel_requested
        view["not_before"] = task.not_before
        view["lease"] = msgspec.to_builtins(task.lease)
        view["result"] = msgspec.to_builtins(task.result)
        view["history"] = [msgspec.to_builtins(msgspec.structs.asdict(h)) for h in task.history]
    return view

