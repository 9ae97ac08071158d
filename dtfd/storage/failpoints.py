"""Test-only storage faults for a running dtfd: failed fsyncs, a full disk, and a planted
bug that acknowledges writes before they are durable.

Nothing here runs unless an environment variable asks for it: without them `io` hands
back the real write and fsync and `storage` the storage itself, so production pays
nothing and behaves the same.

DTF_FAILPOINTS=PATH
    Before every storage write and fsync the node looks at PATH (one stat while it is
    absent). A line `write=ENOSPC` fails every write with that errno, `fsync=EIO` every
    fsync, until the line or the file is gone: a nemesis breaks and heals the disk of a
    running node by writing or removing the file (`arm`, `disarm`).
DTF_PLANTED_ACK_BEFORE_FSYNC_MS=N
    A planted bug: `sync()` returns at once and what a Ready asked to persist reaches the
    disk N ms later, from a thread. The node acknowledges entries that live only in its
    memory, as if the page cache were lost on a crash (skipping fsync alone would not
    show it: the page cache survives kill -9). A chaos run must catch it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from dtfd.raft.messages import Entry, HardState, PersistedState, Snapshot
from dtfd.storage.files import FsyncFn, WriteFn, unlink_quietly, write_atomically
from dtfd.storage.interface import LogStorage, StorageFailed

log = logging.getLogger("dtf.storage")

FAILPOINTS_ENV = "DTF_FAILPOINTS"
ACK_BEFORE_FSYNC_ENV = "DTF_PLANTED_ACK_BEFORE_FSYNC_MS"
OPERATIONS = ("write", "fsync")
EX_CONFIG = 78  # as dtfd.config: a bad test switch is bad configuration


def arm(path: str, **faults: int) -> None:
    """Make the node watching `path` fail the named operations, e.g. `arm(p, fsync=errno.EIO)`."""
    unknown = set(faults) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown storage operations {sorted(unknown)}; known: {OPERATIONS}")
    text = "".join(f"{op}={errno.errorcode[code]}\n" for op, code in faults.items())
    write_atomically(path, text.encode())


def disarm(path: str) -> None:
    unlink_quietly(path)


def parse(path: str, text: str) -> dict[str, int]:
    """`op=ERRNO` lines (blank lines and `#` comments allowed) as {op: errno}."""
    faults = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        op, _, name = (part.strip() for part in line.partition("="))
        code = getattr(errno, name, None)
        if op not in OPERATIONS or not isinstance(code, int):
            raise ValueError(f"{path} line {number}: {line!r} is not OP=ERRNO with OP in {OPERATIONS} (e.g. fsync=EIO)")
        faults[op] = code
    return faults


class Failpoints:
    """The faults a control file asks for, re-read only when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._faults: dict[str, int] = {}

    def check(self, op: str) -> None:
        """Raise the OSError the control file names for `op`, if any."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._seen:
            try:
                with open(self.path) as f:
                    self._faults = parse(self.path, f.read())
            except FileNotFoundError:
                return  # disarmed between the stat and the open
            self._seen = key
            log.warning("storage failpoints now %s", " ".join(f"{name}={errno.errorcode[c]}" for name, c in self._faults.items()) or "none")
        code = self._faults.get(op)
        if code is not None:
            raise OSError(code, f"{os.strerror(code)} (failpoint {self.path})")


def io(write: WriteFn, fsync: FsyncFn, environ: Mapping[str, str] = os.environ) -> tuple[WriteFn, FsyncFn]:
    """`write` and `fsync` as they are, or behind the failpoints DTF_FAILPOINTS names."""
    path = environ.get(FAILPOINTS_ENV)
    if not path:
        return write, fsync
    points = Failpoints(path)
    log.warning("storage failpoints enabled (test only) path=%s", path)

    def failing_write(fd: int, data: bytes) -> int:
        points.check("write")
        return write(fd, data)

    def failing_fsync(fd: int) -> None:
        points.check("fsync")
        fsync(fd)

    return failing_write, failing_fsync


def storage(real: LogStorage, environ: Mapping[str, str] = os.environ) -> LogStorage:
    """`real`, or `real` behind the planted ack-before-fsync bug when its variable is set."""
    value = environ.get(ACK_BEFORE_FSYNC_ENV)
    if not value:
        return real
    try:
        delay_ms = int(value)
        if delay_ms <= 0:
            raise ValueError
    except ValueError:
        real.close()
        log.critical("%s=%r: expected a positive number of milliseconds", ACK_BEFORE_FSYNC_ENV, value)
        raise SystemExit(EX_CONFIG) from None
    log.warning("PLANTED BUG: writes acknowledged before they are durable (test only) delay_ms=%d", delay_ms)
    return AckBeforeFsync(real, delay_ms / 1000)


class AckBeforeFsync:
    """A LogStorage whose `sync()` returns before anything is written (the planted bug).

    Appends, hard states and syncs are queued in order and applied to the real storage by
    a thread once they are `delay_s` old; what is queued when the process is killed is
    lost. Snapshots, compaction and close first apply everything queued, so the real
    storage always sees the same sequence of calls the node made.
    """

    def __init__(self, real: LogStorage, delay_s: float) -> None:
        self._real, self._delay_s = real, delay_s
        self._queue: list[tuple[float, Callable[[], None]]] = []
        self._queued = threading.Lock()  # guards _queue
        self._writing = threading.Lock()  # one caller of the real storage at a time, in queue order
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, name="ack-before-fsync", daemon=True)
        self._thread.start()

    def load(self) -> PersistedState:
        self._flush(everything=True)
        return self._real.load()

    def append(self, entries: Sequence[Entry]) -> None:
        self._later(partial(self._real.append, list(entries)))

    def set_hard_state(self, hard_state: HardState) -> None:
        self._later(partial(self._real.set_hard_state, hard_state))

    def sync(self) -> None:
        self._later(self._real.sync)  # the bug: nothing is durable yet, and the caller goes on as if it were

    def install_snapshot(self, snapshot: Snapshot) -> None:
        self._flush(everything=True)
        self._real.install_snapshot(snapshot)

    def compact(self, snapshot: Snapshot) -> None:
        self._flush(everything=True)
        self._real.compact(snapshot)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._flush(everything=True)
        finally:
            self._real.close()

    def _later(self, call: Callable[[], None]) -> None:
        if self._error is not None:
            raise StorageFailed(f"a delayed write failed: {self._error}") from self._error
        with self._queued:
            self._queue.append((time.monotonic(), call))

    def _flusher(self) -> None:
        while not self._stop.wait(self._delay_s / 4):
            try:
                self._flush(everything=False)
            except Exception as e:  # surfaced to the node by its next append or sync
                self._error = e
                return

    def _flush(self, everything: bool) -> None:
        with self._writing:
            due = time.monotonic() - self._delay_s
            with self._queued:
                n = len(self._queue) if everything else sum(1 for at, _ in self._queue if at <= due)
                calls, self._queue = self._queue[:n], self._queue[n:]
            for _, call in calls:
                call()
