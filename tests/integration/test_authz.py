"""The authorization matrix, walked route by route: no token, each role, and token guessing."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dtfd.devcluster import write_configs
from dtfd.server import auth
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


def _from(address: str) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x.y.z is this host)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def _guess(client: httpx.Client, base: str, token: str) -> httpx.Response:
    return client.get(f"{base}/v1/status", headers={"Authorization": f"Bearer {token}"})


def _until_refused(guess: Callable[[int], httpx.Response]) -> httpx.Response:
    """Guess until one is refused with 429; the guesses answered 401 before it must fit the burst and the refill."""
    started = time.monotonic()
    for n in range(1000):
        reply = guess(n)
        if reply.status_code == 429:
            allowed = auth.FAILURE_BURST + (time.monotonic() - started) * auth.FAILURES_PER_S + 1
            assert auth.FAILURE_BURST <= n <= allowed, (n, allowed)
            assert int(reply.headers["retry-after"]) >= 1
            return reply
        assert reply.status_code == 401, reply.text
    raise AssertionError("1000 wrong tokens and never a 429")


def test_guessing_tokens_from_one_address_is_slowed_with_429(cluster):
    base = f"http://{cluster.files.api['node1']}"
    with _from("127.0.0.2") as guesser:
        refused = _until_refused(lambda n: _guess(guesser, base, secrets.token_urlsafe(24)))  # a new prefix each time
        assert "from this address" in refused.json()["error"]["message"]
        assert _guess(guesser, base, cluster.files.reader_token).status_code == 200  # a real token is never locked out
    with _from("127.0.0.3") as neighbour:
        assert _guess(neighbour, base, secrets.token_urlsafe(24)).status_code == 401  # other addresses are not slowed


def test_guessing_at_one_token_from_many_addresses_is_slowed_with_429(cluster):
    """Many hosts each guessing a little at one token prefix add up: the prefix is limited on its own."""
    base = f"http://{cluster.files.api['node1']}"
    known = cluster.files.admin_token[: auth.PREFIX_CHARS]

    def guess(n: int) -> httpx.Response:
        with _from(f"127.1.{n // 250}.{1 + n % 250}") as host:
            return _guess(host, base, known + secrets.token_urlsafe(16))

    refused = _until_refused(guess)
    assert "starting like this one" in refused.json()["error"]["message"]
    with _from("127.2.0.1") as fresh:
        assert _guess(fresh, base, secrets.token_urlsafe(24)).status_code == 401  # other prefixes are not slowed
        assert _guess(fresh, base, cluster.files.admin_token).status_code == 200  # nor the token being guessed at


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
        assert all(p["name"] in path for p in op["parameters"] if p["in"] == "path"), (method, path)


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(tmp_path):
    """Property-based requests against every /v1 route of a live 3-node cluster, bounded for CI.

    The documented examples first, then fuzzing (valid and invalid input), then chains along
    the document's links (submit a task then read and cancel it; register a worker then
    heartbeat, drain and remove it; batch-write keys then read, compare-and-set, delete them).
    What runs and what is checked is in schemathesis.toml beside this file.
    """
    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    steady = {"heartbeat_ms": 100, "election_min_ms": 1000, "election_max_ms": 2000}  # input is the subject, not elections
    with running(write_configs(tmp_path / "c", raft=steady)) as cluster:
        leader = cluster.wait_leader()
        base = f"http://{cluster.files.api[leader]}"
        result = subprocess.run(
            [schemathesis, "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
             "run", f"{base}/v1/openapi.json", "--url", base, "-H", f"Authorization: Bearer {cluster.files.admin_token}",
             "--phases", "examples,fuzzing,stateful", "--max-examples", "15", "--seed", "1"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-4000:]

        def agreed() -> bool:
            views = [cluster.status(n) for n in cluster.files.node_ids]
            return all(views) and len({(v["applied_index"], v["checksum"]) for v in views}) == 1

        until(agreed, what="every node at the same applied index and checksum after the run")
