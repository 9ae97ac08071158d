"""The runner against real subprocesses: statuses, process groups, output cap, env, usage, JUnit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import trio

from dtfd.worker.runner import Settings, TaskRun, TaskSpec, Usage, process_tree

pytestmark = pytest.mark.integration
PY = sys.executable


def _run(tmp_path: Path, argv: list[str], **spec: object) -> TaskRun:
    settings = Settings(work_dir=tmp_path / "work", output_cap_bytes=spec.pop("cap", 4096), kill_grace_s=spec.pop("grace", 2.0))
    return TaskRun("t1", "l1", 1, TaskSpec(argv=argv, **spec), settings)


async def test_exit_zero_succeeds_and_nonzero_fails(tmp_path):
    ok = await _run(tmp_path, [PY, "-c", "print('hello')"]).run()
    assert (ok.status, ok.exit_code, ok.output_tail, ok.truncated) == ("succeeded", 0, "hello\n", False)
    assert ok.duration_s > 0 and ok.task_id == "t1" and ok.lease_id == "l1"
    bad = await _run(tmp_path, [PY, "-c", "import sys; sys.exit(3)"]).run()
    assert (bad.status, bad.exit_code) == ("failed", 3)


async def test_stdout_and_stderr_are_interleaved(tmp_path):
    script = "import sys\nfor n in range(3):\n    print(f'out{n}', flush=True); print(f'err{n}', file=sys.stderr, flush=True)"
    result = await _run(tmp_path, [PY, "-c", script]).run()
    assert result.output_tail.split() == ["out0", "err0", "out1", "err1", "out2", "err2"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_timeout_kills_the_whole_process_group(tmp_path):
    """A child ignoring SIGTERM spawns a sleeping grandchild: both must be gone, within the grace."""
    pids = tmp_path / "pids"
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"g = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    run = _run(tmp_path, [PY, "-c", script], timeout_s=1.5, grace=0.5)
    with trio.fail_after(20):
        result = await run.run()
    assert result.status == "timed_out" and "timed out after 1.5s" in result.reason
    assert result.exit_code == -9 and "ready" in result.output_tail
    child, grandchild = map(int, pids.read_text().split())
    assert _gone(child) and _gone(grandchild)


async def test_stragglers_left_by_a_finished_task_are_ended(tmp_path):
    pid_file = tmp_path / "pid"
    script = f"import subprocess; p = subprocess.Popen(['sleep', '300']); open({str(pid_file)!r}, 'w').write(str(p.pid))"
    with trio.fail_after(20):
        result = await _run(tmp_path, [PY, "-c", script]).run()
    assert result.status == "succeeded"
    assert _gone(int(pid_file.read_text()))


async def test_stop_ends_a_running_task_with_the_given_status(tmp_path):
    run = _run(tmp_path, ["sleep", "300"])
    async with trio.open_nursery() as nursery:
        results = []

        async def go() -> None:
            results.append(await run.run())

        nursery.start_soon(go)
        with trio.fail_after(10):
            while not any(p.name() == "sleep" for p in psutil.Process().children()):
                await trio.sleep(0.02)
        run.stop("cancelled", "cancelled by the coordinator")
    assert (results[0].status, results[0].reason) == ("cancelled", "cancelled by the coordinator")
    assert results[0].exit_code == -15


async def test_stop_before_start_never_runs_the_command(tmp_path):
    run = _run(tmp_path, [PY, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])
    run.stop("cancelled", "worker shutdown")
    result = await run.run()
    assert (result.status, result.reason, result.exit_code) == ("cancelled", "worker shutdown", None)
    assert not (tmp_path / "ran").exists()


async def test_output_cap_keeps_the_tail_and_says_it_truncated(tmp_path):
    script = "import sys\nfor n in range(2000):\n    print(f'line {n:05d}')"
    result = await _run(tmp_path, [PY, "-c", script], cap=1024).run()
    assert result.truncated
    assert result.output_tail.startswith("[dtf-worker: output truncated, the first ")
    assert result.output_tail.endswith("line 01999\n")
    assert "line 00000" not in result.output_tail
    body = result.output_tail.split("\n", 1)[1]
    assert len(body.encode()) == 1024


async def test_env_is_merged_over_a_minimal_base_and_cwd_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKER_SECRET", "do-not-leak")
    (tmp_path / "work" / "checkout").mkdir(parents=True)
    script = "import os; print(os.getcwd()); print(os.environ.get('WORKER_SECRET')); print(os.environ['K']); print(os.environ['DTF_TASK_ID'])"
    result = await _run(tmp_path, [PY, "-c", script], env={"K": "V"}, cwd="checkout").run()
    assert result.output_tail.split() == [str(tmp_path / "work" / "checkout"), "None", "V", "t1"]


async def test_a_task_env_cannot_override_what_the_worker_sets(tmp_path):
    script = "import os; print(os.environ['DTF_LEASE_ID'], os.environ['DTF_TASK_ID'], os.environ['DTF_ATTEMPT'])"
    forged = {"DTF_LEASE_ID": "someone-elses", "DTF_TASK_ID": "t9", "DTF_ATTEMPT": "7"}
    result = await _run(tmp_path, [PY, "-c", script], env=forged).run()
    assert result.output_tail.split() == ["l1", "t1", "1"]


async def test_empty_cwd_is_a_fresh_directory_removed_afterwards(tmp_path):
    for script in ("import os; open('f', 'w'); os.mkdir('d'); open('d/g', 'w'); print(os.getcwd())", "import os; print(os.getcwd())"):
        result = await _run(tmp_path, [PY, "-c", script]).run()
        cwd = Path(result.output_tail.strip())
        assert cwd.parent == tmp_path / "work" and cwd.name.startswith("task-t1-")
        assert not cwd.exists()


async def test_missing_cwd_is_an_error(tmp_path):
    result = await _run(tmp_path, ["true"], cwd="nope").run()
    assert result.status == "error" and "nope" in result.reason


async def test_shell_only_when_asked(tmp_path):
    plain = await _run(tmp_path, ["echo", "$HOME", "|", "x"]).run()
    assert plain.output_tail == "$HOME | x\n"
    shell = await _run(tmp_path, ["echo a && echo b"], shell=True).run()
    assert (shell.status, shell.output_tail) == ("succeeded", "a\nb\n")
    refused = await _run(tmp_path, ["echo", "a"], shell=True).run()
    assert refused.status == "error" and "exactly one string" in refused.reason


async def test_command_not_found_is_an_error_not_a_crash(tmp_path):
    result = await _run(tmp_path, ["/nonexistent/dtf-test-command", "-x"]).run()
    assert result.status == "error" and result.exit_code is None
    assert "cannot run '/nonexistent/dtf-test-command'" in result.reason and "No such file" in result.reason


async def test_peak_rss_and_cpu_time_cover_the_process_tree(tmp_path):
    """The allocating, computing process is a child of the task's root: the tree is measured."""
    work = "x = bytearray(150 << 20); import time; t = time.process_time()\nwhile time.process_time() - t < 0.8: pass"
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {work!r}], check=True)"
    result = await _run(tmp_path, [PY, "-c", script]).run()
    assert result.status == "succeeded"
    assert result.peak_rss_bytes > 150 << 20
    assert result.cpu_s > 0.3


async def test_a_task_shorter_than_one_sample_is_measured_at_reaping(tmp_path):
    """No psutil sample is taken within the first interval: wait4's rusage covers the task and the child it waited for."""
    work = "x = bytearray(80 << 20); import time; t = time.process_time()\nwhile time.process_time() - t < 0.1: pass"
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {work!r}], check=True)"
    run = _run(tmp_path, [PY, "-c", script])
    run.settings = msgspec.structs.replace(run.settings, sample_interval_s=3600.0)
    result = await run.run()
    assert result.status == "succeeded"
    assert result.peak_rss_bytes > 80 << 20
    assert result.cpu_s > 0.1


JUNIT = """<?xml version="1.0"?>
<testsuites><testsuite name="s">
  <testcase classname="a.B" name="ok" time="0.25"/>
  <testcase classname="a.B" name="bad" time="1.5"><failure message="assert 1 == 2">trace</failure></testcase>
  <testcase classname="a.B" name="boom" time="0.1"><error message="RuntimeError"/></testcase>
  <testcase classname="a.B" name="later" time="0"><skipped message="not today"/></testcase>
</testsuite></testsuites>
"""


async def test_junit_report_is_parsed_into_the_result(tmp_path):
    script = f"open('report.xml', 'w').write({JUNIT!r}); raise SystemExit(1)"
    result = await _run(tmp_path, [PY, "-c", script], junit="report.xml").run()
    assert result.status == "failed" and result.reason == ""
    assert [(c.name, c.status, c.duration_s, c.message) for c in result.junit] == [
        ("ok", "passed", 0.25, ""),
        ("bad", "failed", 1.5, "assert 1 == 2"),
        ("boom", "error", 0.1, "RuntimeError"),
        ("later", "skipped", 0.0, "not today"),
    ]


async def test_unusable_junit_report_is_a_reason_not_a_crash(tmp_path):
    laughs = '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><testsuite>&b;</testsuite>'
    script = f"open('report.xml', 'w').write({laughs!r})"
    result = await _run(tmp_path, [PY, "-c", script], junit="report.xml").run()
    assert result.status == "succeeded" and result.junit == []
    assert "junit: refused unsafe XML" in result.reason
    missing = await _run(tmp_path, ["true"], junit="report.xml").run()
    assert missing.reason == "junit: report.xml was not written"


def test_a_result_too_large_for_the_coordinator_is_shrunk_not_dropped():
    from dtfd.state.tasks import JUnitCase
    from dtfd.worker.agent import SHRUNK_JUNIT_CASES, SHRUNK_OUTPUT_BYTES, shrink
    from dtfd.worker.runner import Result

    cases = [JUnitCase(f"t{n}", "c", "passed", 0.1) for n in range(1000)] + [JUnitCase("broken", "c", "failed", 0.1, "boom")]
    big = Result(task_id="t", lease_id="l", status="failed", exit_code=1, output_tail="x" * 100_000 + "END", junit=cases)
    small = shrink(big)
    assert small is not None and small.status == "failed" and small.exit_code == 1
    assert small.output_tail.endswith("END") and len(small.output_tail) == SHRUNK_OUTPUT_BYTES and small.truncated
    assert len(small.junit) == SHRUNK_JUNIT_CASES and small.junit[0].name == "broken"  # failures kept first
    assert "shrunk" in small.reason
    assert shrink(small) is None  # already minimal: the caller drops it rather than loop


async def test_a_task_sees_neither_the_workers_environment_nor_its_token(tmp_path, monkeypatch):
    """A test command must not read the worker's credentials, even if it asks for them by name."""
    monkeypatch.setenv("DTF_TOKEN", "worker-secret-token-0000")
    monkeypatch.setenv("SOME_WORKER_SETTING", "x")
    script = "import os; print(sorted(k for k in os.environ if k in ('DTF_TOKEN', 'SOME_WORKER_SETTING', 'MINE')))"
    result = await _run(tmp_path, [PY, "-c", script], env={"MINE": "1"}).run()
    assert result.output_tail.strip() == "['MINE']"


async def test_output_cap_holds_against_a_task_printing_a_gigabyte(tmp_path):
    """A runaway task cannot fill the worker's memory or the result: only the tail is kept."""
    script = "import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)\nsys.stdout.buffer.write(b'END')"
    with trio.fail_after(120):
        result = await _run(tmp_path, [PY, "-c", script], cap=4096).run()
    assert result.status == "succeeded" and result.truncated
    assert len(result.output_tail.encode()) <= 4096 + 200 and result.output_tail.endswith("END")


def test_process_tree_walks_only_the_tree_and_finds_grandchildren():
    shell = subprocess.Popen(["sh", "-c", "sh -c 'sleep 30' & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(shell.pid).children(recursive=True)) < 3:
            assert time.monotonic() < deadline, "the shell never started its children"
            time.sleep(0.02)
        expected = {shell.pid, *(child.pid for child in psutil.Process(shell.pid).children(recursive=True))}
        assert set(process_tree(shell.pid)) == expected
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def test_a_sample_reads_what_psutil_reads_even_for_odd_command_names(tmp_path):
    odd = tmp_path / "a) (b c"
    shutil.copy("/bin/sleep", odd)
    shell = subprocess.Popen(["sh", "-c", f"'{odd}' 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(shell.pid).children(recursive=True)) < 2:
            assert time.monotonic() < deadline, "the shell never started its children"
            time.sleep(0.02)
        time.sleep(0.3)  # done exec'ing: their memory holds still
        tree = [psutil.Process(pid) for pid in process_tree(shell.pid)]
        usage = Usage()
        usage.sample(shell.pid)
        expected = sum(process.memory_info().rss for process in tree)
        assert abs(usage.peak_rss_bytes - expected) < expected / 50  # /proc/PID/stat's rss was 10% off
        assert usage.cpu_s == pytest.approx(sum(sum(process.cpu_times()) for process in tree), abs=0.05)
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
