"""What systemd and operators see of one dtfd process: notifications, exit codes, metrics, peers."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dtfd.devcluster import LocalCluster, write_configs

pytestmark = pytest.mark.integration


def _receive_until(sock: socket.socket, wanted: str, seen: list[str], since: int = 0, timeout: float = 20) -> int:
    """Collect notifications into `seen` until one after position `since` contains `wanted`; its position."""
    deadline = time.monotonic() + timeout
    while True:
        found = [i for i, message in enumerate(seen) if i >= since and wanted in message]
        if found:
            return found[0]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {wanted!r} among {seen}") from None


def test_sd_notify_sequence_ready_status_watchdog_reload_stopping(tmp_path):
    files = write_configs(tmp_path / "c", nodes=1)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    cluster = LocalCluster(files)
    proc = cluster.start("node1", {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    seen: list[str] = []
    try:
        _receive_until(sock, "READY=1", seen)
        _receive_until(sock, "STATUS=", seen)
        _receive_until(sock, "WATCHDOG=1", seen)
        _receive_until(sock, "STATUS=leader", seen)
        proc.send_signal(signal.SIGHUP)
        reload_at = _receive_until(sock, "RELOADING=1", seen)
        assert "MONOTONIC_USEC=" in seen[reload_at]
        ready_again = _receive_until(sock, "READY=1", seen, since=reload_at + 1)
        proc.terminate()
        stopping = _receive_until(sock, "STOPPING=1", seen, since=ready_again)
        assert proc.wait(timeout=15) == 0
    finally:
        cluster.stop_all()
        sock.close()
    assert seen.index("READY=1") < reload_at < ready_again < stopping


def _run_dtfd(config: str, node: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtfd.cli", "--config", config, "--node", node],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_start_up_failures_have_distinct_exit_codes_and_one_clear_line(tmp_path):
    files = write_configs(tmp_path / "c", nodes=1)
    bad = tmp_path / "bad.toml"
    bad.write_text(files.config.read_text() + "\n[raft]\nheartbeat_ms = 500\n")
    result = _run_dtfd(str(bad), "node1")
    assert result.returncode == 78
    assert "raft.election_min_ms" in result.stderr and "Traceback" not in result.stderr

    cluster = LocalCluster(files)
    cluster.start("node1")
    try:
        cluster.wait_leader()
        locked = _run_dtfd(str(files.config), "node1")
        assert locked.returncode in (69, 75), locked.stderr  # port or data dir already taken
        assert "Traceback" not in locked.stderr
    finally:
        cluster.stop_all()

    other = tmp_path / "other.toml"
    other.write_text(files.config.read_text().replace("/data/", "/data2/"))
    holder = socket.socket()
    host, port = files.api["node1"].split(":")
    holder.bind((host, int(port)))
    holder.listen()
    try:
        busy = _run_dtfd(str(other), "node1")
    finally:
        holder.close()
    assert busy.returncode == 69 and "cannot listen" in busy.stderr

    wal_dir = tmp_path / "c" / "data" / "node1" / "wal"
    segment = sorted(wal_dir.iterdir())[0]
    data = bytearray(segment.read_bytes())
    data[40] ^= 0xFF  # inside the first record, with valid records after it
    segment.write_bytes(bytes(data))
    corrupt = _run_dtfd(str(files.config), "node1")
    assert corrupt.returncode == 65, corrupt.stderr
    assert "corrupt" in corrupt.stderr and "Traceback" not in corrupt.stderr


def test_a_node_with_the_wrong_cluster_secret_is_refused(tmp_path):
    files = write_configs(tmp_path / "c", nodes=3)
    cluster = LocalCluster(files)
    cluster.start("node1")
    cluster.start("node2")
    try:
        cluster.wait_leader(among=["node1", "node2"])
        impostor_dir = tmp_path / "impostor"
        impostor_dir.mkdir()
        (impostor_dir / "secret").write_text("a-completely-different-secret\n")
        config = files.config.read_text().replace(str(files.directory / "cluster.secret"), str(impostor_dir / "secret"))
        (impostor_dir / "dtfd.toml").write_text(config)
        with open(impostor_dir / "node3.log", "wb") as impostor_log:
            impostor = subprocess.Popen(
                [sys.executable, "-m", "dtfd.cli", "--config", str(impostor_dir / "dtfd.toml"), "--node", "node3"],
                stderr=impostor_log,
            )
        try:
            deadline = time.monotonic() + 20
            log = files.directory / "node1.log"
            while "failed authentication" not in log.read_text():
                assert time.monotonic() < deadline, "node1 never refused the impostor"
                time.sleep(0.05)
            assert cluster.wait_leader(among=["node1", "node2"])
            assert log.read_text().count("failed authentication") <= 2  # refusals are rate-limited, not a flood
        finally:
            impostor.terminate()
            assert impostor.wait(timeout=15) == 0
    finally:
        cluster.stop_all()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed; .ci/run installs it")
def test_metrics_pass_promtool_and_report_raft_state(tmp_path):
    cluster = LocalCluster(write_configs(tmp_path / "c", nodes=1))
    cluster.start("node1")
    try:
        cluster.wait_leader()
        with cluster.client("node1") as c:
            c.put("/v1/kv/a", json={"value": "1"})
        text = httpx.get(f"http://{cluster.files.api['node1']}/metrics").text
    finally:
        cluster.stop_all()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("dtf_raft_term", "dtf_raft_is_leader 1.0", "dtf_raft_commit_index", "dtf_raft_applied_index",
                 "dtf_raft_leader_changes_total", 'dtf_raft_proposals_total{result="ok"} 1.0',
                 "dtf_wal_fsync_duration_seconds_bucket", 'dtf_http_requests_total{code="200",route="/v1/kv/{key}"}'):
        assert name in text, name
