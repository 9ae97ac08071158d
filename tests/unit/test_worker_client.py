"""The worker's HTTP client against dtfd's own HTTP server on loopback: keep-alive, stale connections, TLS, failures."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from dtfd.server import http
from dtfd.worker import client as client_module
from dtfd.worker.client import ApiError, Client, Unavailable

Handler = Callable[[http.Request], Awaitable[http.Response]]


class Node:
    """A server on a free loopback port that counts the connections it accepted and the requests it answered."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[http.Request] = []
        self.url = ""

    async def start(self, nursery: trio.Nursery, limits: http.Limits = http.Limits(), context: ssl.SSLContext | None = None) -> Node:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
        if context is not None:
            listeners = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]

        async def connection(stream: trio.abc.Stream) -> None:
            self.connections += 1
            await http.serve_connection(stream, self.answer, limits)

        nursery.start_soon(trio.serve_listeners, connection, listeners)
        return self

    async def answer(self, request: http.Request) -> http.Response:
        self.requests.append(request)
        return await self.handler(request)


async def echo(request: http.Request) -> http.Response:
    return http.json_response(200, {"path": request.path, "body": request.body.decode(), "auth": request.headers.get("authorization")})


async def test_calls_share_one_kept_alive_connection_and_send_json_with_the_token():
    async with trio.open_nursery() as nursery:
        node = await Node(echo).start(nursery)
        async with Client([node.url], "secret") as client:
            answers = [await client.call("POST", f"/v1/workers/w{n}/lease", {"max": n}, deadline_s=5) for n in range(5)]
            assert await client.call("DELETE", "/v1/workers/w1", deadline_s=5) == {"path": "/v1/workers/w1", "body": "", "auth": "Bearer secret"}
        nursery.cancel_scope.cancel()
    assert [a["path"] for a in answers] == [f"/v1/workers/w{n}/lease" for n in range(5)]
    assert answers[3] == {"path": "/v1/workers/w3/lease", "body": '{"max":3}', "auth": "Bearer secret"}
    assert node.connections == 1


async def test_concurrent_calls_each_get_a_connection_and_the_pool_keeps_them():
    release = trio.Event()

    async def slow(request: http.Request) -> http.Response:
        await release.wait()
        return await echo(request)

    async with trio.open_nursery() as nursery:
        node = await Node(slow).start(nursery)
        async with Client([node.url], "secret") as client:
            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(lambda: client.call("POST", "/v1/results", {}, deadline_s=5))
                while len(node.requests) < 3:
                    await trio.sleep(0.01)
                release.set()
            for _ in range(3):
                await client.call("POST", "/v1/results", {}, deadline_s=5)
        nursery.cancel_scope.cancel()
    assert node.connections == 3


async def test_a_connection_the_node_closed_while_idle_is_replaced_without_failing_over():
    async with trio.open_nursery() as nursery:
        first = await Node(echo).start(nursery, http.Limits(idle_timeout_s=0.05))
        second = await Node(echo).start(nursery)
        async with Client([first.url, second.url], "secret") as client:
            await client.call("POST", "/v1/results", {}, deadline_s=5)
            await trio.sleep(0.3)  # the first node closes the idle connection
            await client.call("POST", "/v1/results", {}, deadline_s=5)
            assert client.current == 0
        nursery.cancel_scope.cancel()
    assert (first.connections, len(first.requests), len(second.requests)) == (2, 2, 0)


async def test_a_node_that_does_not_answer_in_time_or_refuses_connections_is_skipped():
    async def never(request: http.Request) -> http.Response:
        await trio.sleep_forever()
        raise AssertionError

    async with trio.open_nursery() as nursery:
        silent = await Node(never).start(nursery)
        good = await Node(echo).start(nursery)
        async with Client(["http://127.0.0.1:9", silent.url, good.url], "secret", request_timeout_s=0.2) as client:
            with trio.fail_after(3):
                answer = await client.call("POST", "/v1/results", {}, deadline_s=5)
            assert answer["path"] == "/v1/results" and client.current == 2
        nursery.cancel_scope.cancel()


async def test_errors_are_the_coordinators_answer_and_garbage_is_a_bad_response():
    async def refuse(request: http.Request) -> http.Response:
        if request.path == "/v1/garbage":
            return http.Response(200, b"<html>", content_type="text/html")
        return http.error_response(409, "stale_lease", "the lease is gone")

    async with trio.open_nursery() as nursery:
        node = await Node(refuse).start(nursery)
        async with Client([node.url], "secret") as client:
            with pytest.raises(ApiError) as refused:
                await client.call("POST", "/v1/results", {}, deadline_s=5)
            with pytest.raises(ApiError) as garbage:
                await client.call("POST", "/v1/garbage", {}, deadline_s=5)
        nursery.cancel_scope.cancel()
    assert (refused.value.status, refused.value.code, refused.value.message) == (409, "stale_lease", "the lease is gone")
    assert (garbage.value.status, garbage.value.code) == (200, "bad_response")


async def test_tls_with_the_configured_ca_and_refused_without_it(tmp_path: Path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with trio.open_nursery() as nursery:
        node = await Node(echo).start(nursery, context=server_context)
        async with Client([node.url], "secret", ca_file=str(ca_file)) as client:
            for _ in range(3):
                assert (await client.call("POST", "/v1/results", {"a": 1}, deadline_s=5))["body"] == '{"a":1}'
        assert node.connections == 1
        async with Client([node.url], "secret") as untrusting:
            with pytest.raises(Unavailable, match="TLS handshake failed"):
                await untrusting.call("POST", "/v1/results", {}, deadline_s=0.5)
        nursery.cancel_scope.cancel()


async def test_a_node_that_does_not_answer_http_is_skipped():
    async def raw(answer: bytes, stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        urls = []
        for answer in (b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            urls.append(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
            nursery.start_soon(trio.serve_listeners, partial(raw, answer), listeners)
        good = await Node(echo).start(nursery)
        async with Client([*urls, good.url], "secret", request_timeout_s=1.0) as client:
            with trio.fail_after(3):
                assert (await client.call("POST", "/v1/results", {}, deadline_s=5))["path"] == "/v1/results"
            assert client.current == 2
        nursery.cancel_scope.cancel()


async def test_an_answer_over_the_size_cap_is_a_broken_node_not_a_memory_blowup(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 1000)

    async def endless(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):  # until the client hangs up
            while True:
                await stream.send_all(b"x" * 4096)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        flood = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.start_soon(trio.serve_listeners, endless, listeners)
        good = await Node(echo).start(nursery)
        async with Client([flood, good.url], "secret", request_timeout_s=5.0) as client:
            with trio.fail_after(3):
                assert (await client.call("POST", "/v1/results", {}, deadline_s=5))["path"] == "/v1/results"
            assert client.current == 1
        nursery.cancel_scope.cancel()


def test_retry_after_is_honoured_except_that_a_leader_change_is_polled_sooner():
    """Retry-After counts whole seconds and a leaderless node says 1; an election takes
    well under a second, so then the client's own backoff decides (it still grows)."""

    def answer(status: int, code: str, retry_after: str) -> client_module.Response:
        response = http.error_response(status, code, "message", [("Retry-After", retry_after)])
        return client_module.Response(status, {"retry-after": retry_after}, response.body)

    assert client_module._retry_after(answer(503, "no_leader", "1"), backoff=0.1) == 0.1
    assert client_module._retry_after(answer(503, "leader_unreachable", "1"), backoff=0.4) == 0.4
    assert client_module._retry_after(answer(503, "no_leader", "1"), backoff=2.0) == 1.0
    assert client_module._retry_after(answer(503, "unavailable", "3"), backoff=0.1) == 3.0
    assert client_module._retry_after(answer(429, "rate_limited", "2"), backoff=0.1) == 2.0
    assert client_module._retry_after(client_module.Response(503, {"retry-after": "1"}, b"<html>"), backoff=0.1) == 1.0
