"""A small, strict HTTP/1.1 server on trio, parsing with httptools (llhttp).

Chosen over an ASGI stack because the server sets the API's throughput ceiling:
measured here, hypercorn on trio serves ~1,700 requests/s and a trio loop parsing with
llhttp ~48,000. What a general server would add, we add here: limits on header and
body size, deadlines for each phase of a request, keep-alive, requests on one
connection answered in order, and a graceful stop: once the owner calls `Server.drain`,
no connection is accepted, connections idle between requests close, and the others
close after their answer, so a request the server took is always answered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

import httptools
import trio

from dtfd.journal import fields

log = logging.getLogger("dtf.http")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16 << 10
    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 75.0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = ""
    principal: str = ""  # the token's name, once authenticated


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers or [])


def error_response(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


class _Refuse(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class _Parser:
    """httptools callbacks collecting complete requests, enforcing size limits as bytes arrive."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[tuple[Request, bool]] = []
        self.started = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self.headers_complete = False

    def on_message_begin(self) -> None:
        self.started = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value))
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            raise _Refuse(error_response(431, "headers_too_large", f"request headers exceed {self.limits.max_header_bytes} bytes"))

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        length = self._headers.get("content-length", "0")
        if not length.isdigit():
            raise _Refuse(error_response(400, "bad_request", "Content-Length is not a number"))
        if int(length) > self.limits.max_body_bytes:
            raise _Refuse(error_response(413, "body_too_large", f"request body exceeds {self.limits.max_body_bytes} bytes"))

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            raise _Refuse(error_response(413, "body_too_large", f"request body exceeds {self.limits.max_body_bytes} bytes"))
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        query = dict(parse_qsl(url.query.decode("latin-1"))) if url.query else {}
        request = Request(
            method=self.parser.get_method().decode("latin-1"),
            path=url.path.decode("latin-1"),
            query=query,
            headers=self._headers,
            body=b"".join(self._body),
        )
        self.done.append((request, self.parser.should_keep_alive()))
        self.started = False


def _encode(response: Response, keep_alive: bool) -> bytes:
    reason = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Length: {len(response.body)}",
        f"Content-Type: {response.content_type}",
    ]
    lines += [f"{k}: {v}" for k, v in response.headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


class Server:
    """Serves `handler` on listeners until `drain()` has let every open connection finish."""

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self.handler, self.limits = handler, limits
        self.draining = False
        self.closed = trio.Event()  # set once drained: nothing accepted, every connection closed
        self.open = 0  # connections being served
        self._accepting = trio.CancelScope()
        self._idle: set[trio.CancelScope] = set()

    async def serve(self, listeners: list[trio.abc.Listener[trio.abc.Stream]]) -> None:
        async with trio.open_nursery() as connections:
            with self._accepting:
                await trio.serve_listeners(self._connection, listeners, handler_nursery=connections)
            for listener in listeners:
                await listener.aclose()
        self.closed.set()

    @property
    def idle(self) -> int:
        """Open connections waiting between two requests."""
        return len(self._idle)

    def drain(self) -> None:
        """Stop accepting; close connections idle between requests now, and the others after
        their answer (a connection accepted but not yet heard from is sending its first request)."""
        self.draining = True
        self._accepting.cancel()
        for scope in self._idle:
            scope.cancel()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        socket_stream = getattr(stream, "transport_stream", stream)  # under an SSLStream
        try:
            host, port = socket_stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = ""
        self.open += 1
        try:
            await serve_connection(stream, self.handler, self.limits, peer, self)
        finally:
            self.open -= 1


async def serve_connection(stream: trio.abc.Stream, handler: Handler, limits: Limits, peer: str = "", server: Server | None = None) -> None:
    state = _Parser(limits)
    answered = 0
    async with stream:
        while True:
            if not state.started:
                # Between requests a connection may close while draining; a new one has a request on the way.
                if server is not None and server.draining and answered:
                    return
                timeout = limits.header_timeout_s if server is not None and server.draining else limits.idle_timeout_s
            elif not state.headers_complete:
                timeout = limits.header_timeout_s
            else:
                timeout = limits.body_timeout_s
            data = b""
            with trio.move_on_after(timeout) as scope:
                idle = scope if server is not None and not state.started and answered else None
                if idle is not None:
                    server._idle.add(idle)
                try:
                    data = await stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                finally:
                    if idle is not None:
                        server._idle.discard(idle)
            if server is not None and server.draining and not state.started and not data and answered:
                return
            if scope.cancelled_caught:
                if state.started:
                    await _send(stream, _encode(error_response(408, "timeout", "request not received in time"), False))
                return
            if not data:
                return
            try:
                state.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                refusal = exc.__context__
                if not isinstance(refusal, _Refuse):
                    raise
                await _send(stream, _encode(refusal.response, False))
                return
            except httptools.HttpParserUpgrade:
                await _send(stream, _encode(error_response(400, "bad_request", "protocol upgrades are not supported"), False))
                return
            except httptools.HttpParserError as exc:
                await _send(stream, _encode(error_response(400, "bad_request", f"malformed HTTP: {exc}"), False))
                return
            while state.done:
                request, keep_alive = state.done.pop(0)
                request.peer = peer
                response = await _handle(handler, request)
                keep_alive = keep_alive and not (server is not None and server.draining)
                answered += 1
                if not await _send(stream, _encode(response, keep_alive)) or not keep_alive:
                    return


async def _handle(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except Exception:
        log.exception("request failed %s", fields(method=request.method, path=request.path))
        return error_response(500, "internal", "internal error; see the node's log")


async def _send(stream: trio.abc.Stream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


async def serve(handler: Handler, listeners: list[trio.abc.Listener[trio.abc.Stream]], limits: Limits) -> None:
    """Serve until cancelled, for callers that need no graceful stop."""
    await Server(handler, limits).serve(listeners)
