"""Crash consistency and damage on real files: kill -9, bit flips, truncation, locks, full disks."""

from __future__ import annotations

import errno
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from dtfd.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dtfd.storage.datadir import DataDirLocked, DiskStorage, inspect
from dtfd.storage.interface import EX_DATAERR, EX_IOERR, EX_TEMPFAIL, StorageCorrupt, StorageFailed
from dtfd.storage.verify import run as verify
from dtfd.storage.wal import list_segments, scan
from tests.integration.storage_child import SEGMENT_SIZE, payload, snapshot_data

CHILD = str(Path(__file__).with_name("storage_child.py"))
ROOT = str(Path(__file__).parents[2])
ITERATIONS = int(os.environ.get("DTF_CRASH_ITERATIONS", "200"))


def spawn(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(
        [sys.executable, CHILD, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )


class Lines:
    """Lines from a child's stdout, each read under a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd, self.buf = proc.stdout.fileno(), b""

    def next(self, timeout: float = 10.0) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "child said nothing before the deadline"
            if not select.select([self.fd], [], [], left)[0]:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class Model:
    """What the child reported: entries known durable, and the write in flight when it died."""

    def __init__(self) -> None:
        self.durable: dict[int, int] = {}  # index -> term
        self.pending: tuple[int, int, int] | None = None
        self.snap_index = 0
        self.synced_batches = 0

    def apply(self, line: str) -> None:
        word, *nums = line.split()
        args = list(map(int, nums))
        if word == "append":
            self.pending = (args[0], args[1], args[2])
        elif word == "synced":
            first, last, term = args
            self.durable = {i: t for i, t in self.durable.items() if i < first}
            self.durable.update((i, term) for i in range(first, last + 1))
            self.pending = None
            self.synced_batches += 1
        elif word == "compacted":
            self.snap_index = args[0]

    def check(self, storage: DiskStorage) -> None:
        state = storage.load()
        snap = state.snapshot.meta.index if state.snapshot else 0
        if state.snapshot:
            assert snap >= self.snap_index and state.snapshot.data == snapshot_data(snap)
        loaded = {e.index: e for e in state.entries}
        assert list(loaded) == list(range(snap + 1, snap + 1 + len(loaded))), "hole in the loaded log"
        replaced_from = self.pending[0] if self.pending else None
        for index, term in self.durable.items():
            if index <= snap or (replaced_from is not None and index >= replaced_from):
                continue
            assert index in loaded, f"durable entry {index} lost"
            assert loaded[index].term == term
        allowed_terms = {self.pending[2]} if self.pending else set()
        for index, e in loaded.items():
            assert e.term == self.durable.get(index) or e.term in allowed_terms, f"entry {index} term {e.term}"
            assert e.data == payload(index, e.term), f"entry {index} bytes differ"
        assert state.hard_state.commit <= max(loaded, default=snap)
        # The next child resumes from this state: written-but-unsynced entries that survived are its base.
        self.durable = {i: e.term for i, e in loaded.items()}
        self.pending, self.snap_index = None, snap


@pytest.mark.integration
def test_kill_9_never_loses_a_synced_entry(tmp_path):
    data_dir = str(tmp_path / "data")
    rng = random.Random(20240601)
    model = Model()
    for iteration in range(ITERATIONS):
        proc = spawn("run", data_dir, str(iteration))
        lines = Lines(proc)
        ready = lines.next()
        assert ready and ready.startswith("ready"), proc.stderr.read().decode()
        for _ in range(rng.randint(0, 20)):
            line = lines.next()
            assert line is not None, proc.stderr.read().decode()
            model.apply(line)
        time.sleep(rng.random() * 0.003)
        proc.send_signal(signal.SIGKILL)
        while (line := lines.next()) is not None:
            model.apply(line)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
        storage = DiskStorage(data_dir, segment_size=SEGMENT_SIZE)
        try:
            model.check(storage)
        finally:
            storage.close()
    assert model.synced_batches > ITERATIONS


def flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    """A data dir with hard state, one snapshot and three segments, and what it holds."""
    path = tmp_path_factory.mktemp("pristine") / "data"
    storage = DiskStorage(str(path), segment_size=600)
    storage.set_hard_state(HardState(2, "n1", 20))
    entries = [Entry(1 + (i > 15), i, data=payload(i, 1 + (i > 15))) for i in range(1, 41)]
    for i in range(0, 40, 4):
        storage.append(entries[i : i + 4])
    while not scan(str(path / "wal")).segments[-1].offsets:  # the final record must be in the last segment
        storage.append([Entry(2, storage.last_index + 1, data=b"tail")])
    storage.sync()
    storage.compact(Snapshot(SnapshotMeta(12, 1, ConfState(("n1",))), snapshot_data(12)))
    storage.close()
    expected = DiskStorage(str(path)).load()
    last_segment = list_segments(str(path / "wal"))[0][-1][2]
    final_record = scan(str(path / "wal")).segments[-1].offsets[-1]
    return path, {"state": expected, "last_segment": last_segment, "final_record": final_record}


def regions(path: Path) -> list[tuple[Path, int, int]]:
    """(file, start, end) byte ranges to flip in: every file, segment headers and records apart."""
    found = [(path / "hardstate", 0, (path / "hardstate").stat().st_size)]
    for snap in (path / "snap").iterdir():
        found.append((snap, 0, snap.stat().st_size))
    for seg in scan(str(path / "wal")).segments:
        found.append((Path(seg.path), 0, 28))
        found.append((Path(seg.path), 28, seg.size))
    return found


@pytest.mark.parametrize("seed", range(12))
def test_bit_flips_are_repaired_as_torn_tail_or_reported(tmp_path, pristine, seed):
    clean, facts = pristine
    expected = facts["state"]
    rng = random.Random(seed)
    for region_file, start, end in regions(clean):
        for _ in range(6):
            work = tmp_path / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(clean, work)
            target = work / region_file.relative_to(clean)
            offset = rng.randrange(start, end)
            flip(target, offset, rng.randrange(8))
            code = verify(str(work), as_json=True)
            try:
                state = DiskStorage(str(work)).load()
            except StorageCorrupt:
                assert code == EX_DATAERR
                continue
            assert code == 0
            in_final = str(region_file) == facts["last_segment"] and offset >= facts["final_record"]
            assert in_final, f"flip in {region_file} at {offset} accepted silently"
            assert state.entries == expected.entries[:-1] and state.snapshot == expected.snapshot


@pytest.mark.parametrize("victim", ["hardstate", "snapshot", "first-segment", "middle-segment", "last-segment"])
def test_truncated_files(tmp_path, pristine, victim):
    clean, facts = pristine
    work = tmp_path / "work"
    shutil.copytree(clean, work)
    segments = sorted((work / "wal").iterdir())
    target = {
        "hardstate": work / "hardstate",
        "snapshot": next((work / "snap").iterdir()),
        "first-segment": segments[0],
        "middle-segment": segments[1],
        "last-segment": segments[-1],
    }[victim]
    os.truncate(target, target.stat().st_size - 7)
    if victim == "last-segment":
        assert verify(str(work)) == 0
        assert DiskStorage(str(work)).load().entries == facts["state"].entries[:-1]
    else:
        assert verify(str(work)) == EX_DATAERR
        with pytest.raises(StorageCorrupt):
            DiskStorage(str(work))


def test_zero_filled_tail_is_truncated(tmp_path, pristine):
    clean, facts = pristine
    work = tmp_path / "work"
    shutil.copytree(clean, work)
    last = sorted((work / "wal").iterdir())[-1]
    with open(last, "ab") as f:
        f.write(bytes(4096))
    assert verify(str(work)) == 0
    assert DiskStorage(str(work)).load() == facts["state"]
    assert scan(str(work / "wal")).torn is None


def daemon_open(data_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, CHILD, "open", data_dir],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT},
    )


def assert_one_clear_line(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


@pytest.mark.integration
def test_deleted_middle_segment_stops_the_daemon_with_exit_65(tmp_path, pristine):
    clean, _ = pristine
    work = tmp_path / "work"
    shutil.copytree(clean, work)
    os.unlink(sorted((work / "wal").iterdir())[1])
    assert_one_clear_line(daemon_open(str(work)), EX_DATAERR, "missing segment")


@pytest.mark.integration
def test_missing_hard_state_stops_the_daemon_with_exit_65(tmp_path, pristine):
    clean, _ = pristine
    work = tmp_path / "work"
    shutil.copytree(clean, work)
    os.unlink(work / "hardstate")
    assert_one_clear_line(daemon_open(str(work)), EX_DATAERR, "hard state file missing")


@pytest.mark.integration
def test_second_process_on_the_same_dir_is_refused(tmp_path):
    data_dir = str(tmp_path / "data")
    holder = spawn("hold", data_dir, stdin=subprocess.PIPE)
    try:
        assert Lines(holder).next() == "opened"
        assert_one_clear_line(daemon_open(data_dir), EX_TEMPFAIL, "in use by another process")
        with pytest.raises(DataDirLocked):
            DiskStorage(data_dir)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0
    assert daemon_open(data_dir).returncode == 0


@contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (needs root); skips the test where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.integration
def test_read_only_data_dir_is_a_clear_error(tmp_path, pristine):
    clean, facts = pristine
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        shutil.copytree(clean, mnt / "data")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert_one_clear_line(daemon_open(str(mnt / "data")), EX_IOERR, "Read-only file system")
        assert verify(str(mnt / "data")) == 0  # verify only reads


@pytest.mark.integration
def test_full_disk_stops_the_writer_and_keeps_every_synced_entry(tmp_path):
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        data_dir = str(mnt / "data")
        proc = spawn("run", data_dir, "7")
        model = Model()
        lines = Lines(proc)
        assert lines.next().startswith("ready")
        while (line := lines.next(timeout=60)) is not None:
            model.apply(line)
        assert proc.wait(timeout=10) == EX_IOERR
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr and "No space left on device" in stderr.strip().splitlines()[-1]
        ins = inspect(data_dir)
        assert not ins.problems and ins.wal.torn is None
        storage = DiskStorage(data_dir, segment_size=SEGMENT_SIZE)
        model.check(storage)
        storage.close()


def _no_space_after(budget: int):
    left = [budget]

    def write(fd: int, data) -> int:
        if left[0] < len(data):
            n = os.write(fd, bytes(data[: max(left[0], 0)])) if left[0] > 0 else 0
            left[0] = 0
            if n:
                return n
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
        return os.write(fd, data)

    return write


@pytest.mark.parametrize("budget", [0, 100, 700, 1500, 2900])
def test_write_failure_hook_leaves_the_last_synced_state(tmp_path, budget):
    """Disk full at every stage (segment creation, records, hard state, snapshot) via an injected write."""
    data_dir = str(tmp_path / "data")
    DiskStorage(data_dir).close()
    storage = DiskStorage(data_dir, segment_size=1024, write=_no_space_after(budget))
    synced: list[Entry] = []
    with pytest.raises(StorageFailed, match="No space left on device"):
        for i in range(1, 1000):
            entry = Entry(1, i, data=payload(i, 1))
            storage.set_hard_state(HardState(1, "n1", i - 1))
            storage.append([entry])
            storage.sync()
            synced.append(entry)
            if i % 5 == 0:
                storage.compact(Snapshot(SnapshotMeta(i - 2, 1, ConfState(("n1",))), snapshot_data(i - 2)))
    ins = inspect(data_dir)
    assert not ins.problems and ins.wal.torn is None and not ins.leftovers
    with suppress(StorageFailed):
        storage.close()  # may fail again writing the pending hard state; the lock is released anyway
    state = DiskStorage(data_dir).load()
    snap = state.snapshot.meta.index if state.snapshot else 0
    assert [e for e in synced if e.index > snap] == list(state.entries)[: len([e for e in synced if e.index > snap])]
