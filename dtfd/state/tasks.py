"""Tasks and workers: the workload partitions of the replicated state and their commands.

Every transition of a task is one command and one history row; every rule that decides
a transition (lease validity, retries and their backoff, circuit breakers) lives here,
as a pure function of the state and the command, so that all nodes agree and a new
leader finds exactly the queue, the leases and the breakers the old one left.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

QUEUED, LEASED, RUNNING = "queued", "leased", "running"
SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST = "succeeded", "failed", "timed_out", "cancelled", "lost"
TERMINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST})
ACTIVE = frozenset({LEASED, RUNNING})

BREAKER_THRESHOLD = 3  # consecutive infrastructure failures that open a worker's breaker
BREAKER_COOLDOWN_S = 30.0  # an open breaker lets one probe task through after this
# Both can be changed at run time through the replicated configuration partition
# (PUT /v1/config/breaker.threshold, /v1/config/breaker.cooldown_s), so every node applies
# the same values at the same index.


class BreakerPolicy(msgspec.Struct, frozen=True):
    threshold: int = BREAKER_THRESHOLD
    cooldown_s: float = BREAKER_COOLDOWN_S

    @classmethod
    def from_config(cls, config: dict[str, str]) -> BreakerPolicy:
        try:
            return cls(int(config.get("breaker.threshold", BREAKER_THRESHOLD)), float(config.get("breaker.cooldown_s", BREAKER_COOLDOWN_S)))
        except ValueError:
            return cls()  # a bad value in the configuration partition must not stop the workload


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Bounds on what a client may submit, in one place: decoding enforces them (the API's request
# and the log entry alike) and the OpenAPI schema states them. Widening one is safe; narrowing
# one would make log entries and snapshots written under the old bound undecodable. The
# patterns are the exception: a regex per string would cost more than the rest of decoding
# (8 us a spec instead of 1.5), so spec_problem() checks them, and the schema only states them.
NO_NUL = r"^[^\x00]*$"
MAX_NAME = 256  # ids, keys, run ids, label keys and values, env names
MAX_TEXT = 4096  # paths, display names
MAX_ARGV, MAX_ARG = 1024, 16384
MAX_ENV, MAX_ENV_BYTES = 256, 65536
MAX_LABELS = 64
MAX_RETRIES = 100
MAX_TIMEOUT_S = 86400.0
MAX_BACKOFF_S = 3600.0
MAX_PRIORITY = 1000
MAX_CPUS = 1 << 20
MAX_MEMORY_MB = 1 << 30  # a pebibyte
INT64 = (1 << 63) - 1
WORKER_ENV = ("DTF_TASK_ID", "DTF_LEASE_ID", "DTF_ATTEMPT")  # the worker sets these for each task; a spec may not

Name = Annotated[str, Meta(max_length=MAX_NAME)]
Text = Annotated[str, Meta(max_length=MAX_TEXT, extra_json_schema={"pattern": NO_NUL})]
Labels = Annotated[dict[Annotated[str, Meta(min_length=1, max_length=MAX_NAME)], Name], Meta(max_length=MAX_LABELS)]
Cpus = Annotated[float, Meta(ge=0, le=MAX_CPUS)]
MemoryMb = Annotated[int, Meta(ge=0, le=MAX_MEMORY_MB)]
Seconds = Annotated[float, Meta(ge=0)]
Argv = Annotated[list[Annotated[str, Meta(max_length=MAX_ARG, extra_json_schema={"pattern": NO_NUL})]], Meta(min_length=1, max_length=MAX_ARGV)]
EnvName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME, extra_json_schema={"pattern": r"^[^=\x00]+$"})]
Env = Annotated[
    dict[EnvName, Annotated[str, Meta(max_length=MAX_ENV_BYTES, extra_json_schema={"pattern": NO_NUL})]], Meta(max_length=MAX_ENV)
]
Delay = Annotated[float, Meta(gt=0, le=MAX_BACKOFF_S)]


class Requirements(Strict, frozen=True):
    labels: Labels = {}
    min_cpus: Cpus = 0
    min_memory_mb: MemoryMb = 0


class Backoff(Strict, frozen=True):
    base_s: Delay = 1.0
    max_s: Delay = 60.0


class TaskSpec(Strict, frozen=True):
    argv: Argv  # never through a shell unless shell = true
    shell: bool = False
    env: Env = {}
    cwd: Text = ""
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 600.0
    requirements: Requirements = Requirements()
    priority: Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    max_retries: Annotated[int, Meta(ge=0, le=MAX_RETRIES)] = 0
    backoff: Backoff = Backoff()
    idempotency_key: Name = ""
    run_id: Name = ""
    name: Text = ""
    junit: Text = ""


def spec_problem(spec: TaskSpec) -> str:
    """The first thing wrong with a spec that its field bounds cannot say, naming the field; '' if none."""
    if spec.shell and len(spec.argv) != 1:
        return "argv: with shell = true, argv is exactly one string, the script"
    texts = [(f"argv[{n}]", arg) for n, arg in enumerate(spec.argv)] + [("cwd", spec.cwd), ("junit", spec.junit), ("name", spec.name)]
    for field, text in texts + [("env", name + value) for name, value in spec.env.items()]:
        if "\0" in text:
            return f"{field}: must not contain NUL bytes (no command, path or variable can)"
    if any("=" in name for name in spec.env):
        return "env: a variable's name must not contain '='"
    if sum(len(k) + len(v) for k, v in spec.env.items()) > MAX_ENV_BYTES:
        return f"env: at most {MAX_ENV_BYTES} bytes in all"
    reserved = sorted(set(spec.env) & set(WORKER_ENV))
    if reserved:
        return f"env: {', '.join(reserved)} is set by the worker for each task"
    if spec.backoff.base_s > spec.backoff.max_s:
        return "backoff: base_s must not exceed max_s"
    return ""


Status = Literal["succeeded", "failed", "timed_out", "cancelled", "error"]  # error: the worker could not run it


class JUnitCase(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    classname: str
    status: Literal["passed", "failed", "error", "skipped"]
    duration_s: Seconds
    message: str = ""


class Outcome(Strict, frozen=True):
    """What a worker reports for one attempt. Its text is bounded by the body limit: a worker shrinks a result refused as too large."""

    status: Status
    exit_code: Annotated[int, Meta(ge=-(1 << 31), lt=1 << 31)] | None = None  # None: nothing ran; negative: killed by that signal
    duration_s: Seconds = 0.0
    peak_rss_bytes: Annotated[int, Meta(ge=0, le=INT64)] = 0
    cpu_s: Seconds = 0.0
    output_tail: str = ""
    truncated: bool = False
    reason: str = ""
    junit: list[JUnitCase] = []


class Lease(msgspec.Struct, frozen=True):
    id: str
    worker: str
    attempt: int
    granted_at: float
    expires_at: float


class TransitionFields(msgspec.Struct, frozen=True):
    """One step of a task's history; the API shows it as an object."""

    attempt: int
    worker: str
    from_state: str
    to_state: str
    reason: str
    at: float


class Transition(TransitionFields, frozen=True, array_like=True):
    """As stored in the replicated state: an array, the smaller encoding."""


class Task(msgspec.Struct):
    id: str
    order: int  # submission order, for FIFO and pagination
    spec: TaskSpec
    state: str
    submitted_at: float
    updated_at: float
    attempt: int = 0
    lease: Lease | None = None
    not_before: float = 0.0
    cancel_requested: bool = False
    result: Outcome | None = None
    reported: list[str] = []  # lease ids whose results were accepted: a re-send is acknowledged again
    failed_on: list[str] = []  # workers where an attempt failed; blamed if the task then passes elsewhere
    history: list[Transition] = []


class Breaker(msgspec.Struct):
    state: str = "closed"  # closed | open | half_open
    failures: int = 0
    opened_at: float = 0.0
    probe: str = ""  # the one task a half-open breaker let through


class Worker(msgspec.Struct):
    id: str
    labels: dict[str, str]
    cpus: float
    memory_mb: int
    slots: int
    state: str  # active | draining | lost | gone
    registered_at: float
    breaker: Breaker = msgspec.field(default_factory=Breaker)


class Assignment(msgspec.Struct, frozen=True, array_like=True):
    task_id: str
    lease_id: str
    expires_at: float


class Report(msgspec.Struct, frozen=True):
    task_id: str
    lease_id: str
    outcome: Outcome


class RegisterWorker(msgspec.Struct, tag="worker.register", frozen=True):
    worker: str
    labels: dict[str, str]
    cpus: float
    memory_mb: int
    slots: int


class SetDraining(msgspec.Struct, tag="worker.drain", frozen=True):
    worker: str
    draining: bool


class RemoveWorker(msgspec.Struct, tag="worker.remove", frozen=True):
    worker: str
    lost: bool  # True: stopped heartbeating; False: deregistered


class SubmitTasks(msgspec.Struct, tag="task.submit", frozen=True):
    specs: list[TaskSpec]
    run_id: str = ""


class AssignTasks(msgspec.Struct, tag="task.assign", frozen=True):
    worker: str
    assignments: list[Assignment]


class LeaseRef(msgspec.Struct, frozen=True, array_like=True):
    task_id: str
    lease_id: str


class ReportTasks(msgspec.Struct, tag="task.report", frozen=True):
    """What a worker says about its leases in one request: runs started, runs finished.

    A worker runs a lease as soon as it gets it and reports the start later, often with
    the result, so one entry carries both and a short task costs no request of its own."""

    started: list[LeaseRef] = []
    finished: list[Report] = []


class CancelTask(msgspec.Struct, tag="task.cancel", frozen=True):
    task_id: str


class ExpireLease(msgspec.Struct, tag="task.expire", frozen=True):
    task_id: str
    lease_id: str


class ReturnLease(msgspec.Struct, tag="task.return", frozen=True):
    """The worker never took the lease up (its long-poll answer was lost): requeue, attempt not counted."""

    task_id: str
    lease_id: str


WorkloadCommand = (
    RegisterWorker | SetDraining | RemoveWorker | SubmitTasks | AssignTasks | ReportTasks | CancelTask
    | ExpireLease | ReturnLease
)


class Workload(msgspec.Struct, dict=True):
    """The workload partitions: workers, tasks (each with its history) and idempotency keys.

    `queues` is derived data in the instance's __dict__, which msgspec does not encode.
    """

    workers: dict[str, Worker] = {}
    tasks: dict[str, Task] = {}
    idempotency: dict[str, str] = {}
    next_order: int = 0
    open: dict[str, int] = {}  # ids of tasks not yet finished: what scheduling scans, not all history

    def open_tasks(self) -> list[Task]:
        return [self.tasks[task_id] for task_id in self.open]

    @property
    def queues(self) -> Queues:
        queues = self.__dict__.get("_queues")
        if queues is None:
            queues = self.__dict__["_queues"] = Queues.build(self.open_tasks())
        return queues

    def apply(self, command: WorkloadCommand, at: float, index: int, config: dict[str, str] | None = None) -> tuple[bool, object, str]:
        """Apply one command; (ok, value, error code). `config` is the replicated configuration."""
        handler = getattr(self, "_" + type(command).__name__)
        return handler(command, at, index, BreakerPolicy.from_config(config or {}))

    # ---- workers ----------------------------------------------------------------

    def _RegisterWorker(self, c: RegisterWorker, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        worker = self.workers.get(c.worker)
        if worker is not None and worker.state in ("active", "draining"):
            worker.labels, worker.cpus, worker.memory_mb, worker.slots = dict(c.labels), c.cpus, c.memory_mb, c.slots
            worker.state = "active"
        else:
            breaker = worker.breaker if worker is not None else Breaker()
            self.workers[c.worker] = Worker(c.worker, dict(c.labels), c.cpus, c.memory_mb, c.slots, "active", at, breaker)
        return True, {"worker": c.worker}, ""

    def _SetDraining(self, c: SetDraining, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        worker = self.workers.get(c.worker)
        if worker is None or worker.state not in ("active", "draining"):
            return False, None, "unknown_worker"
        worker.state = "draining" if c.draining else "active"
        return True, {"worker": c.worker, "state": worker.state}, ""

    def _RemoveWorker(self, c: RemoveWorker, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        worker = self.workers.get(c.worker)
        if worker is None or worker.state in ("lost", "gone"):
            return False, None, "unknown_worker"
        worker.state = "lost" if c.lost else "gone"
        reason = "worker lost" if c.lost else "worker deregistered"
        requeued = []
        for task in self.open_tasks():
            if task.state in ACTIVE and task.lease is not None and task.lease.worker == c.worker:
                self._end_attempt(task, at, reason, LOST)
                requeued.append(task.id)
        return True, {"worker": c.worker, "requeued": requeued}, ""

    # ---- tasks --------------------------------------------------------------------

    def _SubmitTasks(self, c: SubmitTasks, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        for n, spec in enumerate(c.specs):
            problem = spec_problem(spec)
            if problem:
                return False, {"task": n, "problem": problem}, "invalid"  # nothing of the batch is applied
        submitted = []
        for n, spec in enumerate(c.specs):
            key = spec.idempotency_key
            if key and key in self.idempotency:
                existing = self.tasks[self.idempotency[key]]
                submitted.append({"id": existing.id, "state": existing.state, "duplicate": True})
                continue
            if c.run_id and not spec.run_id:
                spec = msgspec.structs.replace(spec, run_id=c.run_id)
            task_id = f"t{index}.{n}"
            task = Task(task_id, self.next_order, spec, QUEUED, at, at, not_before=at)
            self.next_order += 1
            task.history.append(Transition(0, "", "", QUEUED, "submitted", at))
            self.tasks[task_id] = task
            self.open[task_id] = task.order
            self.queues.moved(task)
            if key:
                self.idempotency[key] = task_id
            submitted.append({"id": task_id, "state": QUEUED, "duplicate": False})
        return True, submitted, ""

    def _AssignTasks(self, c: AssignTasks, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        worker = self.workers.get(c.worker)
        if worker is None or worker.state != "active":
            return False, [], "worker_unavailable"
        free = worker.slots - self.queues.active_on(c.worker)
        granted = []
        for assignment in c.assignments:
            if free <= 0 or not breaker_admits(worker.breaker, at, policy):
                break
            task = self.tasks.get(assignment.task_id)
            if task is None or task.state != QUEUED or task.not_before > at or task.cancel_requested:
                continue
            if not fits(task.spec.requirements, worker):
                continue
            task.attempt += 1
            task.lease = Lease(assignment.lease_id, c.worker, task.attempt, at, assignment.expires_at)
            self._move(task, LEASED, at, "leased", c.worker)
            if worker.breaker.state != "closed":
                worker.breaker.state, worker.breaker.probe = "half_open", task.id
            free -= 1
            granted.append({"lease_id": task.lease.id, "task_id": task.id, "attempt": task.attempt, "expires_at": task.lease.expires_at})
        return True, granted, ""

    def _started(self, task: Task, at: float) -> None:
        if task.state == LEASED and task.lease is not None:
            self._move(task, RUNNING, at, "started", task.lease.worker)

    def _ReportTasks(self, c: ReportTasks, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        started = [self._start(ref, at) for ref in c.started]
        finished = []
        for report in c.finished:
            error = self._finish(report, at, policy)
            finished.append({"task_id": report.task_id, "lease_id": report.lease_id, "accepted": not error, "error": error})
        return True, {"started": started, "results": finished}, ""

    def _start(self, ref: LeaseRef, at: float) -> dict:
        task = self.tasks.get(ref.task_id)
        answer = {"task_id": ref.task_id, "lease_id": ref.lease_id, "accepted": False, "error": "stale_lease", "cancel_requested": False}
        if task is not None and task.lease is not None and task.lease.id == ref.lease_id and task.state in ACTIVE:
            self._started(task, at)
            answer.update(accepted=True, error="", cancel_requested=task.cancel_requested)
        elif task is not None and ref.lease_id in task.reported:
            answer.update(accepted=True, error="")  # its result came first: the start is implied
        return answer

    def _finish(self, report: Report, at: float, policy: BreakerPolicy) -> str:
        task = self.tasks.get(report.task_id)
        if task is None:
            return "unknown_task"
        if report.lease_id in task.reported:
            return ""  # a re-send of a result already recorded
        lease = task.lease
        if lease is None or lease.id != report.lease_id or task.state not in ACTIVE:
            return "stale_lease"
        outcome = report.outcome
        self._started(task, at)  # a result sent before its start report still shows the run
        task.reported.append(lease.id)
        worker = self.workers.get(lease.worker)
        if outcome.status == SUCCEEDED:
            task.result = outcome
            self._move(task, SUCCEEDED, at, "exit 0", lease.worker)
            self._breaker_success(worker, at)
            for other in dict.fromkeys(task.failed_on):
                if other != lease.worker:
                    self._breaker_failure(self.workers.get(other), at, policy)
            return ""
        if outcome.status == CANCELLED or task.cancel_requested:
            self._release_probe(task)  # a cancel says nothing about the worker's health
            task.result = outcome
            self._move(task, CANCELLED, at, outcome.reason or "cancelled", lease.worker)
            return ""
        if outcome.status == "error":
            self._breaker_failure(worker, at, policy)  # could not even run it: the worker's fault
        elif worker is not None and worker.breaker.probe == task.id:
            self._breaker_failure(worker, at, policy)
        task.failed_on.append(lease.worker)
        terminal = TIMED_OUT if outcome.status == TIMED_OUT else FAILED
        reason = outcome.reason or (f"exit {outcome.exit_code}" if outcome.exit_code is not None else outcome.status)
        if not self._end_attempt(task, at, reason, terminal):
            task.result = outcome
        return ""

    def _CancelTask(self, c: CancelTask, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        task = self.tasks.get(c.task_id)
        if task is None:
            return False, None, "unknown_task"
        if task.state in TERMINAL:
            return False, {"state": task.state}, "already_finished"
        if task.state == QUEUED:
            self._move(task, CANCELLED, at, "cancelled while queued", "")
        else:
            task.cancel_requested = True
        return True, {"task_id": task.id, "state": task.state, "cancel_requested": task.cancel_requested}, ""

    def _ReturnLease(self, c: ReturnLease, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        task = self.tasks.get(c.task_id)
        if task is None or task.lease is None or task.lease.id != c.lease_id or task.state != LEASED:
            return False, None, "stale_lease"
        self._release_probe(task)
        task.attempt -= 1
        task.lease = None
        self._move(task, QUEUED, at, "lease not taken up by the worker", "")
        return True, {"task_id": task.id, "state": task.state}, ""

    def _ExpireLease(self, c: ExpireLease, at: float, index: int, policy: BreakerPolicy) -> tuple[bool, object, str]:
        task = self.tasks.get(c.task_id)
        if task is None or task.lease is None or task.lease.id != c.lease_id or task.state not in ACTIVE:
            return False, None, "stale_lease"
        if task.state == LEASED:  # never started: it did not run, so it did not time out
            return self._ReturnLease(ReturnLease(c.task_id, c.lease_id), at, index, policy)
        self._end_attempt(task, at, "lease expired without a result", TIMED_OUT)
        return True, {"task_id": task.id, "state": task.state}, ""

    # ---- rules ----------------------------------------------------------------------

    def _release_probe(self, task: Task) -> None:
        """A probe that ends without a verdict lets the next one through (after the same cool-down)."""
        worker = self.workers.get(task.lease.worker) if task.lease else None
        if worker is not None and worker.breaker.probe == task.id:
            worker.breaker.state, worker.breaker.probe = "open", ""

    def _end_attempt(self, task: Task, at: float, reason: str, terminal: str) -> bool:
        """Retry the task if attempts remain (True), else end it in `terminal` (False)."""
        worker_record = self.workers.get(task.lease.worker) if task.lease else None
        if worker_record is not None and worker_record.breaker.probe == task.id:
            worker_record.breaker.state, worker_record.breaker.opened_at, worker_record.breaker.probe = "open", at, ""
        worker = task.lease.worker if task.lease else ""
        task.lease = None
        if task.cancel_requested:
            self._move(task, CANCELLED, at, f"cancelled ({reason})", worker)
            return False
        if task.attempt <= task.spec.max_retries:
            task.not_before = at + retry_delay(task.id, task.attempt, task.spec.backoff)
            self._move(task, QUEUED, at, f"retry after {reason}", worker)
            return True
        self._move(task, terminal, at, reason, worker)
        return False

    def _move(self, task: Task, to: str, at: float, reason: str, worker: str) -> None:
        task.history.append(Transition(task.attempt, worker, task.state, to, reason, at))
        task.state, task.updated_at = to, at
        if to in TERMINAL:
            self.open.pop(task.id, None)
        self.queues.moved(task)

    @staticmethod
    def _breaker_success(worker: Worker | None, at: float) -> None:
        if worker is not None:
            worker.breaker = Breaker()

    @staticmethod
    def _breaker_failure(worker: Worker | None, at: float, policy: BreakerPolicy) -> None:
        if worker is None:
            return
        breaker = worker.breaker
        breaker.failures += 1
        if breaker.state == "half_open" or breaker.failures >= policy.threshold:
            breaker.state, breaker.opened_at, breaker.probe = "open", at, ""


def fits(requirements: Requirements, worker: Worker) -> bool:
    return (
        all(worker.labels.get(key) == value for key, value in requirements.labels.items())
        and worker.cpus >= requirements.min_cpus
        and worker.memory_mb >= requirements.min_memory_mb
    )


def breaker_admits(breaker: Breaker, at: float, policy: BreakerPolicy) -> bool:
    """Closed: yes. Open: one probe once the cool-down has passed. Half-open: not while the probe runs."""
    if breaker.state == "closed":
        return True
    if breaker.state == "open":
        return at >= breaker.opened_at + policy.cooldown_s
    return False


def retry_delay(task_id: str, attempt: int, backoff: Backoff) -> float:
    """Exponential and capped, with jitter every node computes alike (from the task id, not an RNG)."""
    ceiling = min(backoff.max_s, backoff.base_s * 2 ** (attempt - 1))
    digest = hashlib.sha256(f"{task_id}/{attempt}".encode()).digest()
    return ceiling * (0.5 + 0.5 * int.from_bytes(digest[:4], "big") / 0xFFFFFFFF)


# ---- the queues a lease request reads -------------------------------------------------

_requirements_key = msgspec.msgpack.Encoder()


class _Group:
    __slots__ = ("priority", "run_id", "requirements", "orders", "ids")

    def __init__(self, priority: int, run_id: str, requirements: Requirements) -> None:
        self.priority, self.run_id, self.requirements = priority, run_id, requirements
        self.orders: list[int] = []  # submission orders of its queued tasks, ascending
        self.ids: dict[int, str] = {}  # order -> task id


class Queues:
    """The queues a lease request reads: derived from the replicated tasks, never encoded.

    Without them every lease request scanned every open task and tested each one's fit:
    a third of the leader's CPU with a thousand tasks queued. Queued tasks sit in groups
    that share priority, run and requirements, so a request tests a worker's fit once per
    group and reads only the heads it takes. Active tasks are counted per run (fair
    share) and per worker (free slots, which the apply path checks too, so every node
    keeps them). Within a group, tasks stay in submission order, so a retried task keeps
    its place and a state restored from a snapshot builds exactly the same queues.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, str, bytes], _Group] = {}
        self._group_of: dict[str, tuple[int, str, bytes]] = {}  # queued task id -> its group
        self._holder: dict[str, str] = {}  # active task id -> worker holding its lease
        self._held: dict[str, set[str]] = {}  # worker -> ids of the active tasks it holds
        self.active_per_run: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        return len(self._group_of)

    @classmethod
    def build(cls, tasks: Iterable[Task]) -> Queues:
        queues = cls()
        for task in tasks:
            queues.moved(task)
        return queues

    def moved(self, task: Task) -> None:
        """Call once `task` is in its new state (new tasks too)."""
        self._unqueue(task)
        worker = self._holder.pop(task.id, None)
        if worker is not None:
            self.active_per_run[task.spec.run_id] -= 1
            held = self._held[worker]
            held.discard(task.id)
            if not held:
                del self._held[worker]
        if task.state == QUEUED:
            spec = task.spec
            key = (spec.priority, spec.run_id, _requirements_key.encode(spec.requirements))
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(spec.priority, spec.run_id, spec.requirements)
            bisect.insort(group.orders, task.order)
            group.ids[task.order] = task.id
            self._group_of[task.id] = key
        elif task.state in ACTIVE and task.lease is not None:
            self._holder[task.id] = task.lease.worker
            self.active_per_run[task.spec.run_id] += 1
            self._held.setdefault(task.lease.worker, set()).add(task.id)

    def held_by(self, worker: str) -> frozenset[str]:
        """Ids of the active (leased or running) tasks whose lease `worker` holds."""
        return frozenset(self._held.get(worker, ()))

    def active_on(self, worker: str) -> int:
        return len(self._held.get(worker, ()))

    def _unqueue(self, task: Task) -> None:
        key = self._group_of.pop(task.id, None)
        if key is not None:
            group = self._groups[key]
            del group.orders[bisect.bisect_left(group.orders, task.order)]
            del group.ids[task.order]
            if not group.orders:
                del self._groups[key]

    def pick(self, tasks: dict[str, Task], worker: Worker, room: int, now: float, skip: Collection[str] = ()) -> list[Task]:
        """Up to `room` queued tasks for `worker`, none in `skip`: highest priority first; within
        it the run with the fewest active tasks; then submission order. Reads only, changes nothing."""
        heads: list[tuple[Task, Iterator[Task], _Group]] = []
        for group in self._groups.values():
            if fits(group.requirements, worker):
                queued = (tasks[group.ids[order]] for order in group.orders)
                ready = (task for task in queued if task.not_before <= now and not task.cancel_requested and task.id not in skip)
                head = next(ready, None)
                if head is not None:
                    heads.append((head, ready, group))
        taken: Counter[str] = Counter()
        picked: list[Task] = []
        while heads and len(picked) < room:
            best = min(
                range(len(heads)),
                key=lambda i: (-heads[i][2].priority, self.active_per_run[heads[i][2].run_id] + taken[heads[i][2].run_id], heads[i][0].order),
            )
            task, ready, group = heads[best]
            picked.append(task)
            taken[group.run_id] += 1
            following = next(ready, None)
            if following is None:
                del heads[best]
            else:
                heads[best] = (following, ready, group)
        return picked
