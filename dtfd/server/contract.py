"""Per operation, what the route table does not say: the success status, examples and links.

The route table declares each route's body, query and answer types; here each operation
gets an example request and answer and the links to the operations its answer feeds.
tests/unit/test_api_contract.py decodes every example with the type it documents (its
route's body or answer type, bounds included), so an example cannot drift from the
contract, and requires an entry for every route. Links tell a client, and schemathesis'
stateful phase, which value of an answer goes into which next request.
"""

from __future__ import annotations

from typing import NamedTuple


class Link(NamedTuple):
    to: tuple[str, str]  # (method, route name) of the next operation
    parameters: dict[str, str]  # its path parameters, as OpenAPI runtime expressions


class Operation(NamedTuple):
    example: object  # a success answer (text for /metrics)
    status: int = 200
    request: dict | None = None  # a request body, for routes that take one
    params: dict[str, str] = {}  # path parameters of the example
    links: dict[str, Link] = {}


CHECKSUM = "9f2c4e0b7d1a6f3e8c5b2a9d4f7e1c6b3a8d5f2e9c4b7a1d6e3f8c5b2a9d4f7e"
LEASE_ID = "5b0f2d6c9a8e4f71b3c2d1e0f9a8b7c6"
PREVIOUS_LEASE_ID = "0c1d2e3f4a5b46c7d8e9f0a1b2c3d4e5"
SPEC = {
    "argv": ["pytest", "-q", "tests/test_api.py"],
    "env": {"CI": "1"},
    "timeout_s": 900.0,
    "requirements": {"labels": {"os": "linux"}, "min_cpus": 1.0, "min_memory_mb": 2048},
    "max_retries": 1,
    "backoff": {"base_s": 5.0, "max_s": 60.0},
    "run_id": "nightly-2026-01-01",
    "name": "api tests",
    "junit": "report.xml",
}
FULL_SPEC = {"shell": False, "cwd": "", "priority": 0, "idempotency_key": ""} | SPEC
OUTCOME = {
    "status": "failed",
    "exit_code": 1,
    "duration_s": 12.4,
    "peak_rss_bytes": 104857600,
    "cpu_s": 9.8,
    "output_tail": "FAILED tests/test_api.py::test_timeout - AssertionError\n1 failed, 41 passed in 12.31s\n",
    "truncated": False,
    "reason": "",
    "junit": [{"name": "test_timeout", "classname": "tests.test_api", "status": "failed", "duration_s": 0.52,
               "message": "AssertionError: 504 != 200"}],
}
BRIEF = {
    "id": "t42.0", "name": "api tests", "run_id": "nightly-2026-01-01", "state": "failed", "attempt": 2,
    "worker": "ci-worker-1", "priority": 0, "submitted_at": 1767225600.0, "updated_at": 1767225642.7, "order": 17,
    "exit_code": 1, "duration_s": 12.4,
}
HISTORY = [
    (0, "", "", "queued", "submitted", 1767225600.0),
    (1, "ci-worker-2", "queued", "leased", "leased", 1767225600.2),
    (1, "ci-worker-2", "leased", "running", "started", 1767225600.3),
    (1, "ci-worker-2", "running", "queued", "retry after exit 1", 1767225611.9),
    (2, "ci-worker-1", "queued", "leased", "leased", 1767225612.1),
    (2, "ci-worker-1", "leased", "running", "started", 1767225612.2),
    (2, "ci-worker-1", "running", "failed", "exit 1", 1767225642.7),
]
WRITE = {"ok": True, "value": "hello", "index": 42}
KEY = {"key": "$request.path.key"}
BATCH_KEY = {"key": "$request.body#/ops/0/key"}
TASK = {"id": "$response.body#/tasks/0/id"}
WORKER = {"id": "$request.body#/id"}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/health"): Operation({"status": "ok", "node": "node1"}),
    ("GET", "/ready"): Operation({"status": "ready", "leader": "node2"}),
    ("GET", "/leader"): Operation({"leader": "node2", "term": 7}),
    ("GET", "/metrics"): Operation("# TYPE dtf_raft_term gauge\ndtf_raft_term 7.0\n"),
    ("GET", "/v1/openapi.json"): Operation(
        {"openapi": "3.1.0", "info": {"title": "dtf coordinator API", "version": "0.1.0"}, "paths": {}, "components": {}},
    ),
    ("GET", "/v1/status"): Operation({
        "id": "node1", "role": "follower", "term": 7, "leader": "node2", "leader_api": "10.0.0.2:8080",
        "commit_index": 1204, "applied_index": 1204, "last_index": 1204, "snapshot_index": 1000, "rejoining": False,
        "checksum": CHECKSUM, "checkpoints": [{"index": 1024, "checksum": CHECKSUM}],
        "peers": {"node2": {"match_index": 1204, "next_index": 1205, "lag": 0, "state": "replicate"},
                  "node3": {"match_index": 1203, "next_index": 1204, "lag": 1, "state": "replicate"}},
        "uptime_s": 3605.25, "version": "0.1.0",
        "tasks": {"queued": 3, "running": 8, "succeeded": 120}, "workers": {"active": 4},
    }),
    ("GET", "/v1/kv/{key}"): Operation({"key": "greeting", "value": "hello", "applied_index": 42}, params={"key": "greeting"}),
    ("PUT", "/v1/kv/{key}"): Operation(
        WRITE, request={"value": "hello", "client": "deploy-7f3a", "seq": 1}, params={"key": "greeting"},
        links={
            "Read": Link(("GET", "/v1/kv/{key}"), KEY),
            "CompareAndSet": Link(("POST", "/v1/kv/{key}/cas"), KEY),
            "Delete": Link(("DELETE", "/v1/kv/{key}"), KEY),
        },
    ),
    ("DELETE", "/v1/kv/{key}"): Operation(WRITE, request={"client": "deploy-7f3a", "seq": 3}, params={"key": "greeting"}),
    ("POST", "/v1/kv/{key}/cas"): Operation(
        {"ok": True, "value": "hi", "index": 43}, request={"expected": "hello", "value": "hi", "client": "deploy-7f3a", "seq": 2},
        params={"key": "greeting"},
    ),
    ("POST", "/v1/kv"): Operation(
        {"ok": True, "value": [{"ok": True, "value": "1", "index": 44}, {"ok": True, "index": 44}], "index": 44},
        request={"ops": [{"op": "put", "key": "build.number", "value": "1"}, {"op": "delete", "key": "build.lock"}],
                 "client": "ci", "seq": 9},
        links={
            "Read": Link(("GET", "/v1/kv/{key}"), BATCH_KEY),
            "CompareAndSet": Link(("POST", "/v1/kv/{key}/cas"), BATCH_KEY),
            "Delete": Link(("DELETE", "/v1/kv/{key}"), BATCH_KEY),
        },
    ),
    ("PUT", "/v1/config/{key}"): Operation({"ok": True, "value": "5", "index": 45}, request={"value": "5"}, params={"key": "breaker.threshold"}),
    ("POST", "/v1/leadership/transfer"): Operation({"from": "node2", "to": "node3"}, 202, request={"to": "node3"}),
    ("GET", "/v1/history"): Operation({
        "leaders": [{"node": "node1", "term": 6, "at": 1767225000.0}, {"node": "node2", "term": 7, "at": 1767225012.4}],
        "recoveries": [{"node": "node1", "failure": "crash", "action": "restart", "result": "ok", "reason": "process gone; exit 137",
                        "started": 1767225010.0, "finished": 1767225012.0, "at": 1767225012.3}],
    }),
    ("POST", "/v1/recovery"): Operation(
        {"ok": True, "value": {"node": "node1", "action": "restart", "result": "ok"}, "index": 46},
        request={"node": "node1", "failure": "crash", "action": "restart", "result": "ok", "reason": "process gone; exit 137",
                 "started": 1767225010.0, "finished": 1767225012.0, "client": "recoveryd-17", "seq": 1},
    ),
    ("POST", "/v1/admin/compact"): Operation({"node": "node1", "snapshot_index": 1204, "previous_snapshot_index": 1000}, request={}),
    ("POST", "/v1/admin/step-down"): Operation({"node": "node2", "term": 7}, request={}),
    ("POST", "/v1/admin/catch-up"): Operation(
        {"leader": "node2", "to": "node3", "snapshot_index": 1204, "match_index": 310}, request={"to": "node3"},
    ),
    ("POST", "/v1/tasks"): Operation(
        {"tasks": [{"id": "t42.0", "state": "queued", "duplicate": False}], "duplicate": False}, 201,
        request={"tasks": [SPEC], "run_id": "nightly-2026-01-01", "client": "dtfctl-3e9b", "seq": 1},
        links={
            "Task": Link(("GET", "/v1/tasks/{id}"), TASK),
            "Cancel": Link(("POST", "/v1/tasks/{id}/cancel"), TASK),
            "Run": Link(("GET", "/v1/runs/{id}"), {"id": "$request.body#/run_id"}),
        },
    ),
    ("GET", "/v1/tasks"): Operation({"tasks": [BRIEF], "next": "17"}, links={"Task": Link(("GET", "/v1/tasks/{id}"), TASK)}),
    ("GET", "/v1/tasks/{id}"): Operation(
        BRIEF | {
            "spec": FULL_SPEC, "cancel_requested": False, "not_before": 1767225612.0, "lease": None, "result": OUTCOME,
            "history": [dict(zip(("attempt", "worker", "from_state", "to_state", "reason", "at"), row)) for row in HISTORY],
        },
        params={"id": "t42.0"},
    ),
    ("POST", "/v1/tasks/{id}/cancel"): Operation({"task_id": "t42.0", "state": "running", "cancel_requested": True}, params={"id": "t42.0"}),
    ("GET", "/v1/runs"): Operation(
        {"runs": [{"run_id": "nightly-2026-01-01", "total": 42, "states": {"succeeded": 41, "failed": 1},
                   "submitted_at": 1767225600.0, "done": True}]},
        links={"Run": Link(("GET", "/v1/runs/{id}"), {"id": "$response.body#/runs/0/run_id"})},
    ),
    ("GET", "/v1/runs/{id}"): Operation(
        {"run_id": "nightly-2026-01-01", "total": 42, "states": {"succeeded": 41, "failed": 1}, "done": True,
         "failures": [{"id": "t42.0", "name": "api tests", "state": "failed", "reason": "exit 1"}],
         "junit": {"cases": 412, "failed": 1,
                   "slowest": [{"task": "t42.0", "name": "test_timeout", "classname": "tests.test_api", "duration_s": 0.52}]}},
        params={"id": "nightly-2026-01-01"},
    ),
    ("GET", "/v1/workers"): Operation({"workers": [{
        "id": "ci-worker-1", "labels": {"os": "linux"}, "cpus": 8.0, "memory_mb": 16384, "slots": 4, "state": "active",
        "registered_at": 1767225000.0, "breaker": {"state": "closed", "failures": 0, "opened_at": 0.0, "probe": ""},
    }]}),
    ("POST", "/v1/workers/register"): Operation(
        {"heartbeat_s": 2.0, "lost_after_s": 10.0},
        request={"id": "ci-worker-1", "labels": {"os": "linux"}, "cpus": 8.0, "memory_mb": 16384, "slots": 4},
        links={
            "Heartbeat": Link(("POST", "/v1/workers/{id}/heartbeat"), WORKER),
            "Drain": Link(("POST", "/v1/workers/{id}/drain"), WORKER),
            "Deregister": Link(("DELETE", "/v1/workers/{id}"), WORKER),
        },
    ),
    ("POST", "/v1/workers/{id}/heartbeat"): Operation(
        {"cancel": [], "unknown": []}, request={"leases": [LEASE_ID]}, params={"id": "ci-worker-1"},
    ),
    ("POST", "/v1/workers/{id}/lease"): Operation(
        {
            "leases": [{"lease_id": LEASE_ID, "task_id": "t42.0", "attempt": 1, "expires_at": 1767226565.1, "spec": FULL_SPEC}],
            "results": [{"task_id": "t41.0", "lease_id": PREVIOUS_LEASE_ID, "accepted": True, "error": ""}],
            "started": [],
        },
        request={"max": 1, "wait_s": 0.0, "results": [{"task_id": "t41.0", "lease_id": PREVIOUS_LEASE_ID} | OUTCOME]},
        params={"id": "ci-worker-1"},
    ),
    ("POST", "/v1/workers/{id}/drain"): Operation(
        {"worker": "ci-worker-1", "state": "draining"}, request={"draining": True}, params={"id": "ci-worker-1"},
    ),
    ("DELETE", "/v1/workers/{id}"): Operation({"worker": "ci-worker-1", "requeued": []}, params={"id": "ci-worker-1"}),
    ("POST", "/v1/leases/{id}/start"): Operation(
        {"task_id": "t42.0", "lease_id": LEASE_ID, "accepted": True, "error": "", "cancel_requested": False},
        request={"task_id": "t42.0"}, params={"id": LEASE_ID},
    ),
    ("POST", "/v1/results"): Operation(
        {
            "results": [{"task_id": "t41.0", "lease_id": PREVIOUS_LEASE_ID, "accepted": True, "error": ""}],
            "started": [{"task_id": "t42.0", "lease_id": LEASE_ID, "accepted": True, "error": "", "cancel_requested": False}],
        },
        request={
            "results": [{"task_id": "t41.0", "lease_id": PREVIOUS_LEASE_ID} | OUTCOME],
            "started": [{"task_id": "t42.0", "lease_id": LEASE_ID}],
        },
    ),
}
