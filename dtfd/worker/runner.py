"""Runs one task: a process group of its own, a timeout, capped output, resource usage.

Every task gets `start_new_session=True`, so a timeout or a cancel signals the whole
group (children and grandchildren included): SIGTERM first, SIGKILL after the grace
period. Whatever a finished task left behind in its group is ended the same way, so no
task outlives its result. Peak RSS and CPU time cover the whole process tree: it is
sampled from /proc every `sample_interval_s` while it runs, and the rusage wait4 gives
when the task's process is reaped adds what it and every descendant it waited for used
up to their exit (so a task shorter than one interval, never sampled, is still measured).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import msgspec
import psutil
import trio

from dtfd.journal import fields
from dtfd.state.tasks import JUnitCase, Outcome
from dtfd.worker.junit import JunitError, parse_file

log = logging.getLogger("dtf.worker.runner")

BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_EOF_WAIT_S = 1.0  # after the group is gone: a process that left it may still hold the pipe
GROUP_POLL_S = 0.05
REAP_POLL_S = 0.05  # only where pidfd_open(2) is missing (Linux < 5.3)


class TaskSpec(msgspec.Struct, kw_only=True):
    """The fields of the submitted spec the worker acts on; the coordinator's others are ignored."""

    argv: list[str]
    shell: bool = False
    env: dict[str, str] = {}
    cwd: str = ""
    timeout_s: float = 600.0
    junit: str = ""


class Result(Outcome, frozen=True, kw_only=True):
    """What /v1/results takes for one attempt. exit_code None: no process ran; negative: killed by that signal."""

    task_id: str
    lease_id: str


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    work_dir: Path
    output_cap_bytes: int = 262_144
    kill_grace_s: float = 10.0
    junit_max_bytes: int = 16 << 20
    sample_interval_s: float = 0.2


class CannotRun(Exception):
    """The task cannot be started as specified; reported as status "error"."""


class Tail:
    """The last `cap` bytes of the output, and how many were dropped before them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0
        self.closed = trio.Event()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.cap
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        if self.dropped:
            return f"[dtf-worker: output truncated, the first {self.dropped} bytes were dropped]\n{text}"
        return text

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.add(chunk)
        self.closed.set()


class Usage:
    """Peak RSS and CPU time of a process tree: the largest of periodic samples and of the rusage at reaping."""

    def __init__(self) -> None:
        self.peak_rss_bytes = 0
        self.cpu_s = 0.0

    def reaped(self, rusage: resource.struct_rusage) -> None:
        """wait4's rusage: the process and its waited-for descendants, to their exit; ru_maxrss
        (KiB) is the largest single one of them, where a sample adds up the tree at one moment."""
        self.peak_rss_bytes = max(self.peak_rss_bytes, rusage.ru_maxrss * 1024)
        self.cpu_s = max(self.cpu_s, rusage.ru_utime + rusage.ru_stime)

    def sample(self, pid: int) -> None:
        """Reads /proc/PID/stat (CPU) and statm (RSS, exact there: stat's is the kernel's cheap
        estimate) per process: under half of what psutil's Process, memory_info and cpu_times cost,
        five times a second for every running task."""
        try:
            tree = process_tree(pid)
        except psutil.Error:
            return
        rss, ticks = 0, 0
        for member in tree:
            try:
                stat, statm = _read(f"/proc/{member}/stat"), _read(f"/proc/{member}/statm")
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ", comm may hold anything
            # utime, stime, and cutime, cstime: descendants already reaped by their parent in the tree
            ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            rss += int(statm.split()[1]) * _PAGE_BYTES
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.cpu_s = max(self.cpu_s, ticks / _TICKS_PER_S)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")  # not without CONFIG_PROC_CHILDREN
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants. Through /proc/PID/task/TID/children the walk reads only the
    tree; psutil's children() reads every process on the machine, milliseconds per sample."""
    if not _PROC_CHILDREN:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as listing:
                    children = [int(child) for child in listing.read().split()]
            except OSError:
                continue
            tree += children
            frontier += children
    return tree


def command(spec: TaskSpec) -> list[str]:
    """argv as given; with `shell`, argv is exactly one string: the script for /bin/sh -c."""
    if not spec.argv or not all(spec.argv):
        raise CannotRun("argv must be a non-empty list of non-empty strings")
    if spec.shell:
        if len(spec.argv) != 1:
            raise CannotRun(f"a shell task takes argv of exactly one string, the script; got {len(spec.argv)}")
        return ["/bin/sh", "-c", spec.argv[0]]
    return list(spec.argv)


def environment(spec: TaskSpec, task_id: str, lease_id: str, attempt: int) -> dict[str, str]:
    """A minimal base (not the worker's whole environment, which may hold secrets), the task's, then the worker's own.

    The coordinator refuses specs that set the worker's variables; they are set last all the same.
    """
    env = {key: os.environ[key] for key in BASE_ENV_KEYS if key in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(spec.env)
    env.update(DTF_TASK_ID=task_id, DTF_LEASE_ID=lease_id, DTF_ATTEMPT=str(attempt))
    return env


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for a reaper do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """A task's process, reaped with wait4 for its rusage, through a pidfd the event loop watches.

    It is spawned in a worker thread: Popen returns only once the child has exec'd, and
    exec or chdir on a hung network mount would otherwise freeze the whole agent, its
    heartbeats included, so the coordinator would requeue every task it runs. The hop
    costs ~0.1-0.25 ms of CPU per task."""

    @classmethod
    async def start(cls, argv: list[str], cwd: Path, env: dict[str, str]) -> Child:
        """Raises OSError when the command cannot be started."""
        read, write = os.pipe()
        try:
            popen = await trio.to_thread.run_sync(
                functools.partial(subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=write, stderr=write, cwd=cwd, env=env, start_new_session=True)
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        return cls(popen, read)

    def __init__(self, popen: subprocess.Popen, output: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.output = trio.lowlevel.FdStream(output)
        self.returncode: int | None = None
        self.rusage: resource.struct_rusage | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except OSError:
            self._pidfd = None

    async def wait(self) -> int:
        while self.returncode is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                # Popen's own record too: one unreaped at garbage collection is reaped by subprocess later
                self.returncode = self._popen.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
                self._close_pidfd()
            elif self._pidfd is None:
                await trio.sleep(REAP_POLL_S)
        return self.returncode

    async def aclose(self) -> None:
        self._close_pidfd()
        await self.output.aclose()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def end_group(process: Child, grace_s: float) -> None:
    """SIGTERM the task's group, wait up to the grace period for it to go, then SIGKILL and see it gone."""
    pgid = process.pid
    if process.returncode is not None and not group_alive(pgid):
        return  # the usual end: the task exited and left nothing behind
    signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await process.wait()
        while group_alive(pgid):
            await trio.sleep(GROUP_POLL_S)
    signal_group(pgid, signal.SIGKILL)
    await process.wait()
    with trio.move_on_after(grace_s):  # SIGKILLed processes still take a moment to exit
        while group_alive(pgid):
            await trio.sleep(GROUP_POLL_S)


async def remove(directory: Path) -> None:
    """An empty directory at once; one with files in a thread (it may hold a whole build)."""
    try:
        os.rmdir(directory)
    except OSError:
        await trio.to_thread.run_sync(shutil.rmtree, directory, True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TaskRun:
    """One attempt of one task; `stop()` ends it early (cancel, unknown lease, worker shutdown)."""

    def __init__(self, task_id: str, lease_id: str, attempt: int, spec: TaskSpec, settings: Settings) -> None:
        self.task_id = task_id
        self.lease_id = lease_id
        self.attempt = attempt
        self.spec = spec
        self.settings = settings
        self.stopped: tuple[str, str] | None = None  # (status, reason)
        self._waiting = trio.CancelScope()
        self.context = fields(task=task_id, lease=lease_id, attempt=attempt)

    def stop(self, status: str, reason: str) -> None:
        if self.stopped is None:
            self.stopped = (status, reason)
        self._waiting.cancel()

    def _result(self, status: str, **values: object) -> Result:
        return Result(task_id=self.task_id, lease_id=self.lease_id, status=status, **values)

    async def run(self) -> Result:
        if self.stopped is not None:
            return self._result(self.stopped[0], reason=self.stopped[1])
        try:
            argv = command(self.spec)
            cwd, temporary = self._cwd()
        except CannotRun as exc:
            log.warning("task cannot run %s", fields(reason=exc) + " " + self.context)
            return self._result("error", reason=str(exc))
        try:
            result = await self._execute(argv, cwd)
        finally:
            if temporary:
                await remove(cwd)
        log.info(
            "task finished %s",
            self.context + " " + fields(status=result.status, exit_code=result.exit_code, duration_s=f"{result.duration_s:.3f}"),
        )
        return result

    def _cwd(self) -> tuple[Path, bool]:
        """The task's directory, and whether it is a fresh one to remove afterwards."""
        work_dir = self.settings.work_dir
        if not self.spec.cwd:
            prefix = f"task-{self.task_id}-"
            try:
                try:
                    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir)), True
                except FileNotFoundError:  # the first task, or work_dir was removed
                    work_dir.mkdir(parents=True, exist_ok=True)
                    return Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir)), True
            except OSError as exc:
                raise CannotRun(f"cannot create a directory under {work_dir}: {exc.strerror}") from None
        cwd = work_dir / self.spec.cwd  # an absolute cwd stays absolute
        if not cwd.is_dir():
            raise CannotRun(f"cwd {str(cwd)!r} is not a directory")
        return cwd, False

    async def _execute(self, argv: list[str], cwd: Path) -> Result:
        spec, settings = self.spec, self.settings
        started = trio.current_time()
        try:
            process = await Child.start(argv, cwd, environment(spec, self.task_id, self.lease_id, self.attempt))
        except OSError as exc:
            return self._result("error", reason=f"cannot run {argv[0]!r}: {exc.strerror or exc}")
        log.info("task started %s", self.context + " " + fields(pid=process.pid, command=argv[0]))
        output, usage = Tail(settings.output_cap_bytes), Usage()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(output.collect, process.output)
                nursery.start_soon(self._sample, process, usage)
                with trio.move_on_after(spec.timeout_s):
                    with self._waiting:
                        await process.wait()
                ended_by_us = process.returncode is None
                await end_group(process, settings.kill_grace_s)
                duration_s = trio.current_time() - started
                if not output.closed.is_set():
                    with trio.move_on_after(OUTPUT_EOF_WAIT_S):
                        await output.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:  # cancelled from outside: leave nothing running
                signal_group(process.pid, signal.SIGKILL)
            await process.aclose()
        assert process.returncode is not None and process.rusage is not None
        usage.reaped(process.rusage)
        if ended_by_us:
            status, reason = self.stopped or ("timed_out", f"timed out after {spec.timeout_s:g}s; process group ended")
        elif process.returncode == 0:
            status, reason = "succeeded", ""
        else:
            status = "failed"
            reason = f"killed by {_signal_name(-process.returncode)}" if process.returncode < 0 else ""
        cases: list[JUnitCase] = []
        if spec.junit:
            try:
                cases = parse_file(cwd / spec.junit, settings.junit_max_bytes)
            except JunitError as exc:
                reason = f"{reason}; {exc}" if reason else str(exc)
        return self._result(
            status,
            exit_code=process.returncode,
            duration_s=round(duration_s, 6),
            peak_rss_bytes=usage.peak_rss_bytes,
            cpu_s=round(usage.cpu_s, 6),
            output_tail=output.text(),
            truncated=bool(output.dropped),
            reason=reason,
            junit=cases,
        )

    async def _sample(self, process: Child, usage: Usage) -> None:
        """From one interval in: a shorter task is measured by its rusage alone."""
        while True:
            await trio.sleep(self.settings.sample_interval_s)
            if process.returncode is not None:
                return
            usage.sample(process.pid)
