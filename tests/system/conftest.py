"""The package, built once per session, and a booted guest with it installed, shared by the tests that allow it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.system.container import Container

ROOT = Path(__file__).resolve().parents[2]
GUEST_DEBS = "/run/dtf-test/debs"
BUILD_TIMEOUT_S = 600  # the first build fills the wheelhouse from the package index


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dtf_<version>_<arch>.deb from packaging/build-deb, as a user builds it."""
    out = tmp_path_factory.mktemp("debs")
    done = subprocess.run([str(ROOT / "packaging" / "build-deb"), "--out", str(out)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, f"packaging/build-deb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return Path(done.stdout.split()[-1])


def in_guest(deb: Path) -> str:
    """Where a package built into the session's deb dir is seen inside a guest."""
    return f"{GUEST_DEBS}/{deb.name}"


@contextmanager
def booted(work_dir: Path, built_deb: Path) -> Iterator[Container]:
    """A guest that sees the packages built this session; powered off and cleaned up at the end, whatever happened."""
    container = Container(work_dir, {str(built_deb.parent): GUEST_DEBS})
    try:
        yield container.boot()
    finally:
        container.close()


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory, built_deb: Path) -> Iterator[Container]:
    """One guest with the package installed, shared by the cluster tests."""
    with booted(tmp_path_factory.mktemp("guest"), built_deb) as container:
        container.run("dpkg", "-i", in_guest(built_deb), timeout=120)
        yield container
