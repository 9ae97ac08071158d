"""The HTTP layer must stay strict under hostile clients: limits, timeouts, never a hang."""

import json

import httpx
import pytest
import trio

from dtfd.server import http

pytestmark = pytest.mark.integration


async def _echo(request: http.Request) -> http.Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    return http.json_response(200, {"method": request.method, "path": request.path, "query": request.query, "body": request.body.decode()})


async def _start(nursery: trio.Nursery, limits: http.Limits) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(http.serve, _echo, listeners, limits)
    return listeners[0].socket.getsockname()[1]


async def _raw(port: int, data: bytes, deadline: float = 10) -> bytes:
    """Send raw bytes, read until the server closes; the deadline proves it does not hang."""
    with trio.fail_after(deadline):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
            return b"".join(chunks)


async def test_requests_and_keep_alive_with_httpx():
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, http.Limits())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for n in range(3):
                r = await client.post("/v1/x", params={"n": str(n)}, content=b"hello")
                assert r.status_code == 200
                assert r.json() == {"method": "POST", "path": "/v1/x", "query": {"n": str(n)}, "body": "hello"}
        nursery.cancel_scope.cancel()


async def test_pipelined_requests_are_answered_in_order():
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, http.Limits())
        reply = await _raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.count(b"HTTP/1.1 200 OK") == 2
        assert reply.index(b'"path":"/a"') < reply.index(b'"path":"/b"')
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", b"413"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n", b"413"),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"500"),
    ],
)
async def test_limits_and_errors_answer_with_json_and_close(request_bytes, status):
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, http.Limits(max_header_bytes=4096, max_body_bytes=1000))
        reply = await _raw(port, request_bytes)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status)
        assert "error" in json.loads(body)
        nursery.cancel_scope.cancel()


async def test_slow_headers_get_408_and_idle_connections_close():
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, http.Limits(header_timeout_s=0.2, idle_timeout_s=0.2))
        reply = await _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert reply.startswith(b"HTTP/1.1 408")
        assert await _raw(port, b"") == b""  # idle: closed without a response
        nursery.cancel_scope.cancel()


async def test_drain_answers_every_request_taken_closes_idle_connections_and_refuses_new_ones():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = http.Server(_echo, http.Limits())

    async def answer(stream: trio.SocketStream) -> bytes:
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
        return reply

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, listeners)
        with trio.fail_after(10):
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await idle.receive_some(65536)).startswith(b"HTTP/1.1 200 OK")  # kept alive, now between requests
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            await busy.send_all(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel")  # the body is not all there
            fresh = await trio.open_tcp_stream("127.0.0.1", port)  # its request is still on the way
            while not (server.open == 3 and server.idle == 1):
                await trio.sleep(0.005)
            server.drain()
            assert await idle.receive_some(1024) == b""  # closed at once: no request was coming on it
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)  # nothing new is accepted
            await busy.send_all(b"lo")
            reply = await answer(busy)
            assert reply.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in reply and b'"body":"hello"' in reply
            await fresh.send_all(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await answer(fresh)
            assert reply.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in reply and b'"path":"/late"' in reply
            await server.closed.wait()
