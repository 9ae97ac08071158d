"""The contract from the outside: out-of-bounds input is refused naming the field, answers are as documented."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from dtfd.devcluster import write_configs
from dtfd.server import bodies as b
from dtfd.server.contract import OPERATIONS
from dtfd.state import tasks as t
from tests.integration.support import running, until
from tests.unit.test_api_contract import BY_OPERATION

pytestmark = pytest.mark.integration

TASK = {"argv": ["true"]}
TOO_MANY = 1 << 64


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(write_configs(tmp_path_factory.mktemp("contract"), nodes=1)) as local:
        yield local


def _task(**fields) -> dict:
    return {"tasks": [TASK | fields]}


# (method, path, body or query, the field the refusal must name)
OUT_OF_BOUNDS = [
    ("PUT", "/v1/kv/k", {"value": "x" * (b.MAX_VALUE + 1)}, "value"),
    ("PUT", "/v1/kv/k", {"value": "v", "seq": -1}, "seq"),
    ("PUT", "/v1/kv/k", {"value": "v", "seq": TOO_MANY}, "seq"),
    ("PUT", "/v1/kv/k", {"value": "v", "client": "c" * (t.MAX_NAME + 1)}, "client"),
    ("PUT", "/v1/kv/" + "k" * (b.MAX_KEY + 1), {"value": "v"}, "key"),
    ("PUT", "/v1/config/breaker.threshold", {"value": "x" * (b.MAX_VALUE + 1)}, "value"),
    ("POST", "/v1/kv", {"ops": []}, "ops"),
    ("POST", "/v1/kv", {"ops": [{"op": "put", "key": "k"}] * (b.MAX_BATCH + 1)}, "ops"),
    ("POST", "/v1/kv", {"ops": [{"op": "rename", "key": "k"}]}, "ops[0].op"),
    ("POST", "/v1/kv", {"ops": [{"op": "put", "key": ""}]}, "ops[0].key"),
    ("POST", "/v1/tasks", {"tasks": []}, "tasks"),
    ("POST", "/v1/tasks", _task(argv=[]), "tasks[0].argv"),
    ("POST", "/v1/tasks", _task(argv=["x"] * (t.MAX_ARGV + 1)), "tasks[0].argv"),
    ("POST", "/v1/tasks", _task(argv=["x" * (t.MAX_ARG + 1)]), "tasks[0].argv[0]"),
    ("POST", "/v1/tasks", _task(argv=["true", "a\0b"]), "tasks[0].argv[1]"),
    ("POST", "/v1/tasks", _task(env={f"V{n}": "" for n in range(t.MAX_ENV + 1)}), "tasks[0].env"),
    ("POST", "/v1/tasks", _task(env={"A": "x" * 40_000, "B": "x" * 40_000}), "tasks[0].env"),
    ("POST", "/v1/tasks", _task(env={"A=B": "x"}), "tasks[0].env"),
    ("POST", "/v1/tasks", _task(env={"DTF_LEASE_ID": "someone-else"}), "tasks[0].env"),
    ("POST", "/v1/tasks", _task(cwd="/tmp/\0"), "tasks[0].cwd"),
    ("POST", "/v1/tasks", _task(requirements={"labels": {f"l{n}": "x" for n in range(t.MAX_LABELS + 1)}}), "tasks[0].requirements.labels"),
    ("POST", "/v1/tasks", _task(requirements={"min_memory_mb": TOO_MANY}), "tasks[0].requirements.min_memory_mb"),
    ("POST", "/v1/tasks", _task(requirements={"min_cpus": -1}), "tasks[0].requirements.min_cpus"),
    ("POST", "/v1/tasks", _task(timeout_s=0), "tasks[0].timeout_s"),
    ("POST", "/v1/tasks", _task(timeout_s=t.MAX_TIMEOUT_S + 1), "tasks[0].timeout_s"),
    ("POST", "/v1/tasks", _task(max_retries=t.MAX_RETRIES + 1), "tasks[0].max_retries"),
    ("POST", "/v1/tasks", _task(priority=t.MAX_PRIORITY + 1), "tasks[0].priority"),
    ("POST", "/v1/tasks", _task(backoff={"base_s": 10, "max_s": 5}), "tasks[0].backoff"),
    ("POST", "/v1/tasks", _task(shell=True, argv=["echo", "two strings"]), "tasks[0].argv"),
    ("POST", "/v1/tasks", _task(idempotency_key="k" * (t.MAX_NAME + 1)), "tasks[0].idempotency_key"),
    ("POST", "/v1/workers/register", {"id": ""}, "id"),
    ("POST", "/v1/workers/register", {"id": "w", "slots": b.MAX_SLOTS + 1}, "slots"),
    ("POST", "/v1/workers/register", {"id": "w", "memory_mb": TOO_MANY}, "memory_mb"),
    ("POST", "/v1/workers/register", {"id": "w", "labels": {"": "x"}}, "labels"),
    ("POST", "/v1/workers/w/lease", {"max": 0}, "max"),
    ("POST", "/v1/workers/w/lease", {"wait_s": b.MAX_WAIT_S + 1}, "wait_s"),
    ("POST", "/v1/workers/w/heartbeat", {"leases": ["l"] * (b.MAX_SLOTS + 1)}, "leases"),
    ("POST", "/v1/results", {"results": [{"task_id": "t", "lease_id": "l", "status": "fine"}]}, "results[0].status"),
    ("POST", "/v1/results", {"results": [{"task_id": "t", "lease_id": "l", "status": "failed", "exit_code": TOO_MANY}]}, "results[0].exit_code"),
    ("POST", "/v1/recovery", {"node": "n", "failure": "f", "action": "a", "result": "r", "reason": "x" * (b.MAX_REASON + 1)}, "reason"),
    ("POST", "/v1/leadership/transfer", {"to": "n" * (t.MAX_NAME + 1)}, "to"),
    ("GET", "/v1/tasks", {"limit": "0"}, "limit"),
    ("GET", "/v1/tasks", {"limit": str(b.MAX_PAGE + 1)}, "limit"),
    ("GET", "/v1/tasks", {"limit": "ten"}, "limit"),
    ("GET", "/v1/tasks", {"after": "-2"}, "after"),
    ("GET", "/v1/tasks", {"state": "sleeping"}, "state"),
]


def test_out_of_bounds_input_is_refused_naming_the_field_and_nothing_is_applied(cluster):
    leader = cluster.wait_leader()
    with cluster.client(leader) as c:
        until(lambda: c.get("/v1/history").json()["leaders"], what="the leader's own record applied")
        applied = cluster.status(leader)["applied_index"]
        for method, path, data, field in OUT_OF_BOUNDS:
            reply = c.request(method, path, params=data) if method == "GET" else c.request(method, path, json=data)
            message = reply.json()["error"]["message"]
            assert reply.status_code == 422 and message.startswith(field), (method, path, field, reply.status_code, message)
        assert c.put("/v1/kv/k", content=b'{"value": "\x80"}').status_code == 400  # not UTF-8: this once answered 500
        huge = c.post("/v1/tasks", content=b'{"tasks": [{"argv": ["' + b"x" * (2 << 20) + b'"]}]}')
        assert huge.status_code == 413 and "exceeds" in huge.json()["error"]["message"]
    assert cluster.status(leader)["applied_index"] == applied


def _documented(shape: object, actual: object, where: str = "") -> None:
    """Every field of `actual` is in the documented `shape` with the same value (defaults may be left out)."""
    if isinstance(actual, dict):
        assert isinstance(shape, dict), where
        undocumented = set(actual) - set(shape)
        assert not undocumented, f"{where}: {sorted(undocumented)} not in the document"
        for key, value in actual.items():
            _documented(shape[key], value, f"{where}.{key}")
    elif isinstance(actual, list):
        assert isinstance(shape, list) and len(shape) == len(actual), where
        for n, (documented, value) in enumerate(zip(shape, actual)):
            _documented(documented, value, f"{where}[{n}]")
    else:
        assert shape == actual, where


class _Walk:
    def __init__(self, client: httpx.Client) -> None:
        self.client, self.seen = client, set()

    def __call__(self, method: str, route: str, path: str | None = None, **request) -> dict:
        """One request to `route`; its answer must have the documented status and shape."""
        reply = self.client.request(method, path or route, **request)
        contract, answer_type = OPERATIONS[(method, route)], BY_OPERATION[(method, route)].answer
        assert reply.status_code == contract.status, (method, route, reply.status_code, reply.text)
        self.seen.add((method, route))
        if answer_type is None:
            return {}
        answer = reply.json()
        _documented(msgspec.to_builtins(msgspec.convert(answer, answer_type)), answer, f"{method} {route}")
        return answer


NOT_WALKED = {  # they move leadership or need a lagging follower: schemathesis checks their refusals
    ("POST", "/v1/leadership/transfer"), ("POST", "/v1/admin/step-down"), ("POST", "/v1/admin/catch-up"),
}


def test_every_route_answers_with_the_documented_status_and_shape(cluster):
    leader = cluster.wait_leader()
    with cluster.client(leader) as client:
        call = _Walk(client)
        for route in ("/health", "/ready", "/leader", "/metrics", "/v1/openapi.json", "/v1/status", "/v1/history"):
            call("GET", route)
        call("PUT", "/v1/kv/{key}", "/v1/kv/greeting", json={"value": "hello", "client": "walk", "seq": 1})
        call("GET", "/v1/kv/{key}", "/v1/kv/greeting")
        call("POST", "/v1/kv/{key}/cas", "/v1/kv/greeting/cas", json={"expected": "hello", "value": "hi"})
        call("POST", "/v1/kv", json={"ops": [{"op": "put", "key": "a", "value": "1"}, {"op": "delete", "key": "b"}]})
        call("DELETE", "/v1/kv/{key}", "/v1/kv/greeting")
        call("PUT", "/v1/config/{key}", "/v1/config/walk.setting", json={"value": "1"})
        call("POST", "/v1/recovery", json={"node": "node1", "failure": "crash", "action": "restart", "result": "ok"})
        call("POST", "/v1/workers/register", json={"id": "walker", "labels": {"pool": "walk"}, "slots": 2})
        submitted = call("POST", "/v1/tasks", json={"run_id": "walk", "tasks": [
            {"argv": ["true"], "name": "runs", "requirements": {"labels": {"pool": "walk"}}},
            {"argv": ["true"], "name": "cancelled", "requirements": {"labels": {"pool": "nobody"}}},
        ]})
        ran, cancelled = (task["id"] for task in submitted["tasks"])
        (grant,) = call("POST", "/v1/workers/{id}/lease", "/v1/workers/walker/lease", json={"max": 2, "wait_s": 5})["leases"]
        assert grant["task_id"] == ran
        call("POST", "/v1/leases/{id}/start", f"/v1/leases/{grant['lease_id']}/start", json={"task_id": ran})
        call("POST", "/v1/workers/{id}/heartbeat", "/v1/workers/walker/heartbeat", json={"leases": [grant["lease_id"]]})
        junit = [{"name": "test_walk", "classname": "tests", "status": "passed", "duration_s": 0.1}]
        result = {"task_id": ran, "lease_id": grant["lease_id"], "status": "succeeded", "exit_code": 0, "junit": junit}
        assert call("POST", "/v1/results", json={"results": [result]})["results"][0]["accepted"]
        assert call("POST", "/v1/results", json={"results": [result]})["results"][0]["accepted"]  # a re-send: acknowledged ...
        call("POST", "/v1/tasks/{id}/cancel", f"/v1/tasks/{cancelled}/cancel")
        views = [call("GET", "/v1/tasks/{id}", f"/v1/tasks/{task_id}") for task_id in (ran, cancelled)]
        assert [h["to_state"] for h in views[0]["history"]].count("succeeded") == 1  # ... and recorded once
        assert views[1]["state"] == "cancelled"
        call("GET", "/v1/tasks", params={"run": "walk"})
        call("GET", "/v1/runs")
        call("GET", "/v1/runs/{id}", "/v1/runs/walk")
        call("GET", "/v1/workers")
        call("POST", "/v1/workers/{id}/drain", "/v1/workers/walker/drain", json={"draining": True})
        call("DELETE", "/v1/workers/{id}", "/v1/workers/walker")
        if ("POST", "/v1/admin/compact") in BY_OPERATION:
            call("POST", "/v1/admin/compact", json={})
    assert set(OPERATIONS) - call.seen == NOT_WALKED & set(OPERATIONS)
