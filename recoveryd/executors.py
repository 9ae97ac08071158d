"""How recoveryd sees and drives a node's process: systemd units or local processes, one interface.

`systemd` runs systemctl on dtfd@NAME units (production). `local` starts each dtfd
itself (dev clusters, tests): through a tiny `sh` waiter in its own session, so the node
outlives a recoveryd restart and its exit status is still written down, the way systemd
keeps ExecMainStatus for a unit whatever happens to the process that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import msgspec
import psutil
import trio

from recoveryd.config import Config, Node

SYSTEMCTL_TIMEOUT_S = 30.0
# A killed process reports 128 + signal, as a shell and `systemctl show` (ExecMainCode=2) both allow.
SIGNALLED = 128
_CLD_EXITED = "1"


class ProcessState(msgspec.Struct, frozen=True):
    active: bool  # running or starting
    pid: int  # 0: none
    exit_code: int | None  # of the last run; None: unknown or never ran
    restarts: int  # restarts seen by the supervisor (systemd's NRestarts)
    detail: str  # e.g. "active/running", "failed/exit-code", "stopped"


class Executor(Protocol):
    async def state(self, node: Node) -> ProcessState: ...
    async def start(self, node: Node) -> None: ...
    async def stop(self, node: Node) -> None: ...
    async def restart(self, node: Node) -> None: ...


class ExecutorError(Exception):
    """The supervisor refused or failed a request; the message says which and why."""


class SystemdExecutor:
    """systemctl is-active/show/restart/stop/start; `reset-failed` first, so a unit past StartLimitBurst starts."""

    def __init__(self, config: Config, systemctl: str = "systemctl") -> None:
        self.config, self.systemctl = config, systemctl

    async def _run(self, *args: str) -> subprocess.CompletedProcess:
        with trio.fail_after(SYSTEMCTL_TIMEOUT_S):
            return await trio.run_process([self.systemctl, *args], capture_stdout=True, capture_stderr=True, check=False)

    async def _control(self, verb: str, node: Node) -> None:
        unit = self.config.unit(node)
        if verb != "stop":
            await self._run("reset-failed", unit)
        done = await self._run(verb, unit)
        if done.returncode != 0:
            raise ExecutorError(f"systemctl {verb} {unit}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")

    async def state(self, node: Node) -> ProcessState:
        unit = self.config.unit(node)
        done = await self._run("show", "--property=ActiveState,SubState,MainPID,NRestarts,ExecMainCode,ExecMainStatus", unit)
        if done.returncode != 0:
            raise ExecutorError(f"systemctl show {unit}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
        props = dict(line.partition("=")[::2] for line in done.stdout.decode().splitlines() if "=" in line)
        status = int(props.get("ExecMainStatus") or 0)
        code = props.get("ExecMainCode", "0")
        exit_code = None if code == "0" else status if code == _CLD_EXITED else SIGNALLED + status
        active = props.get("ActiveState", "") in ("active", "activating", "reloading")
        return ProcessState(
            active=active,
            pid=int(props.get("MainPID") or 0),
            exit_code=exit_code,
            restarts=int(props.get("NRestarts") or 0),
            detail=f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}",
        )

    async def start(self, node: Node) -> None:
        await self._control("start", node)

    async def stop(self, node: Node) -> None:
        await self._control("stop", node)

    async def restart(self, node: Node) -> None:
        await self._control("restart", node)


_WAITER = 'p=$1; e=$2; shift 2; "$@" & c=$!; echo $c > "$p.tmp" && mv "$p.tmp" "$p"; wait $c; echo $? > "$e.tmp" && mv "$e.tmp" "$e"'


class LocalExecutor:
    """dtfd processes on this machine, tracked by pid and exit files in STATE_DIR/local."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_dir = Path(config.recoveryd.state_dir) / "local"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._waiters: dict[str, subprocess.Popen] = {}
        self._starts: dict[str, int] = {}

    def _file(self, node: Node, suffix: str) -> Path:
        return self.run_dir / f"{node.name}.{suffix}"

    def pid(self, node: Node) -> int:
        """The node's live dtfd pid, or 0 (also for a zombie, or a pid reused by another program)."""
        for waiter in self._waiters.values():
            waiter.poll()  # reap waiters that finished
        try:
            pid = int(self._file(node, "pid").read_text())
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE and "dtfd.cli" in " ".join(proc.cmdline())
        except (FileNotFoundError, ValueError, psutil.Error):
            return 0
        return pid if alive else 0

    async def state(self, node: Node) -> ProcessState:
        pid = self.pid(node)
        try:
            exit_code: int | None = int(self._file(node, "exit").read_text())
        except (FileNotFoundError, ValueError):
            exit_code = None
        starts = self._starts.get(node.name, 0)
        detail = "active/running" if pid else "failed/exit-code" if exit_code else "inactive/dead"
        return ProcessState(bool(pid), pid, exit_code, max(0, starts - 1), detail)

    async def start(self, node: Node) -> None:
        if self.pid(node):
            return
        pid_file, exit_file = self._file(node, "pid"), self._file(node, "exit")
        pid_file.unlink(missing_ok=True)
        exit_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "dtfd.cli", "--config", self.config.local.dtfd_config, "--node", node.name]
        with open(self._file(node, "log"), "ab") as log:
            self._waiters[node.name] = subprocess.Popen(
                ["sh", "-c", _WAITER, "sh", str(pid_file), str(exit_file), *command],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._starts[node.name] = self._starts.get(node.name, 0) + 1
        with trio.fail_after(10):
            while not pid_file.exists() and not exit_file.exists():
                await trio.sleep(0.01)

    async def stop(self, node: Node) -> None:
        """SIGCONT (a stopped process cannot handle SIGTERM), SIGTERM, SIGKILL after stop_timeout_s."""
        pid = self.pid(node)
        if not pid:
            return
        for signum in (signal.SIGCONT, signal.SIGTERM):
            _signal(pid, signum)
        with trio.move_on_after(self.config.policy.stop_timeout_s):
            while self.pid(node):
                await trio.sleep(0.02)
        if self.pid(node):
            _signal(pid, signal.SIGKILL)
            with trio.fail_after(10):
                while self.pid(node):
                    await trio.sleep(0.02)
        exit_file = self._file(node, "exit")
        with trio.move_on_after(5):  # its waiter (maybe another process's) writes the exit status just after:
            while not exit_file.exists():  # a start must not read that as the exit of what it started
                await trio.sleep(0.01)

    async def restart(self, node: Node) -> None:
        await self.stop(node)
        await self.start(node)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def make(config: Config) -> Executor:
    return LocalExecutor(config) if config.recoveryd.mode == "local" else SystemdExecutor(config)
