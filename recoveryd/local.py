"""A local cluster watched by a local recoveryd: its config, its processes. For dev, tests and bench.

The nodes are started through the same LocalExecutor recoveryd uses, so recoveryd finds
them by their pid files, and they outlive both the caller and recoveryd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w
import trio

from dtfd.devcluster import ClusterFiles, LocalCluster, free_ports
from recoveryd import config as recovery_config
from recoveryd.executors import LocalExecutor

TEST_TIMING = {  # fast enough that a test sees a whole repair in seconds
    "probes": {"interval_s": 0.2, "timeout_s": 0.3, "slow_s": 0.2},
    "thresholds": {"confirm_probes": 2, "hang_probes": 3, "disk_free_min_bytes": 1, "inodes_free_min_pct": 0.001},
    "policy": {"restart_cooldown_s": 0.5, "start_timeout_s": 20.0, "stop_timeout_s": 5.0, "catch_up_timeout_s": 60.0},
}


def write_config(files: ClusterFiles, directory: Path, sections: dict | None = None) -> Path:
    """A recoveryd.toml in local mode for the cluster of `files`; `sections` override keys per section."""
    (port,) = free_ports(1)
    doc: dict = {
        "recoveryd": {"mode": "local", "listen": f"127.0.0.1:{port}", "state_dir": str(directory / "recoveryd"),
                      "token": files.admin_token},
        "local": {"dtfd_config": str(files.config)},
        "nodes": [{"name": n, "url": f"{files.scheme}://{files.api[n]}", "data_dir": str(files.directory / "data" / n)}
                  for n in files.node_ids],
    }
    for section, values in {**TEST_TIMING, **(sections or {})}.items():
        doc[section] = {**doc.get(section, {}), **values}
    path = directory / "recoveryd.toml"
    path.write_text(tomli_w.dumps(doc))
    path.chmod(0o600)
    return path


@dataclass
class Watched:
    """The nodes (started through LocalExecutor) and a recoveryd process watching them."""

    files: ClusterFiles
    config_path: Path
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.config = recovery_config.load(self.config_path).config
        self.executor = LocalExecutor(self.config)
        self.nodes = {n.name: n for n in self.config.nodes}
        self.cluster = LocalCluster(self.files)  # its client() and status() only; the processes are the executor's
        self.url = f"http://{self.config.recoveryd.listen}"

    @property
    def state_dir(self) -> Path:
        return Path(self.config.recoveryd.state_dir)

    def start_nodes(self) -> str:
        for node in self.config.nodes:
            trio.run(self.executor.start, node)
        return self.cluster.wait_leader(among=self.files.node_ids)

    def pid(self, node: str) -> int:
        return self.executor.pid(self.nodes[node])

    def start_recoveryd(self, env: dict[str, str] | None = None) -> None:
        """`env`: extra environment (test switches such as a pause point), for this run of recoveryd only."""
        log = open(self.state_dir.parent / "recoveryd.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "recoveryd", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"recoveryd exited {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("recoveryd did not become healthy within 20s")

    def stop_recoveryd(self, signum: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(timeout=20)

    def records(self) -> list[dict]:
        """The JSON lines recoveryd wrote, oldest first."""
        path = self.config.recovery_log
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def history(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/history", timeout=5).json()["actions"]

    def stop_all(self) -> None:
        self.stop_recoveryd()
        pids = [p for p in (self.pid(n) for n in self.nodes) if p]
        for pid in pids:
            for signum in (signal.SIGCONT, signal.SIGTERM):
                _kill(pid, signum)
        deadline = time.monotonic() + 15
        while any(self.executor.pid(n) for n in self.config.nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
