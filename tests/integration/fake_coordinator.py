"""The coordinator side of docs/workload-api.md, in memory, for testing dtf-worker.

One state behind any number of front ends (each its own port, like the nodes of a
cluster), so a test can take one node down or make it answer 503 and watch the worker
fail over. Every request is logged with the front end that received it.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field

import trio

from dtfd.server import http
from dtfd.worker.agent import Wakeup

TOKEN = "worker-token-0123456789"


@dataclass
class Front:
    """One listening address; `failing` maps a route name to the status it answers instead."""

    name: str
    url: str = ""
    failing: dict[str, int] = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class Task:
    id: str
    spec: dict
    state: str = "queued"
    lease_id: str = ""
    attempt: int = 0
    worker: str = ""
    cancel_requested: bool = False


@dataclass
class Call:
    front: str
    method: str
    route: str
    path: str
    body: dict


ROUTES = [
    ("POST", re.compile(r"/v1/workers/register"), "register"),
    ("POST", re.compile(r"/v1/workers/(?P<worker>[^/]+)/heartbeat"), "heartbeat"),
    ("POST", re.compile(r"/v1/workers/(?P<worker>[^/]+)/lease"), "lease"),
    ("POST", re.compile(r"/v1/workers/(?P<worker>[^/]+)/drain"), "drain"),
    ("DELETE", re.compile(r"/v1/workers/(?P<worker>[^/]+)"), "deregister"),
    ("POST", re.compile(r"/v1/results"), "results"),
]


class FakeCoordinator:
    def __init__(self, heartbeat_s: float = 0.2, lost_after_s: float = 5.0, max_wait_s: float = 1.0) -> None:
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.max_wait_s = max_wait_s  # caps the long-poll so tests stay quick
        self.fronts: list[Front] = []
        self.workers: dict[str, dict] = {}
        self.tasks: dict[str, Task] = {}
        self.leases: dict[str, str] = {}  # current lease id -> task id
        self.forgotten: set[str] = set()  # leases the heartbeat answers as unknown
        self.results: dict[str, dict] = {}  # task id -> the accepted result
        self.invalid: set[str] = set()  # tasks whose results are refused with 422, as malformed input is
        self.refuse_starts = False  # answer every start as for a stale lease
        self.calls: list[Call] = []
        self.changed = Wakeup()
        self._ids = itertools.count(1)

    # test controls

    async def listen(self, nursery: trio.Nursery, name: str = "") -> Front:
        front = Front(name or f"node{len(self.fronts) + 1}")
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        front.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

        async def handler(request: http.Request) -> http.Response:
            return await self._handle(front, request)

        async def serve() -> None:
            with front.scope:
                await http.serve(handler, listeners, http.Limits())

        nursery.start_soon(serve)
        self.fronts.append(front)
        return front

    def submit(self, argv: list[str], **spec: object) -> str:
        task = Task(f"task{next(self._ids)}", {"argv": argv, "timeout_s": 60, **spec})
        self.tasks[task.id] = task
        self.changed.fire()
        return task.id

    def cancel(self, task_id: str) -> None:
        self.tasks[task_id].cancel_requested = True

    def requeue(self, task_id: str) -> None:
        """The lease goes stale (as after the worker was declared lost); the task is held, not re-leased."""
        task = self.tasks[task_id]
        self.leases.pop(task.lease_id, None)
        task.state = "held"

    def forget(self, task_id: str) -> None:
        self.forgotten.add(self.tasks[task_id].lease_id)

    def count(self, route: str, front: str | None = None) -> int:
        return sum(1 for c in self.calls if c.route == route and (front is None or c.front == front))

    def result_posts(self, lease_id: str) -> int:
        return sum(1 for c in self.calls if c.route in ("results", "lease") for r in c.body.get("results", []) if r["lease_id"] == lease_id)

    # the contract

    async def _handle(self, front: Front, request: http.Request) -> http.Response:
        for method, pattern, name in ROUTES:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                break
        else:
            return http.error_response(404, "not_found", f"no route {request.method} {request.path}")
        body = json.loads(request.body) if request.body else {}
        if name == "results" and not body.get("results"):
            name = "start"  # reports of starts only: what a worker sends before it runs new leases
        self.calls.append(Call(front.name, request.method, name, request.path, body))
        self.changed.fire()
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return http.error_response(401, "unauthorized", "bad token")
        if name in front.failing:
            return http.error_response(front.failing[name], "unavailable", "no leader", [("Retry-After", "0")])
        return await getattr(self, f"_{'results' if name == 'start' else name}")(body, **match.groupdict())

    async def _register(self, body: dict) -> http.Response:
        self.workers[body["id"]] = {**body, "draining": False, "registered": True}
        return http.json_response(200, {"heartbeat_s": self.heartbeat_s, "lost_after_s": self.lost_after_s})

    async def _heartbeat(self, body: dict, worker: str) -> http.Response:
        if not self.workers.get(worker, {}).get("registered"):
            return http.error_response(404, "unknown_worker", worker)
        held = body["leases"]
        cancel = [lease for lease in held if lease in self.leases and self.tasks[self.leases[lease]].cancel_requested]
        unknown = [lease for lease in held if lease in self.forgotten]
        return http.json_response(200, {"cancel": cancel, "unknown": unknown})

    async def _lease(self, body: dict, worker: str) -> http.Response:
        refused = self._refused(body)
        if refused is not None:
            return refused
        reports = self._report(body)
        with trio.move_on_after(min(float(body["wait_s"]), self.max_wait_s)):
            while not self._queued() or self.workers[worker]["draining"]:
                await self.changed.wait()
        leases = []
        for task in self._queued()[: body["max"]]:
            task.state, task.worker, task.attempt = "leased", worker, task.attempt + 1
            task.lease_id = f"lease{next(self._ids)}"
            self.leases[task.lease_id] = task.id
            leases.append({"lease_id": task.lease_id, "task_id": task.id, "attempt": task.attempt, "spec": task.spec, "expires_at": 0})
        return http.json_response(200, {"leases": leases, **reports})

    def _queued(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.state == "queued"]

    async def _results(self, body: dict) -> http.Response:
        refused = self._refused(body)
        return refused if refused is not None else http.json_response(200, self._report(body))

    def _refused(self, body: dict) -> http.Response | None:
        for n, result in enumerate(body.get("results", [])):
            if result["task_id"] in self.invalid:
                return http.error_response(422, "invalid", f"results[{n}].status: invalid")
        return None

    def _report(self, body: dict) -> dict[str, list[dict]]:
        """Starts and results, as the coordinator applies them: one answer for each."""
        started = []
        for start in body.get("started", []):
            task_id, lease = start["task_id"], start["lease_id"]
            held = self.leases.get(lease) == task_id and not self.refuse_starts
            if held and self.tasks[task_id].state == "leased":
                self.tasks[task_id].state = "running"
            done = self.results.get(task_id, {}).get("lease_id") == lease
            cancel = held and self.tasks[task_id].cancel_requested
            started.append({"task_id": task_id, "lease_id": lease, "accepted": held or done, "error": "" if held or done else "stale_lease", "cancel_requested": cancel})
        answers = []
        for result in body.get("results", []):
            task_id, lease = result["task_id"], result["lease_id"]
            if self.leases.get(lease) == task_id or self.results.get(task_id, {}).get("lease_id") == lease:
                self.results[task_id] = result
                self.tasks[task_id].state = result["status"]
                self.leases.pop(lease, None)
                answers.append({"task_id": task_id, "lease_id": lease, "accepted": True, "error": ""})
            else:
                answers.append({"task_id": task_id, "lease_id": lease, "accepted": False, "error": "stale_lease"})
        self.changed.fire()
        return {"started": started, "results": answers}

    async def _drain(self, body: dict, worker: str) -> http.Response:
        self.workers[worker]["draining"] = bool(body["draining"])
        return http.json_response(200, {})

    async def _deregister(self, body: dict, worker: str) -> http.Response:
        self.workers[worker]["registered"] = False
        for task in self.tasks.values():
            if task.worker == worker and task.state in ("leased", "running"):
                self.leases.pop(task.lease_id, None)
                task.state = "queued"
        return http.json_response(200, {})
