"""The result spool: what a restarted worker still owes, after appends, a torn line, compaction, an older spool."""

from __future__ import annotations

import msgspec

from dtfd.worker import spool as spool_module
from dtfd.worker.runner import Result
from dtfd.worker.spool import Spool


def result(n: int, output: str = "") -> Result:
    return Result(task_id=f"t{n}", lease_id=f"L{n}", status="succeeded", exit_code=0, output_tail=output)


def test_owed_results_survive_a_restart_and_done_ones_do_not(tmp_path):
    path = tmp_path / "work" / "results-w1.jsonl"
    spool = Spool(path)
    assert spool.load() == [] and path.read_bytes() == b""
    for n in range(3):
        spool.add(result(n))
    spool.done(["L1", "unknown"])
    spool.add(result(2, "shrunk"))  # a later line for a lease replaces the earlier one
    # no close(): a killed worker does not close its file
    assert Spool(path).load() == [result(0), result(2, "shrunk")]
    assert len(path.read_bytes().splitlines()) == 2  # load rewrote it with only the owed results


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "results-w1.jsonl"
    spool = Spool(path)
    spool.load()
    spool.add(result(0))
    spool.add(result(1))
    spool.close()
    path.write_bytes(path.read_bytes()[:-20])  # killed in the middle of the second write
    assert Spool(path).load() == [result(0)]


def test_the_file_is_compacted_once_mostly_done(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "COMPACT_BYTES", 4096)
    path = tmp_path / "results-w1.jsonl"
    spool = Spool(path)
    spool.load()
    sizes = []
    for n in range(200):
        spool.add(result(n, "x" * 100))
        if n:
            spool.done([f"L{n - 1}"])
        sizes.append(path.stat().st_size)
    assert max(sizes) < 2 * 4096 + 1024  # never far above the threshold
    assert Spool(path).load() == [result(199, "x" * 100)]


def test_an_older_workers_spool_is_taken_over(tmp_path):
    legacy = tmp_path / "results-w1.json"
    legacy.write_bytes(msgspec.json.encode([result(0), result(1)]))
    path = tmp_path / "results-w1.jsonl"
    spool = Spool(path, legacy=legacy)
    assert spool.load() == [result(0), result(1)]
    assert not legacy.exists()
    spool.done(["L0"])
    assert Spool(path, legacy=legacy).load() == [result(1)]


def test_an_unwritable_spool_is_reported_and_the_worker_goes_on(tmp_path, caplog):
    blocker = tmp_path / "work"
    blocker.write_text("a file where the work dir should be")
    spool = Spool(blocker / "results-w1.jsonl")
    assert spool.load() == []
    spool.add(result(0))
    spool.done(["L0"])
    assert "cannot write the result spool" in caplog.text
