"""The coordinator client: any node will do, so it fails over between all of them.

Followers forward writes to the leader, so the worker talks to whichever node answers,
staying with it while it does. A connection error, a timeout or a 502/503/504 moves to
the next URL; after a full round it waits (Retry-After when a node gave one, but no
longer than a doubling backoff while a leader is elected; else that backoff) and goes
round again, until the caller's deadline. Any other error
status is the coordinator's answer and is raised as ApiError, never retried here.

HTTP/1.1 is written by hand over trio streams and answers are parsed with httptools
(llhttp), as the server does: a no-op task costs the worker about two requests, and
httpx spent ~0.6 ms of CPU on each where this spends ~0.11 ms. Connections are kept
alive, one per request in flight, and one the node closed while idle is not reused.
Proxy variables (HTTP_PROXY and the like) are not read: workers reach nodes directly.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import quote, urlsplit

import httptools
import msgspec
import trio

from dtfd.journal import fields

log = logging.getLogger("dtf.worker.client")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
LEADER_CHANGE = frozenset({"no_leader", "leader_unreachable"})  # 503 codes of a node while a leader is elected
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
RETRY_AFTER_MAX_S = 10.0
RECEIVE_BYTES = 1 << 16
MAX_ANSWER_BYTES = 64 << 20  # far above any lease answer; past it the node is treated as broken


class ApiError(Exception):
    """The coordinator answered with an error; `code` is its machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Unavailable(Exception):
    """No coordinator answered within the deadline."""


class _Broken(Exception):
    """The connection failed or the answer was not HTTP: try the next node."""


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    keep_alive: bool = False


class _Reader:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.response = Response()
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._count(len(body))
        self.body.append(body)

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > MAX_ANSWER_BYTES:
            raise _Broken(f"answer larger than {MAX_ANSWER_BYTES} bytes")

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the answer: the connection is not fit to reuse
            self.response.keep_alive = False

    def on_message_complete(self) -> None:
        if not self.complete:
            self.complete = True
            self.response.status = self.parser.get_status_code()
            self.response.body = b"".join(self.body)
            self.response.keep_alive = self.parser.should_keep_alive()


class _Connection:
    """One keep-alive connection to one node, one request at a time."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock

    def close(self) -> None:
        """At once, without a checkpoint: also safe while being cancelled."""
        self.sock.close()

    async def exchange(self, request: bytes) -> Response:
        try:
            await self.stream.send_all(request)
            reader = _Reader()
            while not reader.complete:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise _Broken("connection closed before the answer was complete")
                reader.parser.feed_data(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Broken(f"{type(exc).__name__} {exc}".strip()) from None
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Broken):
                raise exc.__context__ from None
            raise _Broken(f"not an HTTP answer: {exc}") from None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise _Broken(f"not an HTTP answer: {type(exc).__name__} {exc}".strip()) from None
        return reader.response


class Client:
    def __init__(self, urls: Sequence[str], token: str, *, ca_file: str = "", request_timeout_s: float = 5.0) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.request_timeout_s = request_timeout_s
        self.current = 0  # the node that answered last
        self._token = token.encode()
        self._ssl: ssl.SSLContext | None = None
        if any(url.startswith("https://") for url in self.urls):
            self._ssl = ssl.create_default_context(cafile=ca_file or None)
        self._idle: dict[str, list[_Connection]] = {url: [] for url in self.urls}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
            idle.clear()

    async def call(self, method: str, path: str, body: object = None, *, deadline_s: float, timeout_s: float | None = None) -> dict:
        """The JSON answer of the first node that gives one within `deadline_s` (each try `timeout_s`)."""
        last, first = "no attempt", self.current
        content = b"" if body is None else msgspec.json.encode(body)
        with trio.move_on_after(deadline_s):
            backoff = BACKOFF_MIN_S
            while True:
                wait = backoff
                for _ in self.urls:
                    url = self.urls[self.current]
                    try:
                        response = await self._request(url, method, path, content, timeout_s or self.request_timeout_s)
                    except _Broken as exc:
                        last = f"{url}: {exc}"
                    else:
                        if response.status not in RETRY_STATUSES:
                            if self.current != first:
                                log.info("failed over to another coordinator %s", fields(url=url, after=last))
                            self._prefer_leader(response.headers.get("x-dtf-leader", ""))
                            return _answer(response)
                        last = f"{url}: HTTP {response.status}"
                        wait = max(wait, _retry_after(response, backoff))
                    log.debug("coordinator did not answer %s", fields(method=method, path=path, error=last))
                    self.current = (self.current + 1) % len(self.urls)
                await trio.sleep(wait)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
        raise Unavailable(f"no coordinator answered {method} {path} within {deadline_s:g}s (last: {last})")

    async def _request(self, url: str, method: str, path: str, content: bytes, timeout_s: float) -> Response:
        """One try against one node, on an idle connection to it if there is one."""
        netloc = urlsplit(url).netloc
        head = (
            f"{method} {quote(path)} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n"
            "Authorization: Bearer "
        ).encode() + self._token + b"\r\n\r\n"
        connection = None
        with trio.move_on_after(timeout_s):
            try:
                connection = self._idle_connection(url) or await self._connect(url)
                response = await connection.exchange(head + content)
            except BaseException:
                if connection is not None:
                    connection.close()
                raise
            if response.keep_alive:
                self._idle[url].append(connection)
            else:
                connection.close()
            return response
        raise _Broken(f"no answer within {timeout_s:g}s")

    def _idle_connection(self, url: str) -> _Connection | None:
        idle = self._idle[url]
        while idle:
            connection = idle.pop()
            if not connection.sock.is_readable():
                return connection
            connection.close()  # readable while idle: the node closed it
        return None

    async def _connect(self, url: str) -> _Connection:
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            tcp = await trio.open_tcp_stream(host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError as exc:
            raise _Broken(f"{type(exc).__name__} {exc}".strip()) from None
        if parts.scheme != "https":
            return _Connection(tcp, tcp.socket)
        assert self._ssl is not None
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException as exc:
            tcp.socket.close()
            if isinstance(exc, trio.BrokenResourceError):
                raise _Broken(f"TLS handshake failed: {exc.__cause__ or exc}") from None
            raise
        return _Connection(tls, tcp.socket)

    def _prefer_leader(self, leader: str) -> None:
        """Talk to the leader next time (as the x-dtf-leader header names it): a follower would only forward the request."""
        for n, url in enumerate(self.urls):
            if leader and url.split("://", 1)[-1] == leader:
                self.current = n
                return


def _retry_after(response: Response, backoff: float) -> float:
    """How long the node asked us to wait; during a leader change, no longer than `backoff`.

    Retry-After counts whole seconds, and a node without a leader says 1, but an election
    takes well under a second: honouring it idled every worker ~0.7 s after each failover."""
    try:
        asked = min(RETRY_AFTER_MAX_S, max(0.0, float(response.headers.get("retry-after", "0"))))
    except ValueError:
        return 0.0
    error = _error(response)
    if response.status == 503 and error is not None and error[0] in LEADER_CHANGE:
        return min(asked, backoff)
    return asked


def _answer(response: Response) -> dict:
    if response.status >= 400:
        raise _api_error(response)
    if not response.body:
        return {}
    try:
        answer = msgspec.json.decode(response.body)
    except msgspec.DecodeError:
        raise ApiError(response.status, "bad_response", "the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise ApiError(response.status, "bad_response", "the answer is not a JSON object")
    return answer


def _api_error(response: Response) -> ApiError:
    error = _error(response)
    if error is None:
        return ApiError(response.status, "http_error", response.body[:200].decode("utf-8", "replace"))
    return ApiError(response.status, *error)


def _error(response: Response) -> tuple[str, str] | None:
    """(code, message) of a dtfd error body, None for anything else."""
    try:
        error = msgspec.json.decode(response.body)["error"]
        return str(error["code"]), str(error["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
