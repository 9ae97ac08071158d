"""The data directory: its layout, its lock, and DiskStorage, the LogStorage on disk.

    DIR/LOCK            flock()ed by the node that has the dir open
    DIR/hardstate       term, vote, commit (checksummed, replaced atomically)
    DIR/wal/*.wal       log segments
    DIR/snap/*.snap     snapshots, newest two
    DIR/history.duckdb  queryable history, derived from the log (see history.py)

`inspect` reads all of it without changing anything (it backs `dtfd verify`);
DiskStorage opens on top of it, applies the repairs it lists (torn tail, leftover temp
files, an interrupted snapshot install) and refuses to open on any problem.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from dtfd.raft.messages import NONE, Entry, HardState, PersistedState, Snapshot
from dtfd.storage import hardstate, snapshots
from dtfd.storage.interface import EX_DATAERR, EX_IOERR, EX_TEMPFAIL, StorageCorrupt, StorageFailed
from dtfd.storage.files import FsyncFn, WriteFn, fsync_dir, unlink_quietly, write_atomically
from dtfd.storage.wal import SEGMENT_SIZE, Finding, Wal, WalScan, scan

log = logging.getLogger("dtf.storage")

LOCK_FILE = "LOCK"
REJOIN_FILE = "REJOIN"  # present after a reseed: the term up to which this node may have voted
RESEED_SUFFIX = ".reseed"  # DIR.reseed: the new dir of a reseed before the swap, or the old one right after
PAUSE_ENV = "DTF_TEST_PAUSE_AT"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
COMMIT_WRITE_INTERVAL_S = 1.0
WAL_DIR = "wal"
SNAP_DIR = "snap"


class DataDirLocked(Exception):
    """Another process has this data dir open; two nodes on one log would corrupt it."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        super().__init__(f"data dir {data_dir} is in use by another process (lock held on {LOCK_FILE})")


@dataclass
class Inspection:
    data_dir: str
    wal: WalScan
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()  # after the snapshot
    reset_log_to: int | None = None  # set when a snapshot install was interrupted
    leftovers: list[str] = field(default_factory=list)
    skipped: list[StorageCorrupt] = field(default_factory=list)  # damaged snapshots passed over
    warnings: list[Finding] = field(default_factory=list)
    problems: list[StorageCorrupt] = field(default_factory=list)

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.meta.index if self.snapshot else 0


def inspect(data_dir: str) -> Inspection:
    """Read a data dir and check it, changing nothing."""
    snap_dir = os.path.join(data_dir, SNAP_DIR)
    ins = Inspection(data_dir, scan(os.path.join(data_dir, WAL_DIR)))
    if ins.wal.corrupt:
        ins.problems.append(ins.wal.corrupt)
    if t := ins.wal.torn:
        ins.warnings.append(Finding(t.path, t.offset, f"torn tail, would be truncated ({t.problem})"))
    try:
        ins.hard_state = hardstate.read(data_dir)
    except StorageCorrupt as e:
        ins.problems.append(e)
    try:
        ins.snapshot, ins.skipped = snapshots.newest_valid(snap_dir)
    except StorageCorrupt as e:
        ins.problems.append(e)
    snap_files, snap_leftovers = snapshots.list_files(snap_dir)
    ins.leftovers = ins.wal.leftovers + snap_leftovers
    if os.path.exists(hs_tmp := os.path.join(data_dir, hardstate.FILENAME + ".tmp")):
        ins.leftovers.append(hs_tmp)
    ins.warnings += [Finding(p, None, "leftover temp file, would be removed") for p in ins.leftovers]
    hs_path = os.path.join(data_dir, hardstate.FILENAME)
    if ins.hard_state is None and (ins.wal.segments or snap_files) and not os.path.exists(hs_path):
        ins.problems.append(StorageCorrupt(hs_path, None, "hard state file missing but the data dir holds a log"))
    if not ins.problems:
        _check_consistency(ins, hs_path)
        if ins.problems:
            ins.problems += ins.skipped
        else:
            ins.warnings += [Finding(e.path, e.offset, f"snapshot skipped for an older one: {e.problem}") for e in ins.skipped]
    return ins


def _check_consistency(ins: Inspection, hs_path: str) -> None:
    """Snapshot, log and hard state must describe one history."""
    snap = ins.snapshot.meta if ins.snapshot else None
    s, t = (snap.index, snap.term) if snap else (0, 0)
    entries, wal = ins.wal.entries, ins.wal
    if wal.segments:
        first, seg0 = wal.first_index, wal.segments[0].path
        if first > s + 1:
            covered = f"the snapshot ends at {s}" if snap else "there is no snapshot"
            ins.problems.append(StorageCorrupt(seg0, None, f"log starts at index {first} but {covered}"))
            return
        if wal.next_index - 1 < s or (s >= first and entries[s - first].term != t):
            ins.reset_log_to = s + 1
            ins.warnings.append(
                Finding(seg0, None, f"log does not continue snapshot {s} term {t} (interrupted snapshot install), would be reset")
            )
            entries = []
        else:
            entries = entries[s + 1 - first :]
    ins.entries = tuple(entries)
    hs = ins.hard_state or HardState()
    last_term = entries[-1].term if entries else t
    if hs.commit > ins.last_index:
        ins.problems.append(StorageCorrupt(hs_path, None, f"commit {hs.commit} beyond the last index {ins.last_index}"))
    if hs.term < last_term:
        ins.problems.append(StorageCorrupt(hs_path, None, f"term {hs.term} below the log's term {last_term}"))


def lock(data_dir: str) -> int:
    """Take the data dir's exclusive lock; the returned fd holds it until closed."""
    fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirLocked(data_dir) from None
    return fd


@contextmanager
def _io(what: str):
    try:
        yield
    except OSError as e:
        log.error('storage write failed what="%s" error="%s"', what, e)
        raise StorageFailed(f"{what} failed: {e.strerror or e}") from e


class DiskStorage:
    """LogStorage over a data dir. Opening takes the lock and recovers; `load()` is cheap.

    Hard state changes are written at `sync()`, after the WAL is durable, so the stored
    commit never runs ahead of the stored log; a new term (and its vote) is written
    before the first entry or snapshot of that term, so the stored term never lags it.
    A change of the commit index alone is written at most every COMMIT_WRITE_INTERVAL_S:
    Raft needs term and vote durable before replying, but commit is volatile state (a
    restarted node learns it again from the leader), and rewriting the file on every
    commit costs three fsyncs per write cycle.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        segment_size: int = SEGMENT_SIZE,
        write: WriteFn = os.write,
        fsync: FsyncFn = os.fdatasync,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self._write, self._fsync, self._clock = write, fsync, clock
        self._commit_written = clock()
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock_fd = lock(self.data_dir)
        try:
            self._recover(segment_size)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _recover(self, segment_size: int) -> None:
        ins = inspect(self.data_dir)
        if ins.problems:
            raise ins.problems[0]
        for e in ins.skipped:
            log.warning('snapshot skipped for an older one path=%s offset=%s problem="%s"', e.path, e.offset, e.problem)
        for path in ins.leftovers:
            log.info("storage leftover temp file removed path=%s", path)
            if path not in ins.wal.leftovers:  # Wal.open removes its own
                os.unlink(path)
        self._hard_state = ins.hard_state or HardState()
        self._pending: HardState | None = None
        if ins.hard_state is None:
            hardstate.write(self.data_dir, self._hard_state, self._fsync, self._write)
        for sub in (SNAP_DIR, WAL_DIR):
            os.makedirs(os.path.join(self.data_dir, sub), exist_ok=True)
        fsync_dir(self.data_dir)
        self._snap_index = ins.snapshot.meta.index if ins.snapshot else 0
        self._wal, _ = Wal.open(
            os.path.join(self.data_dir, WAL_DIR),
            self._snap_index + 1,
            ins.wal,
            segment_size=segment_size,
            write=self._write,
            fsync=self._fsync,
        )
        if ins.reset_log_to:
            log.warning("wal does not continue the snapshot, finishing an interrupted install next_index=%d", ins.reset_log_to)
            self._wal.reset(ins.reset_log_to)
        self._loaded: PersistedState | None = PersistedState(self._hard_state, ins.snapshot, ins.entries)

    @property
    def _snap_dir(self) -> str:
        return os.path.join(self.data_dir, SNAP_DIR)

    @property
    def last_index(self) -> int:
        """Index of the last entry written (durable or not), or the snapshot's if none follow it."""
        return max(self._wal.last_index, self._snap_index)

    def load(self) -> PersistedState:
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            return state
        ins = inspect(self.data_dir)
        if ins.problems:
            raise ins.problems[0]
        return PersistedState(ins.hard_state or HardState(), ins.snapshot, ins.entries)

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        if entries[0].index <= self._snap_index:
            raise ValueError(f"append at {entries[0].index}, at or below the snapshot index {self._snap_index}")
        self._term_first(entries[-1].term)
        self._wal.append(entries)

    def set_hard_state(self, hard_state: HardState) -> None:
        self._pending = None if hard_state == self._hard_state else hard_state

    def install_snapshot(self, snapshot: Snapshot) -> None:
        self._term_first(snapshot.meta.term)
        with _io("snapshot write"):
            snapshot = snapshots.write(self._snap_dir, snapshot, self._fsync, self._write)
        self._wal.reset(snapshot.meta.index + 1)
        self._snap_index = snapshot.meta.index
        snapshots.prune(self._snap_dir)

    def compact(self, snapshot: Snapshot) -> None:
        """Keep the snapshot; drop log segments the older kept snapshot no longer needs.

        Segments are kept back to the older of the two kept snapshots, so that if the
        newest one is found damaged on load the log still continues the older one.
        """
        index, term = snapshot.meta.index, snapshot.meta.term
        if not self._snap_index <= index <= self._wal.last_index:
            raise ValueError(f"compact at {index} outside [{self._snap_index}, {self._wal.last_index}]")
        if index >= self._wal.first_index and self._wal.term_at(index) != term:
            raise ValueError(f"snapshot term {term} at {index} disagrees with the log")
        with _io("snapshot write"):
            snapshots.write(self._snap_dir, snapshot, self._fsync, self._write)
        self._snap_index = index
        self._wal.compact(min(snapshots.prune(self._snap_dir)))

    def sync(self) -> None:
        self._wal.sync()
        self._write_hard_state(force=False)

    def _write_hard_state(self, force: bool) -> None:
        pending, stored = self._pending, self._hard_state
        if pending is None or pending == stored:
            self._pending = None
            return
        commit_only = pending.term == stored.term and pending.vote == stored.vote
        if commit_only and not force and self._clock() - self._commit_written < COMMIT_WRITE_INTERVAL_S:
            return  # kept pending: written with the next term/vote change, the interval or close()
        self._store_hard_state(pending)
        self._pending = None
        self._commit_written = self._clock()

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        try:
            if not self._wal.failed:
                self._wal.sync()
                self._write_hard_state(force=True)
        finally:
            self._wal.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _term_first(self, term: int) -> None:
        if term <= self._hard_state.term:
            return
        pending = self._pending
        term, vote = (pending.term, pending.vote) if pending and pending.term >= term else (term, NONE)
        self._store_hard_state(HardState(term, vote, self._hard_state.commit))

    def _store_hard_state(self, hard_state: HardState) -> None:
        with _io("hard state write"):
            hardstate.write(self.data_dir, hard_state, self._fsync, self._write)
        self._hard_state = hard_state


def open_or_exit(data_dir: str, **options) -> DiskStorage:
    """Open the data dir for the daemon, or log one clear line and exit.

    Exit codes: 65 corrupt (EX_DATAERR), 75 locked by another process (EX_TEMPFAIL),
    74 cannot read or write it (EX_IOERR: read-only, disk full, permissions).
    """
    try:
        if not os.path.exists(data_dir):
            finish_reseed(data_dir)  # never start empty, and so free to vote, in the middle of a reseed
        return DiskStorage(data_dir, **options)
    except StorageCorrupt as e:
        log.critical("%s; refusing to start (check with: dtfd verify --data-dir %s)", e, data_dir)
        raise SystemExit(EX_DATAERR) from None
    except DataDirLocked as e:
        log.critical("%s", e)
        raise SystemExit(EX_TEMPFAIL) from None
    except (OSError, StorageFailed) as e:
        log.critical("cannot open data dir %s: %s", data_dir, e)
        raise SystemExit(EX_IOERR) from None


def reseed(data_dir: str, min_term: int = 0) -> dict:
    """Move a (damaged) data dir aside and leave an empty one that rejoins without voting.

    The node may have voted in any term up to the last it knew, so the new dir records that
    term (or `min_term`, the cluster's current term, if higher or if the old hard state is
    unreadable); dtfd then neither votes nor campaigns until it has caught up with a leader
    of a later term. Nothing is deleted: the old dir is kept as DIR.backup-<UTC time>.

    Crash-safe and idempotent: the new dir, marker included, is made durable beside the old
    one as DIR.reseed and swapped in with one atomic rename exchange, so DIR is at every
    instant either the old dir or the new one with its marker, never a dir a node could
    vote from without having a log. Run again after a crash anywhere, it finishes the job.
    """
    data_dir = os.path.abspath(data_dir)
    finished = finish_reseed(data_dir)
    if finished is not None:
        return finished
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no data dir {data_dir}")
    if _reseeded(data_dir):
        return _report(data_dir, _newest_backup(data_dir), None)
    fd = lock(data_dir)  # refuses while a node has it open, and keeps one from opening it until the swap is done
    try:
        try:
            stored = hardstate.read(data_dir)
            old_term = stored.term if stored else None
        except (StorageCorrupt, OSError):
            old_term = None
        if old_term is None and min_term <= 0:
            raise StorageCorrupt(os.path.join(data_dir, hardstate.FILENAME), None, "unreadable: pass the cluster's current term (--term)")
        term = max(old_term or 0, min_term)
        staged = data_dir + RESEED_SUFFIX
        os.makedirs(staged, mode=0o700)
        write_atomically(os.path.join(staged, REJOIN_FILE), f"{term}\n".encode())
        fsync_dir(os.path.dirname(data_dir))
        backup = _backup_name(data_dir)
        if _exchange(data_dir, staged):
            _pause_point("reseed_swapped")
            os.rename(staged, backup)
        else:  # no RENAME_EXCHANGE here: DIR is briefly missing, and a starting dtfd finishes the swap
            os.rename(data_dir, backup)
            _pause_point("reseed_swapped")
            os.rename(staged, data_dir)
        fsync_dir(os.path.dirname(data_dir))
    finally:
        os.close(fd)
    log.warning("data dir reseeded %s", f"data_dir={data_dir} backup={backup} rejoin_term={term}")
    return _report(data_dir, backup, old_term)


def finish_reseed(data_dir: str) -> dict | None:
    """Finish a reseed interrupted between its renames (None if there is none): the job, not the decision, remains."""
    data_dir = os.path.abspath(data_dir)
    staged = data_dir + RESEED_SUFFIX
    try:
        names = set(os.listdir(staged))
    except FileNotFoundError:
        return None
    if not names <= {REJOIN_FILE, REJOIN_FILE + ".tmp"}:  # the old data, exchanged out: keep it as the backup
        backup = _backup_name(data_dir)
        os.rename(staged, backup)
    elif os.path.isdir(data_dir):  # prepared but never swapped in: it holds nothing but a marker
        for name in names:
            os.unlink(os.path.join(staged, name))
        os.rmdir(staged)
        fsync_dir(os.path.dirname(data_dir))
        return None
    elif REJOIN_FILE in names:  # the old dir is already the backup
        backup = _newest_backup(data_dir)
        os.rename(staged, data_dir)
    else:
        raise StorageCorrupt(staged, None, f"an interrupted reseed left no marker and {data_dir} is missing")
    fsync_dir(os.path.dirname(data_dir))
    log.warning("interrupted reseed finished %s", f"data_dir={data_dir} backup={backup}")
    return _report(data_dir, backup, None)


def _reseeded(data_dir: str) -> bool:
    """Only the REJOIN marker (and perhaps what a node writes on opening it, but no log yet)."""
    return os.path.exists(os.path.join(data_dir, REJOIN_FILE)) and not os.path.exists(os.path.join(data_dir, WAL_DIR))


def _report(data_dir: str, backup: str, old_term: int | None) -> dict:
    return {"data_dir": data_dir, "backup": backup, "rejoin_term": rejoin_term(data_dir), "old_term": old_term}


def _backup_name(data_dir: str) -> str:
    base = f"{data_dir}.backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    name, n = base, 0
    while os.path.exists(name):
        n += 1
        name = f"{base}-{n}"
    return name


def _newest_backup(data_dir: str) -> str:
    backups = sorted(glob.glob(glob.escape(data_dir) + ".backup-*"))  # named by time
    return backups[-1] if backups else ""


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the kernel or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _pause_point(name: str) -> None:
    """Test-only: stop this process here (SIGSTOP) when DTF_TEST_PAUSE_AT names the point, so a test can kill it there."""
    if os.environ.get(PAUSE_ENV) == name:
        log.warning("paused at %s (test only)", name)
        os.kill(os.getpid(), signal.SIGSTOP)


def rejoin_term(data_dir: str) -> int:
    """The term a reseeded node must see a leader beyond before it votes; 0 if not reseeded."""
    try:
        return int(open(os.path.join(data_dir, REJOIN_FILE)).read().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        raise StorageCorrupt(os.path.join(data_dir, REJOIN_FILE), None, "not a term number") from None


def clear_rejoin(data_dir: str) -> None:
    unlink_quietly(os.path.join(data_dir, REJOIN_FILE))
    fsync_dir(data_dir)
