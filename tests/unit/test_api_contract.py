"""The API contract cannot rot: every route documented, every example decodes with the type it shows.

Examples live in dtfd/server/contract.py as plain JSON; here each one is decoded with the
type its route declares (bounds, required and unknown fields included) and must come back
unchanged, so a renamed field, a dropped bound or a stale example fails here, not in a
client. The same types generate the OpenAPI document; the schemathesis test checks the
live server's answers against it.
"""

from __future__ import annotations

import re

import msgspec
import pytest

from dtfd.scheduler.scheduler import Scheduler
from dtfd.server import auth, openapi
from dtfd.server.api import Api
from dtfd.server.contract import OPERATIONS
from dtfd.server.workload_api import WorkloadApi
from dtfd.state import tasks as t


class _NoNode:
    machine = None


def _routes() -> list:
    api = Api(_NoNode(), metrics=None, tokens=None, api_addresses={})  # type: ignore[arg-type]
    WorkloadApi(api, Scheduler.__new__(Scheduler))
    return api.routes


ROUTES = _routes()
BY_OPERATION = {(route.method, route.name): route for route in ROUTES}


def test_every_route_has_a_contract_entry_and_every_entry_a_route():
    assert set(OPERATIONS) == set(BY_OPERATION)
    undocumented = [key for key, route in BY_OPERATION.items() if route.answer is None and route.name != "/metrics"]
    assert undocumented == []


@pytest.mark.parametrize("key", sorted(OPERATIONS), ids=" ".join)
def test_examples_decode_with_the_types_they_document_and_come_back_unchanged(key):
    route, contract = BY_OPERATION[key], OPERATIONS[key]
    if route.answer is not None:
        answer = msgspec.convert(contract.example, route.answer)
        assert msgspec.to_builtins(answer) == contract.example
    assert (contract.request is None) == (route.body is None)
    if route.body is not None:
        request = msgspec.json.decode(msgspec.json.encode(contract.request), type=route.body)  # bounds; unknown fields refused
        for spec in getattr(request, "tasks", []):
            assert t.spec_problem(spec) == ""
    assert set(contract.params) == set(re.findall(r"\{(\w+)\}", route.name))


def test_links_point_at_real_operations_and_their_parameters():
    for key, contract in OPERATIONS.items():
        for name, link in contract.links.items():
            assert link.to in BY_OPERATION, (key, name)
            assert set(link.parameters) == set(re.findall(r"\{(\w+)\}", link.to[1])), (key, name)


def test_document_carries_bounds_examples_links_and_answers():
    document = openapi.document(ROUTES, "0.1.0")
    schemas = document["components"]["schemas"]
    argv = schemas["TaskSpec"]["properties"]["argv"]
    assert (argv["minItems"], argv["maxItems"], argv["items"]["maxLength"]) == (1, t.MAX_ARGV, t.MAX_ARG)
    assert schemas["TaskSpec"]["properties"]["env"]["maxProperties"] == t.MAX_ENV
    assert schemas["Requirements"]["properties"]["labels"]["maxProperties"] == t.MAX_LABELS
    assert schemas["TaskSpec"]["properties"]["timeout_s"] == {"type": "number", "exclusiveMinimum": 0, "maximum": t.MAX_TIMEOUT_S, "default": 600.0}
    assert schemas["PutBody"]["properties"]["seq"]["maximum"] == t.INT64
    submit = document["paths"]["/v1/tasks"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["example"] == OPERATIONS[("POST", "/v1/tasks")].request
    created = submit["responses"]["201"]
    assert created["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SubmitAnswer"}
    assert created["links"]["Task"] == {"operationId": "get_get_task", "parameters": {"id": "$response.body#/tasks/0/id"}}
    assert {"401", "403", "429", "400", "413", "422", "default"} <= set(submit["responses"])
    assert "Retry-After" in submit["responses"]["429"]["headers"]
    limit = next(p for p in document["paths"]["/v1/tasks"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["in"] == "query" and limit["schema"]["maximum"] == 500
    assert "security" not in document["paths"]["/health"]["get"] and "401" not in document["paths"]["/health"]["get"]["responses"]


def test_failed_authentications_are_limited_per_address_and_per_token_prefix_in_bounded_memory():
    now = [0.0]
    failures = auth.Failures(clock=lambda: now[0])
    assert [failures.refusal("10.0.0.1", f"Bearer guess{n:04d}")[0] for n in range(int(auth.FAILURE_BURST))] == [0.0] * 20
    wait, limit = failures.refusal("10.0.0.1", "Bearer other-prefix")
    assert wait == 1.0 / auth.FAILURES_PER_S and limit == "from this address"
    for n in range(int(auth.FAILURE_BURST)):  # many addresses, one prefix
        assert failures.refusal(f"10.1.0.{n}", f"Bearer targetab-{n:08d}")[0] == 0.0
    wait, limit = failures.refusal("10.2.0.1", "Bearer targetab-another-guess")
    assert wait > 0 and limit == "with tokens starting like this one"
    now[0] = 1.0 / auth.FAILURES_PER_S
    assert failures.refusal("10.0.0.1", "Bearer fresh-prefix")[0] == 0.0  # the address earned one more try
    for n in range(3 * auth.TRACKED):  # ever new addresses and prefixes: memory stays bounded
        failures.refusal(f"a{n}", f"Bearer p{n:08d}")
    assert len(failures.by_address._buckets) <= auth.TRACKED and len(failures.by_prefix._buckets) <= auth.TRACKED
