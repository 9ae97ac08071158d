"""Storage failpoints: off unless asked for, a control file a nemesis flips on a running node,
the exit code a broken disk ends dtfd with, and the planted ack-before-fsync bug."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import httpx
import pytest

from dtfd.devcluster import LocalCluster, write_configs
from dtfd.raft.messages import Entry, HardState
from dtfd.storage import failpoints
from dtfd.storage.datadir import DiskStorage, inspect
from dtfd.storage.interface import EX_IOERR
from tests.integration.support import until


def test_without_the_environment_nothing_is_wrapped(tmp_path: Path):
    storage = DiskStorage(str(tmp_path))
    try:
        assert failpoints.io(os.write, os.fdatasync, environ={}) == (os.write, os.fdatasync)
        assert failpoints.storage(storage, environ={}) is storage
    finally:
        storage.close()


def test_the_control_file_fails_the_named_operation_until_it_is_removed(tmp_path: Path):
    control = tmp_path / "failpoints"
    calls: list[str] = []
    write, fsync = failpoints.io(lambda fd, data: calls.append("write") or len(data), lambda fd: calls.append("fsync"), {failpoints.FAILPOINTS_ENV: str(control)})
    assert write(0, b"abc") == 3 and fsync(0) is None
    failpoints.arm(str(control), fsync=errno.EIO)
    assert write(0, b"abc") == 3
    with pytest.raises(OSError) as raised:
        fsync(0)
    assert raised.value.errno == errno.EIO and str(control) in str(raised.value)
    failpoints.arm(str(control), write=errno.ENOSPC)  # replaced: fsync works again
    fsync(0)
    with pytest.raises(OSError, match="No space left"):
        write(0, b"abc")
    failpoints.disarm(str(control))
    assert write(0, b"abc") == 3
    assert calls == ["write", "fsync", "write", "fsync", "write"]


def test_a_bad_control_file_names_its_line():
    assert failpoints.parse("f", "# broken disk\nfsync = EIO\n\nwrite=ENOSPC") == {"fsync": errno.EIO, "write": errno.ENOSPC}
    with pytest.raises(ValueError, match="f line 2: 'read=EIO' is not OP=ERRNO"):
        failpoints.parse("f", "fsync=EIO\nread=EIO")
    with pytest.raises(ValueError, match="line 1"):
        failpoints.parse("f", "fsync=ENOTANERRNO")
    with pytest.raises(ValueError, match="unknown storage operations"):
        failpoints.arm("/nonexistent", read=errno.EIO)


def entries(first: int, count: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, data=b"entry %d" % i) for i in range(first, first + count)]


def test_ack_before_fsync_holds_writes_in_memory_for_its_delay(tmp_path: Path):
    storage = failpoints.storage(DiskStorage(str(tmp_path)), {failpoints.ACK_BEFORE_FSYNC_ENV: "200"})
    try:
        storage.append(entries(1, 3))
        storage.set_hard_state(HardState(1, "", 3))
        storage.sync()  # returns at once: the planted bug
        assert inspect(str(tmp_path)).wal.entries == []  # a kill -9 now loses all three
        until(lambda: len(inspect(str(tmp_path)).wal.entries) == 3, timeout=10, what="the delayed write")
        storage.append(entries(4, 2))
        storage.sync()
    finally:
        storage.close()  # a clean stop writes what is still held
    assert [e.index for e in inspect(str(tmp_path)).wal.entries] == [1, 2, 3, 4, 5]


# ---- a running dtfd --------------------------------------------------------------------


def put(client: httpx.Client, key: str, seq: int) -> httpx.Response:
    return client.put(f"/v1/kv/{key}", json={"value": f"v{seq}", "client": "t", "seq": seq})


@pytest.mark.integration
@pytest.mark.parametrize("fault", [{"fsync": errno.EIO}, {"write": errno.ENOSPC}], ids=["fsync-eio", "write-enospc"])
def test_a_broken_disk_stops_dtfd_with_exit_74_and_a_restart_keeps_every_acknowledged_write(tmp_path: Path, fault: dict[str, int]):
    files = write_configs(tmp_path, nodes=1)
    control = tmp_path / "failpoints"
    cluster = LocalCluster(files, env={failpoints.FAILPOINTS_ENV: str(control)})
    cluster.start("node1")
    try:
        cluster.wait_leader(30)
        with cluster.client("node1") as client:
            acknowledged = [seq for seq in range(1, 21) if put(client, f"k{seq}", seq).status_code == 200]
            assert len(acknowledged) == 20
            failpoints.arm(str(control), **fault)
            try:
                answer = put(client, "after", 99)
                assert answer.status_code >= 500, "a write the disk refused was acknowledged"
            except httpx.TransportError:
                pass  # the node went down while answering
        code = cluster.procs["node1"].wait(timeout=30)
        log = (tmp_path / "node1.log").read_text()
        assert code == EX_IOERR, log
        assert "storage failed, stopped" in log and "Traceback" not in log, log
        failpoints.disarm(str(control))
        cluster.start("node1")
        cluster.wait_leader(30)
        with cluster.client("node1") as client:
            assert all(client.get(f"/v1/kv/k{seq}").json()["value"] == f"v{seq}" for seq in acknowledged)
    finally:
        cluster.stop_all()


@pytest.mark.integration
def test_a_bad_planted_bug_setting_is_a_configuration_error(tmp_path: Path):
    files = write_configs(tmp_path, nodes=1)
    cluster = LocalCluster(files, env={failpoints.ACK_BEFORE_FSYNC_ENV: "soon"})
    code = cluster.start("node1").wait(timeout=30)
    log = (tmp_path / "node1.log").read_text()
    assert code == 78 and f"{failpoints.ACK_BEFORE_FSYNC_ENV}='soon'" in log and "Traceback" not in log, log
