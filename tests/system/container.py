"""A real systemd booted in a container made of this machine's own /, to run the Debian package in.

systemd-nspawn boots / as a volatile root: an empty tmpfs with this machine's /usr on it,
through an overlay whose writes go to the container's work dir, so the guest runs the host's
programs (and its /usr/bin/python3) and can install a package into /usr, but has its own
/etc, /var, users and journal, and only a loopback network. The guest is entered with
nsenter. When the host's PID 1 is not systemd (CI and the development machines here),
nspawn is started inside cgroups made for it, which are removed again on close; under a
systemd host it keeps the caller's unit, which this has not been tried with. Every step
has a deadline; `close` always tears down, whatever state the boot reached.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
HOST_DPKG = "/run/host-dpkg"
BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
GUEST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}


class GuestError(AssertionError):
    """A command in the guest failed or timed out; the message has its output."""


def unavailable() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd in a container needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"), ("setpriv", "util-linux"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    if not Path("/var/lib/dpkg/status").exists():
        return "not a Debian system: no dpkg database for the guest to start from"
    return None


def _host_runs_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _cgroup_hierarchies() -> list[Path]:
    """Where a container's cgroup must be made: the unified hierarchy and systemd's named v1 one."""
    if (CGROUP_ROOT / "cgroup.procs").exists():
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / name for name in ("unified", "systemd") if (CGROUP_ROOT / name / "cgroup.procs").exists()]


class Container:
    """One booted guest; `run` executes a command in it, `close` powers it off and cleans up."""

    def __init__(self, work_dir: Path, binds: dict[str, str]) -> None:
        self.name = f"dtf-{uuid.uuid4().hex[:8]}"
        self.work_dir = work_dir
        self.log_path = work_dir / "boot.log"
        self.binds = binds
        self.cgroups: list[Path] = []
        self.nspawn: subprocess.Popen | None = None
        self.init_pid = 0

    def boot(self) -> Container:
        (self.work_dir / "usr").mkdir(parents=True)
        if not _host_runs_systemd():
            self.cgroups = [hierarchy / self.name for hierarchy in _cgroup_hierarchies()]
            for cgroup in self.cgroups:
                cgroup.mkdir()
        command = [
            "systemd-nspawn", "-q", "-D", "/", "--volatile=yes", "--private-network", "--register=no", "--keep-unit",
            "--console=passive", "-M", self.name, f"--overlay=/usr:{self.work_dir / 'usr'}:/usr",
            f"--bind-ro=/var/lib/dpkg:{HOST_DPKG}", *(f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()),
            "-b", "--", "systemd.unit=basic.target", "systemd.firstboot=off",
        ]
        # The shell moves itself into the container's cgroups, then becomes nspawn, which gets
        # SIGTERM (and powers the guest off) if this process dies without closing it.
        enter = "".join(f'echo $$ > {shlex.quote(str(c / "cgroup.procs"))} && ' for c in self.cgroups)
        with open(self.log_path, "wb") as log:
            self.nspawn = subprocess.Popen(["sh", "-c", enter + 'exec setpriv --pdeathsig TERM -- "$@"', "sh", *command],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.init_pid = self._wait_for_init()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise GuestError(f"the guest did not finish booting within {BOOT_TIMEOUT_S}s (state {state!r}); see {self.log_path}")
            time.sleep(0.1)
        # The guest has only a loopback link and no network manager running: network-online.target
        # (which the dtf units want) would wait two minutes for systemd-networkd-wait-online.
        self.run("systemctl", "mask", "--runtime", "--quiet", "systemd-networkd-wait-online.service")
        # This machine's package database, so dpkg checks Depends against what the guest's /usr holds;
        # its stat overrides are dropped, since they name groups that only the host has.
        self.sh(f"cp -a {HOST_DPKG} /var/lib/dpkg && : > /var/lib/dpkg/statoverride")
        return self

    def _wait_for_init(self) -> int:
        """The pid of the guest's systemd, a descendant of nspawn."""
        assert self.nspawn is not None
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise GuestError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                for child in psutil.Process(self.nspawn.pid).children(recursive=True):
                    if "systemd.unit=basic.target" in child.cmdline():
                        return child.pid
            except psutil.Error:
                pass
            time.sleep(0.05)
        raise GuestError(f"the guest's systemd did not appear within {BOOT_TIMEOUT_S}s; see {self.log_path}")

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """`argv` in the guest (all its namespaces, its root, a plain environment), bounded by `timeout`."""
        command = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i", "-C", "/", *(f"{k}={v}" for k, v in GUEST_ENV.items()), *argv]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"{shlex.join(argv)}: no answer within {timeout}s; output so far: {exc.stdout!r} {exc.stderr!r}") from None
        if check and done.returncode != 0:
            raise GuestError(f"{shlex.join(argv)}: exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("sh", "-euc", script, check=check, timeout=timeout)

    def close(self) -> None:
        """SIGTERM to nspawn (the guest powers off), SIGKILL past STOP_TIMEOUT_S; then the cgroups go."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill_everything()
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)

    def _kill_everything(self) -> None:
        """SIGKILL to the guest's init ends every process of its pid namespace; then nspawn."""
        assert self.nspawn is not None
        if self.init_pid:
            _kill(self.init_pid)
        _kill(self.nspawn.pid)
        self.nspawn.wait(STOP_TIMEOUT_S)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_cgroup(cgroup: Path) -> None:
    """rmdir, deepest first; a cgroup that still holds a process stays."""
    if not cgroup.is_dir():
        return
    for child in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [cgroup]:
        try:
            child.rmdir()
        except OSError:
            pass
