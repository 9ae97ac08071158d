"""The package's life cycle on a fresh guest: install, upgrade, remove, purge, reinstall; /var/lib/dtf survives it all."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.cluster import API, NODES, admin_token, http, start_cluster, unit
from tests.system.conftest import booted, in_guest
from tests.system.container import Container, unavailable

pytestmark = [pytest.mark.system, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

GENERATED = ("cluster.secret", "tokens.toml", "worker.token", "recoveryd.token", "dtfctl.toml")
KEY = "/v1/kv/survives-upgrades"


@pytest.fixture
def fresh_guest(tmp_path: Path, built_deb: Path) -> Iterator[Container]:
    """A guest of its own: this test removes and purges the package."""
    with booted(tmp_path / "guest", built_deb) as container:
        yield container


@pytest.fixture
def bumped_deb(built_deb: Path, tmp_path: Path) -> Iterator[Path]:
    """The same package with a higher version, as the next release would be."""
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-R", str(built_deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN" / "control"
    version = next(line.split(": ", 1)[1] for line in control.read_text().splitlines() if line.startswith("Version: "))
    control.write_text(control.read_text().replace(f"Version: {version}\n", f"Version: {version}+next1\n"))
    bumped = built_deb.parent / built_deb.name.replace(f"_{version}_", f"_{version}+next1_")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(bumped)],
                   check=True, timeout=120, stdout=subprocess.DEVNULL)
    yield bumped
    bumped.unlink()


def data_files(guest: Container) -> str:
    """Every file under /var/lib/dtf with its size: what must never be lost."""
    return guest.sh("cd /var/lib/dtf && find . -type f -printf '%p %s\\n' | sort").stdout


def main_pids(guest: Container) -> dict[str, str]:
    return {node: unit(guest, f"dtfd@{node}.service")["MainPID"] for node in NODES}


def test_install_upgrade_remove_purge_keep_the_data(fresh_guest: Container, built_deb: Path, bumped_deb: Path) -> None:
    guest = fresh_guest
    guest.run("dpkg", "-i", in_guest(built_deb), timeout=120)
    # The venv runs on the guest's own /usr/bin/python3, through the /usr/bin links.
    assert guest.run("dtfd", "--help").returncode == 0
    assert guest.run("/opt/dtf/bin/python3", "-c", "import sys; print(sys.prefix)").stdout.strip() == "/opt/dtf"
    owners = guest.sh("cd /etc/dtf && stat -c '%n %U:%G %a' " + " ".join(GENERATED)).stdout.split("\n")
    assert owners[:-1] == ["cluster.secret root:dtf 640", "tokens.toml root:dtf 640", "worker.token root:dtf-worker 640",
                           "recoveryd.token root:root 600", "dtfctl.toml root:root 600"], owners
    conffiles = guest.run("dpkg-query", "-W", "-f=${Conffiles}", "dtf").stdout
    assert all(f"/etc/dtf/{name}.toml" in conffiles for name in ("dtfd", "worker", "recoveryd")), conffiles

    start_cluster(guest)
    token = admin_token(guest)
    assert http(guest, "PUT", API["node1"] + KEY, token, {"value": "kept", "client": "package-test", "seq": 1})[0] == 200
    guest.sh("sed -i 's/^level = \"info\"/level = \"debug\"/' /etc/dtf/dtfd.toml")  # an operator's edit of a conffile
    secrets = guest.sh("cd /etc/dtf && cat " + " ".join(GENERATED)).stdout
    before = main_pids(guest)

    # Upgrade: the running nodes are restarted on the new code, one at a time; nothing else changes.
    guest.run("dpkg", "-i", in_guest(bumped_deb), timeout=180)
    assert "+next1" in guest.run("dpkg-query", "-W", "-f=${Version}", "dtf").stdout
    after = main_pids(guest)
    assert all(after[n] not in ("0", before[n]) for n in NODES), (before, after)
    assert guest.sh("cd /etc/dtf && cat " + " ".join(GENERATED)).stdout == secrets
    assert 'level = "debug"' in guest.run("cat", "/etc/dtf/dtfd.toml").stdout
    start_cluster(guest)
    assert http(guest, "GET", API["node2"] + KEY, token)[1]["value"] == "kept"

    # Remove: the units are stopped first; configuration and data stay.
    guest.run("dpkg", "-r", "dtf", timeout=180)
    for node in NODES:
        assert unit(guest, f"dtfd@{node}.service")["ActiveState"] == "inactive"
    assert guest.run("systemctl", "list-units", "--failed", "--plain", "--no-legend", "dtf*", "recoveryd*").stdout.strip() == ""
    assert guest.run("test", "-e", "/usr/bin/dtfd", check=False).returncode != 0
    assert guest.sh("cd /etc/dtf && cat " + " ".join(GENERATED)).stdout == secrets
    data = data_files(guest)
    assert all(f"./{node}/wal/" in data for node in NODES), data

    # Purge: /etc/dtf goes (conffiles and generated secrets); the data and the users stay.
    guest.run("dpkg", "-P", "dtf", timeout=120)
    assert guest.run("test", "-e", "/etc/dtf", check=False).returncode != 0
    assert data_files(guest) == data
    guest.run("getent", "passwd", "dtf", "dtf-worker")

    # Reinstall: new secrets, the same data; the key written before the upgrade is still there.
    guest.run("dpkg", "-i", in_guest(bumped_deb), timeout=120)
    start_cluster(guest)
    token = admin_token(guest)
    assert http(guest, "GET", API["node3"] + KEY, token)[1]["value"] == "kept"
