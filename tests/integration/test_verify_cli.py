"""`dtfd verify` through the installed console script: exit codes, report, and no writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtfd.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dtfd.storage.datadir import DiskStorage
from dtfd.storage.interface import EX_DATAERR, EX_NOINPUT
from dtfd.storage.wal import scan

DTFD = str(Path(sys.executable).with_name("dtfd"))
pytestmark = pytest.mark.integration


def dtfd_verify(data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([DTFD, "verify", "--data-dir", str(data_dir), *flags], capture_output=True, text=True, timeout=60)


def fingerprint(data_dir: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    storage = DiskStorage(str(path), segment_size=1024)
    storage.set_hard_state(HardState(3, "n2", 30))
    for first in range(1, 61, 5):
        storage.append([Entry(3, i, data=b"%d" % i * 40) for i in range(first, first + 5)])
    storage.sync()
    storage.compact(Snapshot(SnapshotMeta(25, 3, ConfState(("n1", "n2", "n3"))), b"image"))
    storage.close()
    return path


def test_clean_dir_exits_0_with_a_human_report(data_dir):
    result = dtfd_verify(data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hard state: term=3 vote=n2 commit=30" in result.stdout
    assert "snap-0000000000000019-0000000000000003.snap index=25 term=3" in result.stdout
    assert result.stdout.rstrip().endswith("result: ok")


def test_json_report_is_stable(data_dir):
    result = dtfd_verify(data_dir, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["status"] == "ok" and report["exit_code"] == 0
    assert set(report) == {
        "data_dir", "status", "exit_code", "locked", "hard_state", "snapshots", "segments", "log", "warnings", "problems"
    }
    assert report["hard_state"] == {"term": 3, "vote": "n2", "commit": 30}
    assert [s["index"] for s in report["snapshots"]] == [25] and report["snapshots"][0]["ok"]
    assert report["log"]["last_index"] == 60 and report["log"]["after_snapshot"] == 35
    segs = report["segments"]
    assert all(b["first_index"] == a["last_index"] + 1 for a, b in zip(segs, segs[1:]))
    assert report["warnings"] == [] and report["problems"] == []


def test_torn_tail_is_a_warning_and_nothing_is_modified(data_dir):
    last = sorted((data_dir / "wal").iterdir())[-1]
    with open(last, "ab") as f:
        f.write(b"\x07\x00\x00\x00\x01\x00")  # half a record header
    before = fingerprint(data_dir)
    result = dtfd_verify(data_dir, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert [w["path"] for w in report["warnings"]] == [str(last)]
    assert "torn tail, would be truncated" in report["warnings"][0]["problem"]
    assert report["warnings"][0]["offset"] == last.stat().st_size - 6
    assert fingerprint(data_dir) == before
    assert "warning: " in dtfd_verify(data_dir).stdout


def test_corruption_exits_65_naming_file_and_offset(data_dir):
    segments = scan(str(data_dir / "wal")).segments
    victim = segments[0]
    offset = victim.offsets[1] + 30
    data = bytearray(Path(victim.path).read_bytes())
    data[offset] ^= 0x04
    Path(victim.path).write_bytes(data)
    before = fingerprint(data_dir)
    result = dtfd_verify(data_dir, "--json")
    assert result.returncode == EX_DATAERR
    report = json.loads(result.stdout)
    assert report["status"] == "corrupt"
    assert report["problems"] == [{"path": victim.path, "offset": victim.offsets[1], "problem": "record crc mismatch"}]
    human = dtfd_verify(data_dir)
    assert human.returncode == EX_DATAERR
    assert f"CORRUPT: {victim.path} at offset {victim.offsets[1]}: record crc mismatch" in human.stdout
    assert fingerprint(data_dir) == before


def test_missing_hard_state_exits_65(data_dir):
    os.unlink(data_dir / "hardstate")
    result = dtfd_verify(data_dir)
    assert result.returncode == EX_DATAERR and "hard state file missing" in result.stdout


def test_no_data_dir_exits_66(tmp_path):
    result = dtfd_verify(tmp_path / "absent", "--json")
    assert result.returncode == EX_NOINPUT
    assert json.loads(result.stdout)["status"] == "missing"
    assert dtfd_verify(tmp_path / "absent").returncode == EX_NOINPUT


def test_reports_a_dir_in_use(data_dir):
    storage = DiskStorage(str(data_dir))
    try:
        report = json.loads(dtfd_verify(data_dir, "--json").stdout)
    finally:
        storage.close()
    assert report["locked"] is True
