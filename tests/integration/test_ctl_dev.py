"""The local cluster and the demo as a newcomer meets them, and dtfctl's screen under a real terminal."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dtfd.devcluster import LocalCluster, write_configs, write_worker_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_runs_a_failover_and_reports_nothing_lost():
    result = subprocess.run([sys.executable, "-m", "dtfd.ctl", "demo"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = " ".join(result.stdout.split())  # rich wraps long lines to the terminal width
    assert re.search(r"\d+ tasks: 0 lost, every result recorded exactly once", out)
    assert re.search(r"leader node\d was killed mid-run and the run finished anyway; recoveryd brought node\d back", out)
    assert re.search(r"node\d │ crash │ restart │ ok", out)  # recoveryd's restart, in the history dtfctl shows
    assert "Run demo: " in out and "strings" in out  # the failing module is listed first among failures
    assert "test_takes_a_while[1.2]" in out  # JUnit rows made it into the summary


def test_dev_up_prints_how_to_connect_and_leaves_no_process_after_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dtfd.ctl", "dev", "up", "--workers", "2", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "120"})
    try:
        seen = ""
        deadline = time.monotonic() + 60
        while "export DTF_TOKEN=" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += proc.stdout.readline()
        children = _descendants(proc.pid)
        assert len(children) >= 5  # 3 nodes and 2 workers
        assert re.search(r"export DTF_CLUSTER=http://127\.0\.0\.1:\d+", seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], alive
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def cluster_with_workers(tmp_path):
    files = write_configs(tmp_path)
    local = LocalCluster(files)
    local.start_all()
    for n in range(2):
        local.start_worker(write_worker_config(files, f"worker{n + 1}"))
    try:
        local.wait_leader()
        yield local
    finally:
        local.stop_all()


def _ctl(cluster: LocalCluster, *args: str) -> list[str]:
    urls = ",".join(f"http://{a}" for a in cluster.files.api.values())
    return [sys.executable, "-m", "dtfd.ctl", "--cluster", urls, f"--token={cluster.files.admin_token}", *args]


def test_submit_wait_exit_code_says_whether_every_task_passed(cluster_with_workers):
    passing = subprocess.run(_ctl(cluster_with_workers, "tasks", "submit", "--wait", "--json", "--", "true"),
                             capture_output=True, text=True, timeout=120)
    assert passing.returncode == 0, passing.stderr
    failing = subprocess.run(_ctl(cluster_with_workers, "tasks", "submit", "--wait", "--", "sh", "-c", "exit 3"),
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1 and "0/1 passed" in failing.stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux (Debian package) is not installed; .ci/run installs it")
def test_status_and_progress_as_a_person_sees_them_in_a_terminal(cluster_with_workers, tmp_path):
    session = f"dtf-{os.getpid()}"
    command = " ".join(_ctl(cluster_with_workers, "tasks", "submit", "--wait", "--run", "screen-run", "--", "sleep", "1"))
    status = " ".join(_ctl(cluster_with_workers, "status"))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", f"{status}; {command}; sleep 30"],
                   check=True, timeout=30, env={**os.environ, "TERM": "xterm-256color"})
    try:
        deadline = time.monotonic() + 90
        screen = ""
        while "Run screen-run: 1/1 passed" not in screen:
            assert time.monotonic() < deadline, screen
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, timeout=30).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], timeout=30)
    assert "Cluster: healthy" in screen and "leader" in screen and "node1" in screen
    assert re.search(r"run screen-run .*1/1", screen)  # the progress bar, completed
