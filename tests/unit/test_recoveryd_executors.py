"""The systemd executor against a fake systemctl: what it runs, what it reads back, how it fails."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from recoveryd.config import Config
from recoveryd.executors import ExecutorError, SystemdExecutor

FAKE = """#!/bin/sh
echo "$*" >> "{log}"
case "$1" in
  show) cat "{show}" ;;
  restart|start|stop|reset-failed) [ -e "{refuse}" ] && {{ echo "Access denied" >&2; exit 4; }}; exit 0 ;;
esac
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[SystemdExecutor, Path, Path, Path]:
    log, show, refuse = tmp_path / "calls", tmp_path / "show", tmp_path / "refuse"
    script = tmp_path / "systemctl"
    script.write_text(FAKE.format(log=log, show=show, refuse=refuse))
    script.chmod(0o755)
    config = msgspec.convert({"nodes": [{"name": "node1", "url": "http://127.0.0.1:7001", "data_dir": "/d"}]}, Config)
    return SystemdExecutor(config, str(script)), log, show, refuse


async def test_a_running_unit(fake):
    executor, log, show, _ = fake
    show.write_text("ActiveState=active\nSubState=running\nMainPID=4242\nNRestarts=3\nExecMainCode=0\nExecMainStatus=0\n")
    state = await executor.state(executor.config.nodes[0])
    assert (state.active, state.pid, state.exit_code, state.restarts, state.detail) == (True, 4242, None, 3, "active/running")
    assert "show --property=ActiveState,SubState,MainPID,NRestarts,ExecMainCode,ExecMainStatus dtfd@node1.service" in log.read_text()


@pytest.mark.parametrize(("code", "status", "exit_code"), [("1", "65", 65), ("2", "9", 137), ("1", "0", 0)])
async def test_the_last_exit_of_a_failed_unit(fake, code, status, exit_code):
    executor, _, show, _ = fake
    show.write_text(f"ActiveState=failed\nSubState=failed\nMainPID=0\nNRestarts=0\nExecMainCode={code}\nExecMainStatus={status}\n")
    state = await executor.state(executor.config.nodes[0])
    assert not state.active and state.exit_code == exit_code and state.detail == "failed/failed"


async def test_restart_resets_the_start_limit_first(fake):
    executor, log, _, _ = fake
    await executor.restart(executor.config.nodes[0])
    await executor.stop(executor.config.nodes[0])
    assert log.read_text().splitlines() == ["reset-failed dtfd@node1.service", "restart dtfd@node1.service", "stop dtfd@node1.service"]


async def test_a_refusal_is_an_error_naming_unit_and_reason(fake):
    executor, _, _, refuse = fake
    refuse.touch()
    with pytest.raises(ExecutorError, match="systemctl start dtfd@node1.service: exit 4: Access denied"):
        await executor.start(executor.config.nodes[0])
