"""The replicated state machine: pure, deterministic, identical on every node.

`apply(index, envelope)` is a function of the state and the command only: times come
stamped by the leader in the envelope, never from a clock here, so every node computes
the same state and the same `checksum()`. Client sessions make retried commands
idempotent (Raft thesis 6.3): a command whose (client, seq) was already applied
returns the recorded result instead of applying twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from dtfd.state.health import Health, HealthCommand
from dtfd.state.tasks import Workload, WorkloadCommand

MAX_SESSIONS = 10_000  # past this, the least recently used tenth is evicted (deterministically)
SESSION_TTL_S = 24 * 3600.0
SESSION_SWEEP_EVERY = 1024  # expired sessions are swept at indexes divisible by this, on every node alike


class Put(msgspec.Struct, tag="put", frozen=True):
    key: str
    value: str


class Delete(msgspec.Struct, tag="delete", frozen=True):
    key: str


class CompareAndSet(msgspec.Struct, tag="cas", frozen=True):
    key: str
    expected: str | None  # None: the key must be absent
    value: str


class SetConfig(msgspec.Struct, tag="config", frozen=True):
    key: str
    value: str


KvCommand = Put | Delete | CompareAndSet | SetConfig


class Batch(msgspec.Struct, tag="batch", frozen=True):
    """Many key/value commands in one log entry, applied in order; one result each."""

    commands: list[KvCommand]


Command = KvCommand | Batch | WorkloadCommand | HealthCommand


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """One replicated command: who sent it, its place in that client's sequence, when."""

    client: str  # "" for commands that need no retry protection (the scheduler's, anonymous writes)
    seq: int
    at: float  # leader's wall clock when it proposed, seconds since the epoch
    command: Command


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    value: Any = None
    error: str = ""  # "", "cas_failed", "stale_sequence", or a workload error code
    index: int = 0
    duplicate: bool = False


class Session(msgspec.Struct):
    seq: int
    result: Result
    last_seen: float


class Image(msgspec.Struct):
    """The whole state in one canonical, sorted form: snapshots and checksums use it."""

    applied: int = 0
    kv: dict[str, str] = {}
    config: dict[str, str] = {}
    sessions: dict[str, Session] = {}
    workload: Workload = msgspec.field(default_factory=Workload)
    health: Health = msgspec.field(default_factory=Health)


_encoder = msgspec.msgpack.Encoder(order="sorted")
_image_decoder = msgspec.msgpack.Decoder(Image)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    return _envelope_decoder.decode(data)


class StateMachine:
    def __init__(self) -> None:
        self.image = Image()
        self._encoded: bytes | None = None  # snapshot() of the image as it is now; None once it changed

    @property
    def applied(self) -> int:
        return self.image.applied

    def apply(self, index: int, data: bytes) -> Result:
        """Apply the command at `index`; undecodable data is recorded as a failed no-op."""
        return self.apply_decoded(index, data)[1]

    def apply_decoded(self, index: int, data: bytes) -> tuple[Envelope | None, Result]:
        """As apply(), also returning the decoded envelope for observers (history, metrics)."""
        if index != self.image.applied + 1:
            raise ValueError(f"apply out of order: {index} after {self.image.applied}")
        self.image.applied = index
        self._encoded = None
        try:
            envelope = decode_envelope(data)
        except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for bad UTF-8 in a string
            return None, Result(ok=False, error="undecodable", index=index)
        if not envelope.client:
            return envelope, self._execute(envelope.command, envelope.at, index)
        session = self.image.sessions.get(envelope.client)
        if session is not None and envelope.seq <= session.seq:
            if envelope.seq == session.seq:
                return envelope, msgspec.structs.replace(session.result, duplicate=True)
            return envelope, Result(ok=False, error="stale_sequence", index=index)
        result = self._execute(envelope.command, envelope.at, index)
        self.image.sessions[envelope.client] = Session(envelope.seq, result, envelope.at)
        self._expire_sessions(envelope.at, index)
        return envelope, result

    def mark_applied(self, index: int) -> None:
        """A no-op entry (a new leader's) takes an index without changing state."""
        if index != self.image.applied + 1:
            raise ValueError(f"apply out of order: {index} after {self.image.applied}")
        self.image.applied = index
        self._encoded = None

    def _execute(self, command: Command, at: float, index: int) -> Result:
        if isinstance(command, Batch):
            results = [self._execute(c, at, index) for c in command.commands]
            return Result(ok=True, value=[msgspec.to_builtins(r) for r in results], index=index)
        if isinstance(command, HealthCommand):
            ok, value, error = self.image.health.apply(command, at)
            return Result(ok=ok, value=value, error=error, index=index)
        if not isinstance(command, KvCommand):
            ok, value, error = self.image.workload.apply(command, at, index, self.image.config)
            return Result(ok=ok, value=value, error=error, index=index)
        kv = self.image.kv
        if isinstance(command, Put):
            kv[command.key] = command.value
            return Result(ok=True, value=command.value, index=index)
        if isinstance(command, Delete):
            return Result(ok=True, value=kv.pop(command.key, None), index=index)
        if isinstance(command, CompareAndSet):
            current = kv.get(command.key)
            if current != command.expected:
                return Result(ok=False, value=current, error="cas_failed", index=index)
            kv[command.key] = command.value
            return Result(ok=True, value=command.value, index=index)
        self.image.config[command.key] = command.value
        return Result(ok=True, value=command.value, index=index)

    def _expire_sessions(self, now: float, index: int) -> None:
        """Cheap on the hot path: a sweep every SESSION_SWEEP_EVERY indexes, eviction in tenths."""
        sessions = self.image.sessions
        if index % SESSION_SWEEP_EVERY == 0:
            for client in [c for c, s in sessions.items() if now - s.last_seen > SESSION_TTL_S]:
                del sessions[client]
        if len(sessions) > MAX_SESSIONS:
            by_age = sorted(sessions, key=lambda c: (sessions[c].last_seen, c))
            for client in by_age[: len(sessions) - MAX_SESSIONS * 9 // 10]:
                del sessions[client]

    def get(self, key: str) -> str | None:
        return self.image.kv.get(key)

    def snapshot(self) -> bytes:
        """The canonical encoding of the image, memoised until the next apply.

        At 100 MB it takes a tenth of a second of the event loop, and a checkpoint, a
        compaction and /v1/status may all ask for it at the same applied index.
        """
        if self._encoded is None:
            self._encoded = _encoder.encode(self.image)
        return self._encoded

    def restore(self, data: bytes) -> None:
        self.image = _image_decoder.decode(data)
        self._encoded = None  # not `data`: an image from an older version may encode differently now

    def checksum(self) -> str:
        """SHA-256 of the canonical image: equal on every node at the same applied index."""
        return image_digest(self.snapshot())


def image_digest(image: bytes) -> str:
    """checksum() of an encoded image; hashlib releases the GIL, so callers may run it in a worker thread."""
    return hashlib.sha256(image).hexdigest()
