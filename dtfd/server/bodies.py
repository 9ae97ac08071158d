"""What the HTTP API takes and gives: request bodies, query strings and answers, with their bounds.

Dispatch decodes every request with these types (unknown fields refused, every size and
range bounded through msgspec Meta constraints), and openapi.py generates the document's
schemas from the same types, so a bound is stated once and holds where it is stated. The
task spec and a worker's outcome are the replicated types themselves (dtfd/state/tasks.py).
Answers are what the handlers build; tests/integration/test_api_contract.py and the
schemathesis run hold the live server's answers to these types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from dtfd.state import tasks as t
from dtfd.state.health import LeaderChange, RecoveryEvent

MAX_KEY = 256
MAX_VALUE = 65536
MAX_BATCH = 10_000  # operations in one batch write, tasks in one submission, results in one report
MAX_PAGE = 500
MAX_SLOTS = 1024
MAX_WAIT_S = 600.0  # the longest long-poll a worker may ask for; the coordinator caps it lower
MAX_REASON = 8192

Key = Annotated[str, Meta(min_length=1, max_length=MAX_KEY)]
Value = Annotated[str, Meta(max_length=MAX_VALUE)]
Sequence = Annotated[int, Meta(ge=0, le=t.INT64)]
WorkerId = Annotated[str, Meta(min_length=1, max_length=128)]


# ---- requests -----------------------------------------------------------------------


class ClientFields(t.Strict, kw_only=True):
    client: t.Name = ""  # with seq: a retry of the same (client, seq) is applied once
    seq: Sequence = 0


class PutBody(ClientFields):
    value: Value


class CasBody(ClientFields):
    expected: Value | None  # null: the key must be absent
    value: Value


class BatchOp(t.Strict):
    op: Literal["put", "delete", "cas"]
    key: Key
    value: Value = ""
    expected: Value | None = None


class BatchBody(ClientFields):
    ops: Annotated[list[BatchOp], Meta(min_length=1, max_length=MAX_BATCH)]


class TransferBody(t.Strict):
    to: t.Name = ""  # empty: the most caught-up follower


class RecoveryBody(ClientFields):
    """One finished recoveryd action, for the replicated history."""

    node: t.Name
    failure: t.Name
    action: t.Name
    result: t.Name
    reason: Annotated[str, Meta(max_length=MAX_REASON)] = ""
    started: t.Seconds = 0.0  # recoveryd's clock, seconds since the epoch
    finished: t.Seconds = 0.0


class SubmitBody(ClientFields):
    tasks: Annotated[list[t.TaskSpec], Meta(min_length=1, max_length=MAX_BATCH)]
    run_id: t.Name = ""


class RegisterBody(t.Strict):
    id: WorkerId
    labels: t.Labels = {}
    cpus: t.Cpus = 1.0
    memory_mb: t.MemoryMb = 1024
    slots: Annotated[int, Meta(ge=1, le=MAX_SLOTS)] = 1


class HeartbeatBody(t.Strict):
    leases: Annotated[list[t.Name], Meta(max_length=MAX_SLOTS)] = []  # the leases it is running


class StartBody(t.Strict):
    task_id: t.Name


class StartedBody(t.Strict):
    task_id: t.Name
    lease_id: t.Name


class ResultBody(t.Outcome, kw_only=True):
    task_id: t.Name
    lease_id: t.Name


class ResultsBody(t.Strict, kw_only=True):
    """A worker's reports, applied as one command: runs started (before they run) and runs finished."""

    results: Annotated[list[ResultBody], Meta(max_length=MAX_BATCH)] = []
    started: Annotated[list[StartedBody], Meta(max_length=MAX_SLOTS)] = []


class LeaseBody(ResultsBody, kw_only=True):
    """A long-poll for up to `max` leases; the results it carries are applied before it waits."""

    max: Annotated[int, Meta(ge=1, le=MAX_SLOTS)] = 1
    wait_s: Annotated[float, Meta(ge=0, le=MAX_WAIT_S)] = 10.0  # long-poll: how long to wait for work


class DrainBody(t.Strict):
    draining: bool = True


class TaskQuery(msgspec.Struct, kw_only=True):
    """GET /v1/tasks: filters and a page; unknown parameters are ignored, as query strings go."""

    run: t.Name = ""
    state: Literal["", "queued", "leased", "running", "succeeded", "failed", "timed_out", "cancelled", "lost"] = ""
    worker: t.Name = ""
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 100
    after: Annotated[int, Meta(ge=-1, le=t.INT64)] = -1  # the `next` cursor of the previous page
    stale: Literal["", "ok"] = ""  # ok: read this node's state without a ReadIndex round


# ---- answers ------------------------------------------------------------------------


class HealthAnswer(msgspec.Struct):
    status: str
    node: str


class ReadyAnswer(msgspec.Struct):
    status: str
    leader: str


class LeaderAnswer(msgspec.Struct):
    leader: str
    term: int


class OpenApiAnswer(msgspec.Struct):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]


class PeerView(msgspec.Struct):
    match_index: int
    next_index: int
    lag: int
    state: str


class Checkpoint(msgspec.Struct):
    index: int
    checksum: str


class StatusAnswer(msgspec.Struct, kw_only=True):
    id: str
    role: str
    term: int
    leader: str
    leader_api: str
    commit_index: int
    applied_index: int
    last_index: int
    snapshot_index: int
    rejoining: bool
    checksum: str  # SHA-256 of the state at applied_index: equal on every node at the same index
    checkpoints: list[Checkpoint] = []  # recent (index, checksum) pairs, to compare nodes at different indexes
    peers: dict[str, PeerView]
    uptime_s: float
    version: str
    tasks: dict[str, int]  # count by state
    workers: dict[str, int]


class KvAnswer(msgspec.Struct):
    key: str
    value: str
    applied_index: int


class TransferAnswer(msgspec.Struct):
    from_: str = msgspec.field(name="from")
    to: str


class HistoryAnswer(msgspec.Struct):
    leaders: list[LeaderChange]
    recoveries: list[RecoveryEvent]


class Submitted(msgspec.Struct):
    id: str
    state: str
    duplicate: bool  # an idempotency key already used: this is the first task


class SubmitAnswer(msgspec.Struct):
    tasks: list[Submitted]
    duplicate: bool  # the whole submission was a retry of the same (client, seq)


class TaskBrief(msgspec.Struct, kw_only=True):
    id: str
    name: str
    run_id: str
    state: str
    attempt: int
    worker: str
    priority: int
    submitted_at: float
    updated_at: float
    order: int
    exit_code: int | None = None  # with a result
    duration_s: float = 0.0


class TaskAnswer(TaskBrief, kw_only=True):
    spec: t.TaskSpec
    cancel_requested: bool
    not_before: float
    lease: t.Lease | None
    result: t.Outcome | None
    history: list[t.TransitionFields]


class TaskPage(msgspec.Struct):
    tasks: list[TaskBrief]
    next: str  # pass as `after` for the next page; empty on the last


class CancelAnswer(msgspec.Struct):
    task_id: str
    state: str
    cancel_requested: bool  # leased or running: the worker is told to kill it


class RunTotals(msgspec.Struct):
    run_id: str
    total: int
    states: dict[str, int]
    submitted_at: float
    done: bool


class RunsAnswer(msgspec.Struct):
    runs: list[RunTotals]


class RunFailure(msgspec.Struct):
    id: str
    name: str
    state: str
    reason: str


class SlowCase(msgspec.Struct):
    task: str
    name: str
    classname: str
    duration_s: float


class JunitTotals(msgspec.Struct):
    cases: int
    failed: int
    slowest: list[SlowCase]


class Run(msgspec.Struct):
    run_id: str
    total: int
    states: dict[str, int]
    done: bool
    failures: list[RunFailure]
    junit: JunitTotals


class WorkersAnswer(msgspec.Struct):
    workers: list[t.Worker]


class RegisterAnswer(msgspec.Struct):
    heartbeat_s: float
    lost_after_s: float


class HeartbeatAnswer(msgspec.Struct):
    cancel: list[str]  # leases to kill
    unknown: list[str]  # leases the coordinator does not hold: stop them, report nothing


class Grant(msgspec.Struct):
    lease_id: str
    task_id: str
    attempt: int
    expires_at: float
    spec: t.TaskSpec


class LeaseAnswer(msgspec.Struct):
    leases: list[Grant]
    results: list[Acknowledgement]
    started: list[StartAnswer]


class WorkerStateAnswer(msgspec.Struct):
    worker: str
    state: str


class RemovedAnswer(msgspec.Struct):
    worker: str
    requeued: list[str]


class Acknowledgement(msgspec.Struct):
    task_id: str
    lease_id: str
    accepted: bool
    error: str  # stale_lease: the task was leased again; this result is not recorded


class StartAnswer(Acknowledgement):
    cancel_requested: bool  # run it only to stop it: it was cancelled meanwhile


class ResultsAnswer(msgspec.Struct):
    results: list[Acknowledgement]
    started: list[StartAnswer]

