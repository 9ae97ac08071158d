"""CPU per task inside one dtf-worker: no-op tasks from an in-memory coordinator.

    .venv/bin/python bench/worker.py [--tasks N] [--slots S] [--runs R] [--profile]

bench/tasks.py measures the whole system, where the nodes and the workers share the
cores and every number moves with the load. Here the coordinator is the fake the tests
use (tests/integration/fake_coordinator.py), in this process and answering at once, so
the one real dtf-worker (a subprocess, S slots) is the only thing working: its CPU time
per task (user + system, its task processes apart) is the number, with the requests it
made per task by route. All N tasks (`true`) are queued before the worker starts; each
run is a fresh worker. --profile samples the worker with py-spy during the last run.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import tomli_w
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import machine_line  # noqa: E402
from throughput import summarize_profile  # noqa: E402

from tests.integration.fake_coordinator import TOKEN, FakeCoordinator  # noqa: E402


async def one_run(directory: Path, tasks: int, slots: int, profile: bool) -> tuple[float, float, float, dict[str, int]]:
    """Seconds, worker CPU seconds, task CPU seconds and requests by route for `tasks` no-op tasks."""
    fake = FakeCoordinator(heartbeat_s=2.0, lost_after_s=10.0)
    config = directory / "worker.toml"
    async with trio.open_nursery() as nursery:
        front = await fake.listen(nursery)
        config.write_text(
            tomli_w.dumps(
                {
                    "coordinator": {"urls": [front.url], "token": TOKEN},
                    "worker": {"id": "w1", "slots": slots, "work_dir": str(directory / "work")},
                }
            )
        )
        ids = [fake.submit(["true"], timeout_s=10) for _ in range(tasks)]
        with open(directory / "worker.log", "ab") as log:
            worker = await trio.lowlevel.open_process([sys.executable, "-m", "dtfd.worker", "--config", str(config)], stderr=log)
        spy = None
        try:
            if profile:
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                command = [py_spy, "record", "--pid", str(worker.pid), "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(directory / "worker.raw")]
                spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            with trio.fail_after(60):
                while not fake.workers.get("w1"):
                    await fake.changed.wait()
            process = psutil.Process(worker.pid)
            before, started = process.cpu_times(), time.monotonic()
            with trio.fail_after(60 + tasks / 10):
                while len(fake.results) < len(ids):
                    await fake.changed.wait()
            elapsed, after = time.monotonic() - started, process.cpu_times()
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
            worker.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await worker.wait()
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        nursery.cancel_scope.cancel()
    own = after.user + after.system - before.user - before.system
    ran = after.children_user + after.children_system - before.children_user - before.children_system
    routes = collections.Counter(call.route for call in fake.calls)
    return elapsed, own, ran, dict(routes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="py-spy on the worker during the last run")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print(f"One dtf-worker, {args.slots} slots, {args.tasks} no-op tasks per run from an in-memory coordinator")
    print(f"{'run':>3} {'tasks/s':>8} {'worker CPU ms/task':>19} {'task CPU ms/task':>17}  requests per task by route")
    for run in range(1, args.runs + 1):
        directory = Path(tempfile.mkdtemp(prefix="dtf-bench-worker-"))
        profile = args.profile and run == args.runs
        elapsed, own, ran, routes = trio.run(one_run, directory, args.tasks, args.slots, profile)
        per_task = " ".join(f"{route}={n / args.tasks:.2f}" for route, n in sorted(routes.items()) if route in ("lease", "start", "results"))
        print(f"{run:>3} {args.tasks / elapsed:>8.0f} {1000 * own / args.tasks:>19.2f} {1000 * ran / args.tasks:>17.2f}  {per_task}", flush=True)
        if profile:
            summarize_profile(directory / "worker.raw", f"py-spy on the worker during run {run}, 200 Hz")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(machine_line())


if __name__ == "__main__":
    main()
