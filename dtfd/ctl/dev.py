"""`dtfctl dev up` and `dtfctl demo`: a real local cluster, no root, no systemd.

Every child is a real dtfd or dtf-worker process on loopback. On Ctrl-C or SIGTERM the
workers are stopped first (they drain and deregister), then the nodes; nothing is left.
The demo's nodes are watched by a real recoveryd in local mode, which restarts the one
the demo kills.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from dtfd.ctl import render
from dtfd.ctl.cli import cluster_view
from dtfd.ctl.client import Client, CtlError, Target
from dtfd.devcluster import LocalCluster, write_configs, write_worker_config
from recoveryd import local as recoveryd_local

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo-suite"
GENERATED_TASKS = 16  # quick passing tasks beside the example suite, so the run has a middle to fail over in
DEMO_RECOVERYD = {"probes": {"interval_s": 0.25, "timeout_s": 0.4, "slow_s": 0.25}}
RECOVERY_WAIT_S = 30.0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def _start_workers(cluster: LocalCluster, workers: int) -> None:
    for n in range(workers):
        labels = {"os": "linux", "pool": "even" if n % 2 == 0 else "odd"}
        cluster.start_worker(write_worker_config(cluster.files, f"worker{n + 1}", labels=labels, slots=2))


def start(directory: Path, nodes: int, workers: int, console: Console) -> tuple[LocalCluster, Client]:
    files = write_configs(directory, nodes=nodes)
    cluster = LocalCluster(files)
    cluster.start_all()
    _start_workers(cluster, workers)
    try:
        cluster.wait_leader(timeout=30)
    except TimeoutError as exc:
        cluster.stop_all()
        raise CtlError(f"the local cluster did not elect a leader: {exc} (logs in {directory})") from None
    client = Client(Target([f"http://{a}" for a in files.api.values()], files.admin_token))
    return cluster, client


def up(args: argparse.Namespace, console: Console) -> int:
    directory = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="dtf-dev-"))
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    cluster, client = start(directory, args.nodes, args.workers, console)
    try:
        urls = ",".join(client.target.urls)
        console.print(render.status(cluster_view(client)))
        console.print(
            f"\nConfigs, data and logs: {directory}\nPoint dtfctl at it:\n"
            f"  export DTF_CLUSTER={urls}\n  export DTF_TOKEN={cluster.files.admin_token}\n"
            "Ctrl-C stops everything."
        )
        while True:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise CtlError(f"{name} exited with {proc.returncode}; see {directory / (name + '.log')}")
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        console.print("stopping the local cluster...")
        return 0
    finally:
        client.close()
        cluster.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _demo_specs(suite: Path, state: Path) -> list[dict]:
    python = sys.executable
    env = {"DTF_DEMO_STATE": str(state), "DTF_DEMO_RUN": state.name}
    specs = []
    for module in sorted(suite.glob("test_*.py")):
        name = module.stem.removeprefix("test_")
        specs.append({
            "name": name,
            "argv": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", module.name, f"--junitxml=reports/{name}.xml"],
            "cwd": str(suite), "env": env, "junit": f"reports/{name}.xml", "timeout_s": 120,
            "max_retries": 1, "backoff": {"base_s": 0.2, "max_s": 1.0},
        })
    for n in range(GENERATED_TASKS):
        specs.append({"name": f"shard-{n}", "argv": [python, "-c", f"import time; time.sleep(0.{n % 5 + 2})"],
                      "timeout_s": 60, "requirements": {"labels": {"pool": "even" if n % 2 else "odd"}}})
    return specs


def _start_watched(directory: Path, workers: int) -> tuple[recoveryd_local.Watched, Client]:
    """Three nodes started through recoveryd's local executor, a recoveryd watching them, and the workers."""
    files = write_configs(directory, nodes=3)
    watched = recoveryd_local.Watched(files, recoveryd_local.write_config(files, directory, DEMO_RECOVERYD))
    try:
        watched.start_nodes()
        watched.start_recoveryd()
    except (TimeoutError, RuntimeError) as exc:
        watched.stop_all()
        raise CtlError(f"the local cluster or its recoveryd did not start: {exc} (logs in {directory})") from None
    _start_workers(watched.cluster, workers)
    return watched, Client(Target([f"http://{a}" for a in files.api.values()], files.admin_token))


def _restart_of(watched: recoveryd_local.Watched, node: str) -> dict | None:
    return next((r for r in watched.records() if r["node"] == node and r["action"] == "restart" and r["result"] == "ok"), None)


def _recovered(console: Console, watched: recoveryd_local.Watched, client: Client, node: str, killed_at: float) -> dict | None:
    """recoveryd's restart of the killed node, once the cluster's replicated history shows it too."""
    deadline = time.monotonic() + RECOVERY_WAIT_S
    while time.monotonic() < deadline:
        record = _restart_of(watched, node)
        history = client.request("GET", "/v1/history")
        if record and any(e["node"] == node and e["action"] == "restart" for e in history.get("recoveries", [])):
            console.print(Text(f"recoveryd saw {node} crash ({record['reason']}) and restarted it; back "
                               f"{record['finished'] - killed_at:.1f}s after the kill -9", style="bold cyan"))
            console.print(Text("dtfctl history:", style="bold"))
            console.print(render.history(history))
            return record
        time.sleep(0.25)
    console.print(Text(f"recoveryd did not restart {node} within {RECOVERY_WAIT_S:g}s "
                       f"(see {watched.state_dir.parent / 'recoveryd.log'})", style="bold red"))
    return None


def demo(console: Console) -> int:
    work = Path(tempfile.mkdtemp(prefix="dtf-demo-"))
    suite = work / "suite"
    shutil.copytree(EXAMPLES, suite)
    (work / "state").mkdir()
    console.print(Text("dtf demo: 3 coordinators watched by recoveryd, 4 workers, a test run, a leader crash halfway.", style="bold"))
    watched, client = _start_watched(work / "cluster", 4)
    cluster = watched.cluster
    try:
        specs = _demo_specs(suite, work / "state")
        answer = client.request("POST", "/v1/tasks", json={"tasks": specs, "run_id": "demo"})
        console.print(f"submitted {len(answer['tasks'])} tasks as run demo (pytest modules with JUnit reports, and shards)")
        killed, killed_at = "", 0.0
        with Live(console=console, refresh_per_second=4) as live:
            while True:
                summary = client.request("GET", "/v1/runs/demo", deadline_s=60)
                done = sum(n for s, n in summary["states"].items() if s in render.TERMINAL)
                view = cluster_view(client)
                line = Text(f"run demo: {done}/{summary['total']} finished " + ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items())))
                note = Text(f"killed the leader {killed} (kill -9) halfway through the run", style="bold yellow") if killed else Text("")
                restarted = _restart_of(watched, killed) if killed else None
                repair = Text(f"recoveryd restarted {killed} {restarted['finished'] - killed_at:.1f}s after the kill", style="bold cyan") \
                    if restarted else Text("")
                live.update(Group(render.status(view), line, note, repair))
                if not killed and done >= summary["total"] // 2 and view["leader"]:
                    killed, killed_at = view["leader"], time.time()
                    os.kill(watched.pid(killed), signal.SIGKILL)
                if summary["done"]:
                    break
                time.sleep(0.25)
        console.print()
        tasks = client.request("GET", "/v1/tasks", params={"run": "demo", "limit": "500"})["tasks"]
        results = [client.request("GET", f"/v1/tasks/{t['id']}") for t in tasks]
        terminal_records = [sum(1 for h in task["history"] if h["to_state"] in render.TERMINAL) for task in results]
        lost = sum(1 for task in results if task["state"] not in render.TERMINAL or task["state"] == "lost")
        console.print(render.run(client.request("GET", "/v1/runs/demo")))
        recovered = _recovered(console, watched, client, killed, killed_at) if killed else None
        retried = sum(1 for task in results if task["attempt"] > 1)
        once = all(n == 1 for n in terminal_records)
        verdict = Text(
            f"{len(results)} tasks: {lost} lost, every result recorded {'exactly once' if once else 'MORE THAN ONCE'}, "
            f"{retried} retried; leader {killed} was killed mid-run and the run finished anyway"
            + (f"; recoveryd brought {killed} back." if recovered else f"; recoveryd did NOT bring {killed} back."),
            style="bold green" if lost == 0 and once and recovered else "bold red",
        )
        console.print(verdict)
        return 0 if lost == 0 and once and recovered and len(results) == len(specs) else 1
    finally:
        client.close()
        cluster.stop_all()  # the workers; the nodes are recoveryd's
        watched.stop_all()
        shutil.rmtree(work, ignore_errors=True)
