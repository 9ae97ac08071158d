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
from dtfd.server import auth, openapi
from dtfd.server import bodies as b
from dtfd.server.http import Request, Response, error_response, json_response
from dtfd.server.metrics import CONTENT_TYPE, Metrics
from dtfd.server.node import Node, NotLeaderError, Unavailable
from dtfd.state.health import RecordRecovery
from dtfd.state.machine import Batch, Command, CompareAndSet, Delete, Envelope, Put, Result, SetConfig

FORWARDED = "x-dtf-forwarded"
LEADER_HEADER = "X-Dtf-Leader"
FORWARD_TIMEOUT_S = 30.0  # above the longest long-poll a worker may ask for


class CompactBody(msgspec.Struct, forbid_unknown_fields=True):
    """Nothing to say: the node snapshots its applied state and drops the log behind it."""


class Compacted(msgspec.Struct):
    node: str
    snapshot_index: int
    previous_snapshot_index: int


class StepDownBody(msgspec.Struct, forbid_unknown_fields=True):
    """Nothing to say: the node addressed stops leading (it is never forwarded)."""


class SteppedDown(msgspec.Struct):
    node: str
    term: int


class CatchUpBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str  # the follower to send the latest snapshot


class CatchingUp(msgspec.Struct):
    leader: str
    to: str
    snapshot_index: int
    match_index: int  # the follower's, before the snapshot


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
    answer: type[msgspec.Struct] | None = None  # the success answer's schema in the OpenAPI document
    query: type[msgspec.Struct] | None = None  # the query string, decoded, validated and passed as `query`


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
        self.auth_failures = auth.Failures()
        self.scheme = "https" if client_ssl else "http"
        self.forwarder = httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S, verify=client_ssl or True)
        r = re.compile
        key = r"(?P<key>[^/]+)"
        self.routes = [
            Route("GET", r("/health"), None, self.health, "/health", None, b.HealthAnswer),
            Route("GET", r("/ready"), None, self.ready, "/ready", None, b.ReadyAnswer),
            Route("GET", r("/leader"), None, self.leader, "/leader", None, b.LeaderAnswer),
            Route("GET", r("/metrics"), None, self.render_metrics, "/metrics"),
            Route("GET", r("/v1/openapi.json"), None, self.openapi, "/v1/openapi.json", None, b.OpenApiAnswer),
            Route("GET", r("/v1/status"), auth.READ, self.status, "/v1/status", None, b.StatusAnswer),
            Route("GET", r(f"/v1/kv/{key}"), auth.READ, self.kv_get, "/v1/kv/{key}", None, b.KvAnswer),
            Route("PUT", r(f"/v1/kv/{key}"), auth.ADMIN, self.kv_put, "/v1/kv/{key}", b.PutBody, Result),
            Route("DELETE", r(f"/v1/kv/{key}"), auth.ADMIN, self.kv_delete, "/v1/kv/{key}", b.ClientFields, Result),
            Route("POST", r(f"/v1/kv/{key}/cas"), auth.ADMIN, self.kv_cas, "/v1/kv/{key}/cas", b.CasBody, Result),
            Route("POST", r("/v1/kv"), auth.ADMIN, self.kv_batch, "/v1/kv", b.BatchBody, Result),
            Route("PUT", r(f"/v1/config/{key}"), auth.ADMIN, self.config_put, "/v1/config/{key}", b.PutBody, Result),
            Route("POST", r("/v1/leadership/transfer"), auth.ADMIN, self.transfer, "/v1/leadership/transfer", b.TransferBody, b.TransferAnswer),
            Route("GET", r("/v1/history"), auth.READ, self.history, "/v1/history", None, b.HistoryAnswer),
            Route("POST", r("/v1/recovery"), auth.ADMIN, self.recovery, "/v1/recovery", b.RecoveryBody, Result),
            Route("POST", r("/v1/admin/compact"), auth.ADMIN, self.compact, "/v1/admin/compact", CompactBody, Compacted),
            Route("POST", r("/v1/admin/step-down"), auth.ADMIN, self.step_down, "/v1/admin/step-down", StepDownBody, SteppedDown),
            Route("POST", r("/v1/admin/catch-up"), auth.ADMIN, self.catch_up, "/v1/admin/catch-up", CatchUpBody, CatchingUp),
        ]

    def add_routes(self, routes: list[tuple]) -> None:
        """(method, pattern, roles, handler, name[, body type[, answer type[, query type]]]) for each route."""
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
                wait, limit = self.auth_failures.refusal(request.peer.rpartition(":")[0], presented) if presented else (0.0, "")
                if wait:  # wrong tokens again and again: guessing; slow it down
                    return error_response(429, "too_many_failures", f"too many failed authentications {limit}",
                                          [("Retry-After", str(max(1, math.ceil(wait))))])
                return error_response(401, "unauthorized", "missing or unknown bearer token", [("WWW-Authenticate", "Bearer")])
            if token.role not in route.roles:
                return error_response(403, "forbidden", f"role {token.role} may not call {route.method} {route.name}")
            request.principal = token.name
        try:
            arguments: dict[str, object] = {name: unquote(value) for name, value in match.groupdict().items()}  # path parameters
            if route.body is not None:
                arguments["body"] = decode_body(request.body or b"{}", route.body)
            if route.query is not None:
                arguments["query"] = decode_query(request.query, route.query)
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
        applied, checksum = await self.node.checksum()  # first: the index it is at never runs ahead of the commit index below
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
                "applied_index": applied,
                "last_index": status.last_index,
                "snapshot_index": status.snapshot_index,
                "rejoining": status.rejoining,
                "checksum": checksum,
                "checkpoints": [{"index": index, "checksum": checksum} for index, checksum in node.checkpoints],
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

    async def kv_put(self, request: Request, body: b.PutBody, key: str) -> Response:
        return await self._write(request, Put(_key(key), body.value), body)

    async def kv_delete(self, request: Request, body: b.ClientFields, key: str) -> Response:
        return await self._write(request, Delete(_key(key)), body)

    async def kv_cas(self, request: Request, body: b.CasBody, key: str) -> Response:
        return await self._write(request, CompareAndSet(_key(key), body.expected, body.value), body)

    async def kv_batch(self, request: Request, body: b.BatchBody) -> Response:
        """Up to MAX_BATCH operations as one replicated entry: one fsync, one round of replication."""
        commands: list[Command] = []
        for op in body.ops:
            key = _key(op.key)
            if op.op == "put":
                commands.append(Put(key, op.value))
            elif op.op == "delete":
                commands.append(Delete(key))
            else:
                commands.append(CompareAndSet(key, op.expected, op.value))
        return await self._write(request, Batch(commands), body)

    async def config_put(self, request: Request, body: b.PutBody, key: str) -> Response:
        return await self._write(request, SetConfig(_key(key), body.value), body)

    async def history(self, request: Request) -> Response:
        if request.query.get("stale") != "ok":
            await self.node.read_barrier()
        health = self.node.machine.image.health
        return json_response(200, {"leaders": msgspec.to_builtins(health.leaders), "recoveries": msgspec.to_builtins(health.recoveries)})

    async def recovery(self, request: Request, body: b.RecoveryBody) -> Response:
        event = {k: v for k, v in msgspec.structs.asdict(body).items() if k not in ("client", "seq")}
        return await self._write(request, RecordRecovery(**event), body)

    async def transfer(self, request: Request, body: b.TransferBody) -> Response:
        if not self.node.is_leader:
            raise NotLeaderError(self.node.core.leader)
        target = body.to or self.best_follower()
        if not target:
            raise BadRequest(409, "no_target", "no follower to transfer leadership to")
        self.node.transfer_leadership(target)
        return json_response(202, {"from": self.node.id, "to": target})

    async def compact(self, request: Request, body: CompactBody) -> Response:
        """Snapshot this node's applied state now and truncate its log behind it (frees disk)."""
        before = self.node.core.log.snapshot_index
        await self.node.compact_now()
        return json_response(200, msgspec.to_builtins(Compacted(self.node.id, self.node.core.log.snapshot_index, before)))

    async def step_down(self, request: Request, body: StepDownBody) -> Response:
        """This node stops leading, keeping its term: for a stale leader cut off from the newer one."""
        if not self.node.is_leader:
            raise BadRequest(409, "not_leader", f"{self.node.id} is not a leader ({self._leader_hint(self.node.core.leader)})")
        self.node.step_down()
        return json_response(200, msgspec.to_builtins(SteppedDown(self.node.id, self.node.core.term)))

    async def catch_up(self, request: Request, body: CatchUpBody) -> Response:
        """Catch a lagging follower up from a snapshot (taken now if needed) instead of entry by entry."""
        if not self.node.is_leader:
            raise NotLeaderError(self.node.core.leader)
        progress = self.node.core.status().progress
        if body.to == self.node.id or body.to not in progress:
            raise BadRequest(422, "invalid", f"to: {body.to!r} is not a follower of {self.node.id}")
        match = progress[body.to].match
        if match >= self.node.machine.applied:
            raise BadRequest(409, "caught_up", f"{body.to} already holds every applied entry (match index {match})")
        await self.node.catch_up(body.to)
        return json_response(200, msgspec.to_builtins(CatchingUp(self.node.id, body.to, self.node.core.log.snapshot_index, match)))

    def best_follower(self) -> str:
        progress = self.node.core.status().progress
        followers = sorted((-p.match, peer) for peer, p in progress.items() if peer != self.node.id and not p.learner)
        return followers[0][1] if followers else ""

    async def _write(self, request: Request, command: Command, fields: b.ClientFields) -> Response:
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
        raise BadRequest(422, "invalid", _field_first(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for bad UTF-8 in a string
        raise BadRequest(400, "bad_json", f"body is not valid JSON: {exc}") from None


def decode_query(query: dict[str, str], kind: type[msgspec.Struct]) -> msgspec.Struct:
    """The query string as `kind`; numbers arrive as text. Parameters `kind` does not name are ignored."""
    try:
        return msgspec.convert(query, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(422, "invalid", _field_first(str(exc))) from None


def _field_first(problem: str) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.tasks[0].priority`" as "tasks[0].priority: expected `int` >= 0"."""
    message, _, where = problem.rpartition(" - at ")
    if not message:
        return problem
    where = where.replace("`", "").replace("$.", "").replace("$", "body")
    if where.startswith("key in "):  # a dict's key, as in "`key` in `$.tasks[0].env`"
        where = where.removeprefix("key in ") + " (a name)"
    return f"{where}: {message[0].lower()}{message[1:]}"


def _key(key: str) -> str:
    if len(key) > b.MAX_KEY:
        raise BadRequest(422, "invalid", f"key: longer than {b.MAX_KEY} characters")
    return key
