"""The authorization matrix, walked route by route: no token, each role, and token guessing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dtfd.devcluster import write_configs
from tests.integration.support import running, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(write_configs(tmp_path_factory.mktemp("authz"), nodes=1)) as local:
        yield local


def _routes() -> list[tuple[str, str, frozenset[str] | None]]:
    """Every registered route, with its path parameters filled in, from the one matrix the API enforces."""
    from dtfd.scheduler.scheduler import Scheduler
    from dtfd.server.api import Api
    from dtfd.server.workload_api import WorkloadApi

    api = Api(_NoNode(), metrics=None, tokens=None, api_addresses={})  # type: ignore[arg-type]
    WorkloadApi(api, Scheduler.__new__(Scheduler))
    out = []
    for route in api.routes:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: f"x-{m.group(1)}", route.pattern.pattern)
        out.append((route.method, path, route.roles))
    return out


class _NoNode:
    machine = None


ROLE_TOKENS = ("admin", "worker", "reader")


def test_every_route_refuses_a_missing_token_and_a_role_it_does_not_allow(cluster):
    tokens = {"admin": cluster.files.admin_token, "worker": cluster.files.worker_token, "reader": cluster.files.reader_token}
    base = f"http://{cluster.files.api['node1']}"
    routes = _routes()
    assert len(routes) >= 20
    for method, path, roles in routes:
        anonymous = httpx.request(method, base + path, json={}, timeout=10)
        if roles is None:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        assert anonymous.status_code == 401, (method, path, anonymous.status_code)
        for role, token in tokens.items():
            reply = httpx.request(method, base + path, json={}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            if role in roles:
                assert reply.status_code not in (401, 403, 500), (method, path, role, reply.status_code, reply.text)
            else:
                assert reply.status_code == 403, (method, path, role, reply.status_code)


def test_guessing_tokens_from_one_address_is_slowed_with_429(cluster):
    base = f"http://{cluster.files.api['node1']}"
    codes = [httpx.get(f"{base}/v1/status", headers={"Authorization": f"Bearer guess-{n:016d}"}, timeout=10).status_code
             for n in range(40)]
    assert codes[0] == 401 and codes[-1] == 429
    assert httpx.get(f"{base}/v1/status", headers={"Authorization": f"Bearer {cluster.files.reader_token}"}, timeout=10).status_code == 200


def test_openapi_document_lists_every_route_with_its_body_schema_and_roles(cluster):
    document = httpx.get(f"http://{cluster.files.api['node1']}/v1/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    operations = {(method.upper(), path): op for path, item in document["paths"].items() for method, op in item.items()}
    assert len(operations) >= 25
    put = operations[("PUT", "/v1/kv/{key}")]
    assert put["security"] == [{"bearer": []}] and "admin" in put["description"]
    body = document["components"]["schemas"][put["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert "value" in body["required"] and body.get("additionalProperties") is False  # unknown fields refused
    submit = operations[("POST", "/v1/tasks")]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert submit.endswith("/SubmitBody") and "TaskSpec" in document["components"]["schemas"]
    assert "security" not in operations[("GET", "/health")]
    for (method, path), op in operations.items():
        assert all(p["name"] in path for p in op["parameters"]), (method, path)


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(tmp_path):
    """Property-based requests against every /v1 route of a live 3-node cluster, bounded for CI."""
    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with running(write_configs(tmp_path / "c")) as cluster:
        leader = cluster.wait_leader()
        base = f"http://{cluster.files.api[leader]}"
        result = subprocess.run(
            [schemathesis, "run", f"{base}/v1/openapi.json", "--url", base,
             "-H", f"Authorization: Bearer {cluster.files.admin_token}",
             "--checks", "not_a_server_error,response_schema_conformance", "--phases", "fuzzing",
             "--max-examples", "15", "--seed", "1",
             "--exclude-path", "/v1/leadership/transfer"],  # moving leadership mid-run is an admin action, not input
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-4000:]

        def agreed() -> bool:
            views = [cluster.status(n) for n in cluster.files.node_ids]
            return all(views) and len({(v["applied_index"], v["checksum"]) for v in views}) == 1

        until(agreed, what="every node at the same applied index and checksum after the run")
