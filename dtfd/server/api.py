"""The client HTTP API: health endpoints, status, metrics and the /v1 key/value routes.

Writes on a follower are forwarded to the leader once (hop limit 1); with no leader known
the answer is 503 with Retry-After and whatever leader is known. Reads are linearizable
through ReadIndex unless `?stale=ok`. Every error is `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import math
import re
import ssl
import time
from urllib.parse import unquote
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx
import msgspec

from dtfd import __version__
from dtfd.scheduler.shedding import RateLimiter
from dtfd.server import auth, openapi
from dtfd.server.http import Request, Response, error_response, json_response
from dtfd.server.metrics import CONTENT_TYPE, Metrics
from dtfd.server.node import Node, NotLeaderError, Unavailable
from dtfd.state.health import RecordRecovery
from dtfd.state.machine import Batch, Command, CompareAndSet, Delete, Envelope, Put, SetConfig

FORWARDED = "x-dtf-forwarded"
LEADER_HEADER = "X-Dtf-Leader"
FORWARD_TIMEOUT_S = 30.0  # above the longest long-poll a worker may ask for
AUTH_FAILURE_BURST = 20.0  # failed authentications one address may make at once ...
AUTH_FAILURES_PER_S = 1.0  # ... and per second after that, before getting 429
MAX_KEY = 256


class ClientFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    client: str = ""  # with seq: a retry of the same (client, seq) is applied once
    seq: int = 0


class PutBody(ClientFields):
    value: str


class CasBody(ClientFields):
    expected: str | None
    value: str


class BatchOp(msgspec.Struct, forbid_unknown_fields=True):
    op: str  # put | delete | cas
    key: str
    value: str = ""
    expected: str | None = None


class BatchBody(ClientFields):
    ops: list[BatchOp]


MAX_BATCH = 10_000


class TransferBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str = ""  # empty: the most caught-up follower


class RecoveryBody(ClientFields):
    """One finished recoveryd action, for the replicated history."""

    node: str
    failure: str
    action: str
    result: str
    reason: str = ""
    started: float = 0.0
    finished: float = 0.0


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    roles: frozenset[str] | None  # None: no token needed (probes, metrics)
    handler: Callable[..., Awaitable[Response]]
    name: str
    body: type[msgspec.Struct] | None = None  # decoded, validated and passed as `body`; also the OpenAPI schema


class Api:
    def __init__(
        self,
        node: Node,
        metrics: Metrics,
        tokens: auth.Tokens,
        api_addresses: dict[str, str],
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.tokens = tokens
        self.api_addresses = api_addresses
        self.draining = False
        self.in_flight = 0
        self.auth_failures = RateLimiter(rate_per_s=AUTH_FAILURES_PER_S, burst=AUTH_FAILURE_BURST)
        self.scheme = "https" if client_ssl else "http"
        self.forwarder = httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S, verify=client_ssl or True)
        r = re.compile
        key = r"(?P<key>[^/]+)"
        self.routes = [
            Route("GET", r("/health"), None, self.health, "/health"),
            Route("GET", r("/ready"), None, self.ready, "/ready"),
            Route("GET", r("/leader"), None, self.leader, "/leader"),
            Route("GET", r("/metrics"), None, self.render_metrics, "/metrics"),
            Route("GET", r("/v1/openapi.json"), None, self.openapi, "/v1/openapi.json"),
            Route("GET", r("/v1/status"), auth.READ, self.status, "/v1/status"),
            Route("GET", r(f"/v1/kv/{key}"), auth.READ, self.kv_get, "/v1/kv/{key}"),
            Route("PUT", r(f"/v1/kv/{key}"), auth.ADMIN, self.kv_put, "/v1/kv/{key}", PutBody),
            Route("DELETE", r(f"/v1/kv/{key}"), auth.ADMIN, self.kv_delete, "/v1/kv/{key}", ClientFields),
            Route("POST", r(f"/v1/kv/{key}/cas"), auth.ADMIN, self.kv_cas, "/v1/kv/{key}/cas", CasBody),
            Route("POST", r("/v1/kv"), auth.ADMIN, self.kv_batch, "/v1/kv", BatchBody),
            Route("PUT", r(f"/v1/config/{key}"), auth.ADMIN, self.config_put, "/v1/config/{key}", PutBody),
            Route("POST", r("/v1/leadership/transfer"), auth.ADMIN, self.transfer, "/v1/leadership/transfer", TransferBody),
            Route("GET", r("/v1/history"), auth.READ, self.history, "/v1/history"),
            Route("POST", r("/v1/recovery"), auth.ADMIN, self.recovery, "/v1/recovery", RecoveryBody),
        ]

    def add_routes(self, routes: list[tuple]) -> None:
        """(method, pattern, roles, handler, name[, body type]) for each route."""
        for method, pattern, roles, handler, name, *body in routes:
            self.routes.append(Route(method, re.compile(pattern), roles, handler, name, *body))

    async def handle(self, request: Request) -> Response:
        route, match = self._route(request)
        if route is None:
            response = error_response(405 if match else 404, "not_found" if not match else "method_not_allowed", f"no route {request.method} {request.path}")
        else:
            self.in_flight += 1
            try:
                response = await self._dispatch(route, match, request)
            finally:
                self.in_flight -= 1
        self.metrics.http_requests.labels(route.name if route else "unmatched", str(response.status)).inc()
        leader = self.api_addresses.get(self.node.core.leader)
        if leader:  # clients that talk to the leader directly skip a forwarding hop
            response.headers.append((LEADER_HEADER, leader))
        return response

    def _route(self, request: Request) -> tuple[Route | None, re.Match[str] | None]:
        path_matched = None
        for route in self.routes:
            match = route.pattern.fullmatch(request.path)
            if match:
                if route.method == request.method:
                    return route, match
                path_matched = match
        return None, path_matched

    async def _dispatch(self, route: Route, match: re.Match[str], request: Request) -> Response:
        if route.roles is not None:
            presented = request.headers.get("authorization", "")
            token = self.tokens.identify(presented)
            if token is None:
                address = request.peer.rpartition(":")[0]
                wait = self.auth_failures.retry_after(address) if presented else 0.0
                if wait:  # wrong tokens from one address, again and again: guessing; slow it down
                    return error_response(429, "too_many_failures", "too many failed authentications from this address",
                                          [("Retry-After", str(max(1, math.ceil(wait))))])
                return error_response(401, "unauthorized", "missing or unknown bearer token", [("WWW-Authenticate", "Bearer")])
            if token.role not in route.roles:
                return error_response(403, "forbidden", f"role {token.role} may not call {route.method} {route.name}")
            request.principal = token.name
        try:
            arguments: dict[str, object] = match.groupdict()
            if route.body is not None:
                arguments["body"] = decode_body(request.body or b"{}", route.body)
            return await route.handler(request, **arguments)
        except BadRequest as exc:
            return error_response(exc.status, exc.code, str(exc))
        except NotLeaderError as exc:
            return await self._forward_or_refuse(request, exc.leader)
        except Unavailable as exc:
            return error_response(503, "unavailable", str(exc), [("Retry-After", "1")])

    # ---- probes, status, metrics ------------------------------------------------

    async def health(self, request: Request) -> Response:
        stalled = self.node.last_tick_age()
        if not self.node.healthy or stalled > 2.0:
            return error_response(503, "unhealthy", f"storage failed or tick loop stalled for {stalled:.1f}s")
        return json_response(200, {"status": "ok", "node": self.node.id})

    async def ready(self, request: Request) -> Response:
        leader = self.node.core.leader
        if not leader or self.draining:
            return error_response(503, "no_leader", "not part of a quorum with a known leader", [("Retry-After", "1")])
        return json_response(200, {"status": "ready", "leader": leader})

    async def leader(self, request: Request) -> Response:
        if self.node.is_leader:
            return json_response(200, {"leader": self.node.id, "term": self.node.core.term})
        return error_response(503, "not_leader", self._leader_hint(self.node.core.leader))

    async def openapi(self, request: Request) -> Response:
        """This API's OpenAPI 3.1 document, generated from the routes it serves."""
        return json_response(200, openapi.document(self.routes, __version__))

    async def render_metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), content_type=CONTENT_TYPE)

    async def status(self, request: Request) -> Response:
        node, status = self.node, self.node.core.status()
        peers = {
            peer: {"match_index": p.match, "next_index": p.next, "lag": status.last_index - p.match, "state": p.state}
            for peer, p in status.progress.items()
            if peer != node.id
        }
        return json_response(
            200,
            {
                "id": node.id,
                "role": status.role.value,
                "term": status.term,
                "leader": status.leader,
                "leader_api": self.api_addresses.get(status.leader, ""),
                "commit_index": status.commit,
                "applied_index": node.machine.applied,
                "last_index": status.last_index,
                "snapshot_index": status.snapshot_index,
                "rejoining": status.rejoining,
                "checksum": node.checksum(),
                "peers": peers,
                "uptime_s": round(time.monotonic() - node.started, 3),
                "version": __version__,
                "tasks": _count(task.state for task in node.machine.image.workload.tasks.values()),
                "workers": _count(worker.state for worker in node.machine.image.workload.workers.values()),
            },
        )

    # ---- key/value ----------------------------------------------------------------

    async def kv_get(self, request: Request, key: str) -> Response:
        key = _key(key)
        if request.query.get("stale") != "ok":
            await self.node.read_barrier()
        value = self.node.machine.get(key)
        if value is None:
            return error_response(404, "not_found", f"no key {key!r}")
        return json_response(200, {"key": key, "value": value, "applied_index": self.node.machine.applied})

    async def kv_put(self, request: Request, body: PutBody, key: str) -> Response:
        return await self._write(request, Put(_key(key), body.value), body)

    async def kv_delete(self, request: Request, body: ClientFields, key: str) -> Response:
        return await self._write(request, Delete(_key(key)), body)

    async def kv_cas(self, request: Request, body: CasBody, key: str) -> Response:
        return await self._write(request, CompareAndSet(_key(key), body.expected, body.value), body)

    async def kv_batch(self, request: Request, body: BatchBody) -> Response:
        """Up to MAX_BATCH operations as one replicated entry: one fsync, one round of replication."""
        if not 1 <= len(body.ops) <= MAX_BATCH:
            raise BadRequest(422, "invalid", f"ops: 1 to {MAX_BATCH} operations")
        commands: list[Command] = []
        for n, op in enumerate(body.ops):
            key = _key(op.key)
            if op.op == "put":
                commands.append(Put(key, op.value))
            elif op.op == "delete":
                commands.append(Delete(key))
            elif op.op == "cas":
                commands.append(CompareAndSet(key, op.expected, op.value))
            else:
                raise BadRequest(422, "invalid", f"ops[{n}].op: one of put, delete, cas")
        return await self._write(request, Batch(commands), body)

    async def config_put(self, request: Request, body: PutBody, key: str) -> Response:
        return await self._write(request, SetConfig(_key(key), body.value), body)

    async def history(self, request: Request) -> Response:
        if request.query.get("stale") != "ok":
            await self.node.read_barrier()
        health = self.node.machine.image.health
        return json_response(200, {"leaders": msgspec.to_builtins(health.leaders), "recoveries": msgspec.to_builtins(health.recoveries)})

    async def recovery(self, request: Request, body: RecoveryBody) -> Response:
        event = {k: v for k, v in msgspec.structs.asdict(body).items() if k not in ("client", "seq")}
        return await self._write(request, RecordRecovery(**event), body)

    async def transfer(self, request: Request, body: TransferBody) -> Response:
        if not self.node.is_leader:
            raise NotLeaderError(self.node.core.leader)
        target = body.to or self.best_follower()
        if not target:
            raise BadRequest(409, "no_target", "no follower to transfer leadership to")
        self.node.transfer_leadership(target)
        return json_response(202, {"from": self.node.id, "to": target})

    def best_follower(self) -> str:
        progress = self.node.core.status().progress
        followers = sorted((-p.match, peer) for peer, p in progress.items() if peer != self.node.id and not p.learner)
        return followers[0][1] if followers else ""

    async def _write(self, request: Request, command: Command, fields: ClientFields) -> Response:
        if fields.seq < 0:
            raise BadRequest(422, "invalid", "seq: must not be negative")
        envelope = Envelope(fields.client, fields.seq, time.time(), command)
        try:
            result = await self.node.propose(envelope)
        except NotLeaderError:
            self.metrics.proposals.labels("not_leader").inc()
            raise
        except Unavailable:
            self.metrics.proposals.labels("unavailable").inc()
            raise
        self.metrics.proposals.labels("ok" if result.ok else result.error).inc()
        status = 200 if result.ok else 409
        return json_response(status, msgspec.to_builtins(result))

    async def _forward_or_refuse(self, request: Request, leader: str) -> Response:
        address = self.api_addresses.get(leader)
        if not address or request.headers.get(FORWARDED):
            return error_response(503, "no_leader", self._leader_hint(leader), [("Retry-After", "1")])
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
        headers[FORWARDED] = self.node.id
        try:
            reply = await self.forwarder.request(
                request.method, f"{self.scheme}://{address}{request.path}", params=request.query, content=request.body, headers=headers
            )
        except httpx.HTTPError as exc:
            return error_response(503, "leader_unreachable", f"forwarding to {leader} failed: {exc}", [("Retry-After", "1")])
        extra = [(k, v) for k, v in reply.headers.items() if k.lower() == "retry-after"]
        return Response(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"), extra)

    def _leader_hint(self, leader: str) -> str:
        if not leader:
            return "no leader is known; retry shortly"
        return f"leader is {leader} at {self.api_addresses.get(leader, 'an unknown address')}"


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def decode_body(body: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(422, "invalid", str(exc).replace("$.", "")) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(400, "bad_json", f"body is not valid JSON: {exc}") from None


def _key(key: str) -> str:
    key = unquote(key)
    if len(key) > MAX_KEY:
        raise BadRequest(422, "invalid", f"key: longer than {MAX_KEY} characters")
    return key
