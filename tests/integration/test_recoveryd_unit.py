"""units/recoveryd.service must be valid and keep its sandbox, checked by systemd's own tools."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian package systemd) is not installed"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    program = shutil.which("recoveryd") or str(ROOT / ".venv" / "bin" / "recoveryd")
    text = (ROOT / "units" / "recoveryd.service").read_text().replace("/usr/bin/recoveryd", program)
    (tmp_path / "recoveryd.service").write_text(text)
    return tmp_path


def test_unit_passes_systemd_analyze_verify(unit):
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", "recoveryd.service"], cwd=unit, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_unit_runs_as_root_with_a_tight_sandbox(unit):
    """Root for systemctl and the data dirs, and nothing more: exposure stays at 2.5 or below (2.1 when written)."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", "recoveryd.service"],
                            cwd=unit, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for recoveryd.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout
