"""Peer links over real loopback sockets: delivery, authentication, replay and failure isolation."""

import math
import time

import msgspec
import pytest
import trio
import trio.testing

from dtfd.raft.messages import Entry, Message, MessageType
from dtfd.server import transport

pytestmark = pytest.mark.integration
SECRET = b"s3cret-cluster-key"


def _msg(src: str, dst: str, n: int) -> Message:
    return Message(type=MessageType.APPEND, src=src, dst=dst, term=1, index=n, entries=(Entry(1, n + 1, data=b"x" * n),))


class Cluster:
    """Transports for `ids` on loopback ports, each node in its own cancel scope so it can be stopped."""

    def __init__(self, ids: list[str], secrets: dict[str, bytes] | None = None) -> None:
        self.ids = ids
        self.secrets = secrets or {}
        self.ports: dict[str, int] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.transports: dict[str, transport.Transport] = {}
        self.inboxes: dict[str, trio.MemoryReceiveChannel[Message]] = {}

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = {node: await trio.open_tcp_listeners(0, host="127.0.0.1") for node in self.ids}
        self.ports = {node: ls[0].socket.getsockname()[1] for node, ls in listeners.items()}
        for node in self.ids:
            await nursery.start(self._run, node, listeners[node])

    async def restart(self, nursery: trio.Nursery, node: str) -> None:
        await nursery.start(self._run, node, await trio.open_tcp_listeners(self.ports[node], host="127.0.0.1"))

    def stop(self, node: str) -> None:
        self.scopes[node].cancel()

    async def _run(self, node: str, listeners: list[trio.SocketListener], task_status=trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[Message](math.inf)
        peers = {p: ("127.0.0.1", self.ports[p]) for p in self.ids if p != node}
        self.transports[node] = transport.Transport(node, peers, self.secrets.get(node, SECRET), send.send_nowait)
        self.inboxes[node] = receive
        with trio.CancelScope() as self.scopes[node]:
            task_status.started()
            try:
                await self.transports[node].run(listeners)
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()

    async def wait_up(self, src: str, dst: str, deadline: float = 10) -> None:
        with trio.fail_after(deadline):
            while not self.transports[src].stats[dst].up:
                await trio.sleep(0.005)


async def _receive(inbox: trio.MemoryReceiveChannel[Message], count: int, deadline: float = 10) -> list[Message]:
    got = []
    with trio.fail_after(deadline):
        while len(got) < count:
            got.append(await inbox.receive())
    return got


async def test_messages_reach_every_peer_in_order():
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b", "c"])
        await cluster.start(nursery)
        for src in cluster.ids:
            for dst in cluster.ids:
                if src != dst:
                    await cluster.wait_up(src, dst)
        cluster.transports["a"].send([_msg("a", "b", n) for n in range(500)])
        cluster.transports["c"].send([_msg("c", "b", n) for n in range(3)])
        got = await _receive(cluster.inboxes["b"], 503)
        from_a = [m for m in got if m.src == "a"]
        assert from_a == [_msg("a", "b", n) for n in range(500)]
        assert len([m for m in got if m.src == "c"]) == 3
        nursery.cancel_scope.cancel()


async def test_wrong_secret_is_refused_and_nothing_is_delivered():
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b"], secrets={"a": b"not-the-secret"})
        await cluster.start(nursery)
        with trio.fail_after(10):
            while cluster.transports["b"].errors["handshake"] < 2:
                cluster.transports["a"].send([_msg("a", "b", 1)])
                await trio.sleep(0.01)
        assert not cluster.transports["a"].stats["b"].up
        with pytest.raises(trio.WouldBlock):
            cluster.inboxes["b"].receive_nowait()
        nursery.cancel_scope.cancel()


async def test_unknown_node_is_refused():
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b"])
        await cluster.start(nursery)
        intruder = transport.Transport("mallory", {"b": ("127.0.0.1", cluster.ports["b"])}, SECRET, lambda m: None)
        nursery.start_soon(intruder.run, [])
        with trio.fail_after(10):
            while cluster.transports["b"].errors["handshake"] < 1:
                await trio.sleep(0.01)
        assert not intruder.stats["b"].up
        nursery.cancel_scope.cancel()


async def test_garbage_after_handshake_resets_only_that_connection():
    """A frame that does not decode is counted and its connection dropped; the sender reconnects."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b"])
        await cluster.start(nursery)
        await cluster.wait_up("a", "b")
        queue = cluster.transports["a"]._queues["b"][0]
        for _ in range(3):
            await queue.send(b"not a message")  # type: ignore[arg-type]
        with trio.fail_after(10):
            while cluster.transports["b"].errors["bad_frame"] < 1:
                await trio.sleep(0.01)
        await cluster.wait_up("a", "b")
        with trio.fail_after(10):
            while True:
                cluster.transports["a"].send([_msg("a", "b", 7)])
                try:
                    with trio.fail_after(0.2):
                        if (await cluster.inboxes["b"].receive()) == _msg("a", "b", 7):
                            break
                except trio.TooSlowError:
                    continue
        nursery.cancel_scope.cancel()


async def test_frames_replayed_on_another_session_or_reordered_are_refused():
    key_a, key_b = b"k" * 32, b"j" * 32
    sender_stream, receiver_stream = trio.testing.memory_stream_pair()
    sender, receiver = transport._Framed(sender_stream), transport._Framed(receiver_stream)
    sender.authenticate(key_a)
    receiver.authenticate(key_a)
    await sender.send(b"first")
    await sender.send(b"second")
    assert await receiver.receive() == b"first"
    assert await receiver.receive() == b"second"

    captured = []

    class Recorder:
        async def send_all(self, data: bytes) -> None:
            captured.append(data)

    recorder = transport._Framed(Recorder())  # type: ignore[arg-type]
    recorder.authenticate(key_a)
    await recorder.send(b"first")
    await recorder.send(b"second")
    # the wire format of version 1: a node upgraded one at a time still talks to the others
    assert captured[1][-transport.MAC_BYTES :] == transport._mac(key_a, (1).to_bytes(8, "big"), b"second")[: transport.MAC_BYTES]

    other_stream, other_end = trio.testing.memory_stream_pair()
    other = transport._Framed(other_end)
    other.authenticate(key_b)  # a different connection: different session key
    await other_stream.send_all(captured[0])
    with pytest.raises(transport.LinkError):
        await other.receive()

    reorder_stream, reorder_end = trio.testing.memory_stream_pair()
    reorder = transport._Framed(reorder_end)
    reorder.authenticate(key_a)
    await reorder_stream.send_all(captured[1])  # the second frame first
    with pytest.raises(transport.LinkError):
        await reorder.receive()


async def _recording_proxy(nursery: trio.Nursery, target_port: int, captured: bytearray) -> int:
    """A TCP proxy to `target_port` that keeps every byte the dialing side sends: an eavesdropper's capture."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, record: bool, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                if record:
                    captured.extend(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def relay(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", target_port) as server:
            async with trio.open_nursery() as both:
                both.start_soon(pump, client, server, True, both.cancel_scope)
                both.start_soon(pump, server, client, False, both.cancel_scope)

    nursery.start_soon(trio.serve_listeners, relay, listeners)
    return listeners[0].socket.getsockname()[1]


async def _replay(port: int, recording: bytes) -> None:
    """Play a recording to a node on a fresh connection and read until the node hangs up."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(recording)
            try:
                while await stream.receive_some(1 << 16):
                    pass
            except trio.BrokenResourceError:
                pass


async def test_a_captured_peer_stream_replayed_on_a_new_connection_or_after_a_restart_is_refused():
    """Everything an eavesdropper captured of a live link (handshake and frames) is refused when played back."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b"])
        await cluster.start(nursery)
        captured = bytearray()
        proxy = await _recording_proxy(nursery, cluster.ports["b"], captured)
        dialer = transport.Transport("a", {"b": ("127.0.0.1", proxy)}, SECRET, lambda m: None)  # "a", over the tapped wire
        tapped = trio.CancelScope()

        async def dial() -> None:
            with tapped:
                await dialer.run([])

        nursery.start_soon(dial)
        dialer.send([_msg("a", "b", 42)])
        assert await _receive(cluster.inboxes["b"], 1) == [_msg("a", "b", 42)]
        tapped.cancel()
        assert len(captured) > 100  # hello, proof and the frame

        for restarted in (False, True):
            if restarted:
                cluster.stop("b")
                await cluster.restart(nursery, "b")
            receiver = cluster.transports["b"]
            refused = receiver.errors["handshake"]
            await _replay(cluster.ports["b"], bytes(captured))
            with trio.fail_after(10):  # the old proof does not answer a new challenge
                while receiver.errors["handshake"] < refused + 1:
                    await trio.sleep(0.005)
            with pytest.raises(trio.WouldBlock):
                cluster.inboxes["b"].receive_nowait()  # nothing delivered
        nursery.cancel_scope.cancel()


async def test_a_hello_with_bad_utf8_is_refused_and_the_node_keeps_serving():
    """Before any authentication: this once escaped the handshake as UnicodeDecodeError and ended the transport."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b"])
        await cluster.start(nursery)
        hello = msgspec.msgpack.encode(transport.Hello(transport.VERSION, "a", "b", b"n" * 16)).replace(b"\xa1a", b"\xa1\x80")
        await _replay(cluster.ports["b"], len(hello).to_bytes(4, "big") + hello)
        with trio.fail_after(10):
            while cluster.transports["b"].errors["handshake"] < 1:
                await trio.sleep(0.005)
        cluster.transports["a"].send([_msg("a", "b", 5)])
        assert await _receive(cluster.inboxes["b"], 1) == [_msg("a", "b", 5)]
        nursery.cancel_scope.cancel()


async def test_oversized_length_prefix_is_refused_without_reading_it():
    stream, end = trio.testing.memory_stream_pair()
    framed = transport._Framed(end)
    await stream.send_all((transport.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(transport.LinkError, match="exceeds"):
        await framed.receive()


async def test_down_peer_does_not_stall_others_and_restart_reconnects_fast():
    """A dead peer costs only its own dropped messages; once it is back, the link returns at once."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(["a", "b", "c"])
        await cluster.start(nursery)
        await cluster.wait_up("a", "b")
        await cluster.wait_up("a", "c")
        cluster.stop("c")
        with trio.fail_after(10):
            while cluster.transports["a"].stats["c"].up:
                cluster.transports["a"].send([_msg("a", "c", 1)])
                await trio.sleep(0.005)
        cluster.transports["a"].send([_msg("a", "c", 1)] * 10_000)
        cluster.transports["a"].send([_msg("a", "b", 2)])
        assert await _receive(cluster.inboxes["b"], 1) == [_msg("a", "b", 2)]
        assert cluster.transports["a"].stats["c"].dropped > 0

        started = time.monotonic()
        await cluster.restart(nursery, "c")
        await cluster.wait_up("a", "c")
        print(f"link back {1000 * (time.monotonic() - started):.1f} ms after restart")
        cluster.transports["a"].send([_msg("a", "c", 3)])
        with trio.fail_after(10):  # messages queued while c was down may arrive first: Raft tolerates stale ones
            while (await cluster.inboxes["c"].receive()) != _msg("a", "c", 3):
                pass
        nursery.cancel_scope.cancel()
