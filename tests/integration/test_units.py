"""The systemd units must be valid and tightly sandboxed, checked by systemd's own tools."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian package systemd) is not installed"),
]
UNITS = Path(__file__).resolve().parents[2] / "units"


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's programs, and an instance of each template."""
    bin_dir = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    programs = {name: shutil.which(name) or str(bin_dir / name) for name in ("dtf-worker", "dtfd")}
    for unit in UNITS.iterdir():
        text = unit.read_text()
        for name, path in programs.items():
            text = text.replace(f"/usr/bin/{name}", path)
        (tmp_path / unit.name).write_text(text)
    (tmp_path / "dtfd@node1.service").symlink_to(tmp_path / "dtfd@.service")
    (tmp_path / "dtf-worker@w1.service").symlink_to(tmp_path / "dtf-worker@.service")
    return tmp_path


def test_units_pass_systemd_analyze_verify(units):
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "dtfd@node1.service", "dtf-worker@w1.service", "dtf.target"],
        cwd=units, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_dtfd_unit_exposure_is_at_most_two(units):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", "dtfd@node1.service"],
        cwd=units, capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for dtfd@node1.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
