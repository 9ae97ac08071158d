"""Peer links: one persistent, authenticated TCP connection per peer and direction.

Each node dials every peer to send; it only receives on the connections it accepts.
A connection starts with a mutual HMAC challenge on the cluster secret, which also
derives a per-connection key; every frame after it carries a MAC over its sequence
number, so a frame replayed from another connection, after a restart or out of order
is refused. Frames are `u32 length | msgpack list of Messages | 16-byte MAC`.

Sending never blocks the driver: each peer has a queue bounded in messages and in
payload bytes, drained by its own task; what does not fit, and while a peer is
unreachable all its messages, are dropped (Raft resends). Received messages go
straight to `deliver` from the connection's task: a hop through a channel and another
task would add a scheduler pass to every replication round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import ssl
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
import trio

from dtfd.journal import fields
from dtfd.raft.messages import Message, NodeId

log = logging.getLogger("dtf.transport")

VERSION = 1
LOG_EVERY_S = 10.0  # repeated refusals from one peer are logged once per this interval
MAC_BYTES = 16
MAX_FRAME = 64 << 20
BATCH_BYTES = MAX_FRAME // 4  # a batch stops growing here: queued snapshot chunks must not add up past MAX_FRAME
QUEUE_BYTES = 2 * BATCH_BYTES  # per peer: 4096 queued 1 MiB snapshot chunks or appends would hold 4 GiB
HANDSHAKE_TIMEOUT = 5.0
_length = struct.Struct(">I")


class Hello(msgspec.Struct, frozen=True, array_like=True):
    version: int
    src: NodeId
    dst: NodeId
    nonce: bytes


class Challenge(msgspec.Struct, frozen=True, array_like=True):
    nonce: bytes
    proof: bytes


class Proof(msgspec.Struct, frozen=True, array_like=True):
    proof: bytes


class LinkError(Exception):
    """The peer broke the protocol or failed authentication; the connection is dropped."""


_batch_decoder = msgspec.msgpack.Decoder(list[Message])
_encoder = msgspec.msgpack.Encoder()


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


class _Framed:
    """Length-prefixed frames on a stream, MAC'd once a session key is set."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._keyed: hmac.HMAC | None = None  # keyed once; each frame's MAC starts from a copy
        self._sent = 0
        self._received = 0

    def authenticate(self, key: bytes) -> None:
        """Every frame from now on carries, and must carry, a MAC under the session key."""
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def _frame_mac(self, seq: int, payload: bytes) -> bytes:
        """HMAC-SHA256(key, seq | 0 | payload), as `_mac` computes it, without deriving the pads per frame."""
        assert self._keyed is not None
        mac = self._keyed.copy()
        mac.update(seq.to_bytes(8, "big") + b"\0")
        mac.update(payload)
        return mac.digest()[:MAC_BYTES]

    async def send(self, payload: bytes) -> None:
        if self._keyed is not None:
            payload += self._frame_mac(self._sent, payload)
            self._sent += 1
        await self.stream.send_all(_length.pack(len(payload)) + payload)

    async def receive(self) -> bytes | None:
        """The next frame's payload, or None at a clean end of stream."""
        while True:
            if len(self._buffer) >= 4:
                (size,) = _length.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise LinkError(f"frame of {size} bytes exceeds {MAX_FRAME}")
                if len(self._buffer) >= 4 + size:
                    frame = bytes(self._buffer[4 : 4 + size])
                    del self._buffer[: 4 + size]
                    return self._open(frame)
            data = await self.stream.receive_some(1 << 16)
            if not data:
                if self._buffer:
                    raise LinkError("connection closed mid-frame")
                return None
            self._buffer += data

    def _open(self, frame: bytes) -> bytes:
        if self._keyed is None:
            return frame
        payload, tag = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
        expected = self._frame_mac(self._received, payload)
        if len(tag) < MAC_BYTES or not hmac.compare_digest(tag, expected):
            raise LinkError("frame authentication failed (tampered, replayed or out of order)")
        self._received += 1
        return payload


def _decode(kind: type, payload: bytes | None) -> msgspec.Struct:
    if payload is None:
        raise LinkError("connection closed during handshake")
    try:
        return msgspec.msgpack.decode(payload, type=kind)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 in a string through as the latter
        raise LinkError(f"bad {kind.__name__}: {exc}") from None


def _payload_bytes(m: Message) -> int:
    """The bulk of a message's frame: its snapshot chunk or entries (0 for what is not a Message, e.g. a test's garbage)."""
    if not isinstance(m, Message):
        return 0
    return len(m.snapshot.data) if m.snapshot else sum(len(e.data) for e in m.entries)


def decode_batch(payload: bytes) -> list[Message]:
    """The messages of one frame; LinkError if it does not decode."""
    try:
        return _batch_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise LinkError(f"undecodable frame: {exc}") from None


@dataclass
class PeerStats:
    up: bool = False
    sent: int = 0
    dropped: int = 0
    connects: int = 0
    queued_bytes: int = 0  # payload bytes (entries, snapshot chunks) waiting in the queue


class Transport:
    """Delivers Raft messages between nodes; `deliver` is called with each message peers send us."""

    def __init__(
        self,
        node_id: NodeId,
        peers: dict[NodeId, tuple[str, int]],
        secret: bytes,
        deliver: Callable[[Message], None],
        *,
        queue_size: int = 4096,
        queue_bytes: int = QUEUE_BYTES,
        max_backoff: float = 0.05,
        rng: random.Random | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        if not secret:
            raise ValueError("secret: the cluster secret must not be empty")
        self.id = node_id
        self.peers = peers
        self._secret = secret
        self._deliver = deliver
        self._max_backoff = max_backoff
        self._queue_bytes = queue_bytes
        self._rng = rng or random.Random()
        self._server_ssl, self._client_ssl = server_ssl, client_ssl
        self._queues = {peer: trio.open_memory_channel[Message](queue_size) for peer in peers}
        self.stats = {peer: PeerStats() for peer in peers}
        self.errors: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their peers; never blocks, drops when a queue is full.

        Full is `queue_size` messages or `queue_bytes` of payload; a message bigger than that
        alone still goes into a queue that holds no payload.
        """
        for m in messages:
            queue = self._queues.get(m.dst)
            if queue is None:
                self.errors["unknown_destination"] += 1
                continue
            stats, size = self.stats[m.dst], _payload_bytes(m)
            if stats.queued_bytes and stats.queued_bytes + size > self._queue_bytes:
                stats.dropped += 1
                continue
            try:
                queue[0].send_nowait(m)
            except trio.WouldBlock:
                stats.dropped += 1
                continue
            stats.queued_bytes += size

    async def run(self, listeners: list[trio.SocketListener]) -> None:
        """Accept on `listeners` and keep a sender per peer, until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._accept, [listener])
            for peer in self.peers:
                nursery.start_soon(self._sender, peer)

    # ---- outgoing ----------------------------------------------------------

    async def _sender(self, peer: NodeId) -> None:
        host, port = self.peers[peer]
        queue = self._queues[peer][1]
        stats = self.stats[peer]
        backoff = 0.005
        while True:
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            except OSError:
                self._drop_queued(queue, stats)
                await trio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, self._max_backoff)
                continue
            try:
                if self._client_ssl is not None:
                    stream = trio.SSLStream(stream, self._client_ssl, server_hostname=host)
                async with stream:
                    framed = _Framed(stream)
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        await self._dial_handshake(framed, peer)
                    stats.up, stats.connects, backoff = True, stats.connects + 1, 0.005
                    log.info("peer link up %s", fields(peer=peer, direction="out"))
                    await self._pump(framed, queue, stats)
            except LinkError as exc:
                self.errors["handshake"] += 1
                self._warn_limited("handshake", peer, exc)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                self.errors["send_link"] += 1
                if stats.up:
                    log.warning("peer link down %s", fields(peer=peer, error=exc))
            stats.up = False
            await trio.sleep(backoff * self._rng.random())

    async def _dial_handshake(self, framed: _Framed, peer: NodeId) -> None:
        nonce = os.urandom(16)
        await framed.send(_encoder.encode(Hello(VERSION, self.id, peer, nonce)))
        challenge = _decode(Challenge, await framed.receive())
        ids = self.id.encode(), peer.encode()
        if not hmac.compare_digest(challenge.proof, _mac(self._secret, b"accept", nonce, challenge.nonce, *ids)):
            raise LinkError(f"peer {peer} failed authentication (wrong cluster secret?)")
        await framed.send(_encoder.encode(Proof(_mac(self._secret, b"dial", challenge.nonce, nonce, *ids))))
        framed.authenticate(_mac(self._secret, b"session", nonce, challenge.nonce, *ids))

    async def _pump(self, framed: _Framed, queue: trio.MemoryReceiveChannel[Message], stats: PeerStats) -> None:
        async for first in queue:
            batch, size = [first], _payload_bytes(first)
            while len(batch) < 1024 and size < BATCH_BYTES:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
                size += _payload_bytes(batch[-1])
            stats.queued_bytes -= size
            await framed.send(_encoder.encode(batch))
            stats.sent += len(batch)

    @staticmethod
    def _drop_queued(queue: trio.MemoryReceiveChannel[Message], stats: PeerStats) -> None:
        while True:
            try:
                queue.receive_nowait()
            except trio.WouldBlock:
                stats.queued_bytes = 0
                return
            stats.dropped += 1

    # ---- incoming ----------------------------------------------------------

    async def _accept(self, stream: trio.abc.Stream) -> None:
        peer = "?"
        if self._server_ssl is not None:
            stream = trio.SSLStream(stream, self._server_ssl, server_side=True)
        try:
            async with stream:
                framed = _Framed(stream)
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    peer = await self._accept_handshake(framed)
                log.info("peer link up %s", fields(peer=peer, direction="in"))
                while (payload := await framed.receive()) is not None:
                    for m in decode_batch(payload):
                        if m.src != peer:
                            raise LinkError(f"message claims src {m.src!r} on {peer}'s link")
                        self._deliver(m)
        except LinkError as exc:
            kind = "bad_frame" if peer != "?" else "handshake"
            self.errors[kind] += 1
            self._warn_limited(kind, peer, exc)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.errors["receive_link"] += 1
            log.info("peer link closed %s", fields(peer=peer, error=exc))

    def _warn_limited(self, kind: str, peer: str, error: Exception) -> None:
        """A misconfigured peer retries many times a second: log the first refusal, then a count."""
        now = trio.current_time()
        last, suppressed = self._logged.get((kind, peer), (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            self._logged[(kind, peer)] = (last, suppressed + 1)
            return
        self._logged[(kind, peer)] = (now, 0)
        log.warning("peer link refused %s", fields(peer=peer, error=error, suppressed=suppressed))

    async def _accept_handshake(self, framed: _Framed) -> NodeId:
        hello = _decode(Hello, await framed.receive())
        if hello.version != VERSION or hello.dst != self.id or hello.src not in self.peers:
            raise LinkError(f"unexpected hello from {hello.src!r} to {hello.dst!r} (version {hello.version})")
        nonce = os.urandom(16)
        ids = hello.src.encode(), self.id.encode()
        await framed.send(_encoder.encode(Challenge(nonce, _mac(self._secret, b"accept", hello.nonce, nonce, *ids))))
        proof = _decode(Proof, await framed.receive())
        if not hmac.compare_digest(proof.proof, _mac(self._secret, b"dial", nonce, hello.nonce, *ids)):
            raise LinkError(f"{hello.src} failed authentication (wrong cluster secret?)")
        framed.authenticate(_mac(self._secret, b"session", hello.nonce, nonce, *ids))
        return hello.src
