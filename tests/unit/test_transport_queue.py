"""A peer's send queue is bounded in bytes as well as in messages: 4096 queued snapshot chunks
of 1 MiB would hold 4 GiB for one slow peer."""

from __future__ import annotations

import trio

from dtfd.raft.messages import ConfState, Entry, Message, MessageType, SnapshotChunk, SnapshotMeta
from dtfd.server.transport import Transport

MiB = 1 << 20
META = SnapshotMeta(index=100, term=1, conf=ConfState(("a", "b")), size=64 * MiB)


def chunk(n: int, size: int = MiB) -> Message:
    return Message(type=MessageType.SNAPSHOT, src="a", dst="b", term=1, snapshot=SnapshotChunk(META, n * MiB, b"s" * size, False))


def append(index: int, size: int) -> Message:
    return Message(type=MessageType.APPEND, src="a", dst="b", term=1, index=index - 1, entries=(Entry(1, index, data=b"e" * size),))


def heartbeat() -> Message:
    return Message(type=MessageType.HEARTBEAT, src="a", dst="b", term=1)


def transport(queue_bytes: int) -> Transport:
    return Transport("a", {"b": ("127.0.0.1", 1)}, b"secret", lambda message: None, queue_bytes=queue_bytes)


class Recorder:
    """The framed link the pump writes to: keeps what it was asked to send."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, payload: bytes) -> None:
        self.frames.append(payload)


def test_messages_past_the_byte_bound_are_dropped_but_small_ones_still_go():
    link = transport(queue_bytes=8 * MiB)
    stats = link.stats["b"]
    link.send([chunk(n) for n in range(20)])
    assert (stats.queued_bytes, stats.dropped) == (8 * MiB, 12)
    link.send([append(1, MiB // 2)])
    assert stats.dropped == 13
    link.send([heartbeat() for _ in range(10)])  # no payload: only the count bound applies
    assert stats.dropped == 13 and stats.queued_bytes == 8 * MiB


def test_a_message_bigger_than_the_bound_alone_is_still_sent():
    """Otherwise an append of max_bytes_per_msg above a small bound could never reach the peer."""
    link = transport(queue_bytes=MiB)
    stats = link.stats["b"]
    link.send([heartbeat(), chunk(0, 3 * MiB), chunk(1, 10)])
    assert (stats.queued_bytes, stats.dropped) == (3 * MiB, 1)


async def test_sending_frees_the_bytes_and_dropping_a_dead_peers_queue_too():
    link = transport(queue_bytes=4 * MiB)
    stats, (_, queue) = link.stats["b"], link._queues["b"]
    link.send([chunk(n) for n in range(4)])
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link._pump, recorder, queue, stats)
        with trio.fail_after(10):
            while stats.sent < 4:
                await trio.sleep(0.01)
        assert stats.queued_bytes == 0
        link.send([chunk(n) for n in range(4, 8)])
        with trio.fail_after(10):
            while stats.sent < 8:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert stats.dropped == 0 and stats.queued_bytes == 0
    link.send([chunk(n) for n in range(6)])
    assert (stats.queued_bytes, stats.dropped) == (4 * MiB, 2)
    link._drop_queued(queue, stats)  # as the sender does while the peer cannot be reached
    assert (stats.queued_bytes, stats.dropped) == (0, 6)
    link.send([chunk(0)])
    assert stats.queued_bytes == MiB
