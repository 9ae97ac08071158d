"""dtfctl: the operator's CLI. Human tables by default, `--json` for scripts.

Exit codes: 0 ok; 1 a failure the command reports (degraded cluster, failed tasks, a
refused request); 2 no quorum or no node reachable; 64 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
import traceback
import uuid
from pathlib import Path

import tomli_w
from rich.console import Console

from dtfd.ctl import render
from dtfd.ctl.client import Client, CtlError, Target

EX_USAGE = 64
LAG_DEGRADED = 1000  # entries behind the leader that make a node count as lagging


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default exit 2 would mean "no quorum" here
        self.print_usage(sys.stderr)
        print(f"dtfctl: {message}", file=sys.stderr)
        sys.exit(EX_USAGE)


def _common(defaults: bool) -> Parser:
    """Options accepted before or after the subcommand (`dtfctl --json status`, `dtfctl status --json`)."""
    common = Parser(add_help=False)
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    common.add_argument("--cluster", default=default(None), help="node URLs, comma-separated (default: $DTF_CLUSTER or the config file)")
    common.add_argument("--token", default=default(None), help="bearer token (default: $DTF_TOKEN or the config file)")
    common.add_argument("--config", default=default(None), help="dtfctl config file (default: ~/.config/dtf/dtfctl.toml, else /etc/dtf/dtfctl.toml)")
    common.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")
    common.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    return common


class _Sub(Parser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parents", [_common(defaults=False)])
        super().__init__(*args, **kwargs)


def build_parser() -> Parser:
    parser = Parser(prog="dtfctl", description="Operate a dtf cluster.", parents=[_common(defaults=True)])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Sub)

    status = sub.add_parser("status", help="one row per node; exit 0 healthy, 1 degraded, 2 no quorum")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    switch = sub.add_parser("switchover", help="hand leadership to another node and wait for it")
    switch.add_argument("--to", default="", help="target node (default: the most caught-up follower)")
    sub.add_parser("history", help="leader changes and recovery actions, as the cluster recorded them")

    tasks = sub.add_parser("tasks", help="submit, list, show and cancel tasks").add_subparsers(dest="action", required=True, parser_class=_Sub)
    submit = tasks.add_parser("submit", help="argv after --, or --file with a whole run")
    submit.add_argument("--file", help="TOML or JSON: run_id, defaults, [[tasks]] with argv and options")
    submit.add_argument("--run", default="", help="run id grouping the tasks (default: a new one)")
    submit.add_argument("--name", default="")
    submit.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="required worker label")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds")
    submit.add_argument("--retries", type=int, default=0)
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--junit", default="", help="JUnit XML path the task writes, relative to its cwd")
    submit.add_argument("--wait", action="store_true", help="show progress; exit 0 only if every task passed")
    submit.add_argument("argv", nargs=argparse.REMAINDER)
    listing = tasks.add_parser("list")
    listing.add_argument("--run", default="")
    listing.add_argument("--state", default="")
    listing.add_argument("--worker", default="")
    listing.add_argument("--limit", type=int, default=100)
    show = tasks.add_parser("show")
    show.add_argument("id")
    cancel = tasks.add_parser("cancel")
    cancel.add_argument("id")

    runs = sub.add_parser("runs", help="test runs: totals, failures, slowest tests").add_subparsers(dest="action", required=True, parser_class=_Sub)
    runs.add_parser("list")
    run_show = runs.add_parser("show")
    run_show.add_argument("run")

    workers = sub.add_parser("workers", help="list workers, drain or undrain one").add_subparsers(dest="action", required=True, parser_class=_Sub)
    workers.add_parser("list")
    for action in ("drain", "undrain"):
        workers.add_parser(action).add_argument("id")

    config = sub.add_parser("config", help="write a working config set").add_subparsers(dest="action", required=True, parser_class=_Sub)
    init = config.add_parser("init", help="cluster, node, worker and dtfctl configs with generated secrets (files 0600)")
    init.add_argument("--dir", default=".", help="where to write (default: .)")
    init.add_argument("--nodes", type=int, default=3)
    init.add_argument("--workers", type=int, default=1)

    dev = sub.add_parser("dev", help="a local cluster without root or systemd").add_subparsers(dest="action", required=True, parser_class=_Sub)
    up = dev.add_parser("up", help="start dtfd nodes and dtf-workers on loopback until Ctrl-C")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--workers", type=int, default=4)
    up.add_argument("--dir", default="", help="keep configs, data and logs here (default: a temp dir)")
    sub.add_parser("demo", help="a cluster, a test run, a leader failover and a summary, in under a minute")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False, highlight=False)
    try:
        if args.command == "config":
            return _config_init(args, console)
        if args.command in ("dev", "demo"):
            from dtfd.ctl import dev

            return dev.up(args, console) if args.command == "dev" else dev.demo(console)
        client = Client(Target.resolve(args.cluster, args.token, args.config))
        try:
            return COMMANDS[args.command](client, args, console)
        finally:
            client.close()
    except CtlError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dtfctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dtfctl ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug here: still one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"dtfctl: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _emit(console: Console, args: argparse.Namespace, data: object, table: object) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        console.print(table)


# ---- status -------------------------------------------------------------------------


def cluster_view(client: Client) -> dict:
    """Every node's view, the leader they agree on, and the verdict with its exit code."""
    nodes = []
    for url in client.target.urls:
        status = client.node(url, "/v1/status")
        nodes.append({"url": url, "up": status is not None, "status": status or {}})
    up = [n for n in nodes if n["up"]]
    leaders = [n for n in up if n["status"].get("role") == "leader"]
    leader = max(leaders, key=lambda n: n["status"]["term"]) if leaders else None
    size = len(nodes)
    agreeing = [n for n in up if leader and n["status"].get("leader") == leader["status"]["id"]]
    problems = []
    for n in nodes:
        s = n["status"]
        n["name"] = s.get("id", n["url"].split("://", 1)[-1])
        if not n["up"]:
            n["state"], n["checksum_ok"] = "down", None
            problems.append(f"{n['url']} is down")
            continue
        n["lag"] = 0
        n["checksum_ok"] = None
        if leader and s.get("id") != leader["status"]["id"]:
            peer = leader["status"].get("peers", {}).get(s.get("id"), {})
            n["lag"] = peer.get("lag", leader["status"]["last_index"] - s.get("applied_index", 0))
        if leader and s.get("applied_index") == leader["status"]["applied_index"]:
            n["checksum_ok"] = s.get("checksum") == leader["status"]["checksum"]
        n["state"] = "up"
        if n["checksum_ok"] is False:
            n["state"] = "degraded"
            problems.append(f"{n['name']} diverged: checksum differs at the leader's applied index")
        elif n["lag"] > LAG_DEGRADED or (leader and s.get("leader") != leader["status"]["id"]):
            n["state"] = "degraded"
            problems.append(f"{n['name']} is lagging or does not follow the leader")
    quorum = leader is not None and len(agreeing) > size // 2
    code = 2 if not quorum else (1 if problems else 0)
    verdict = {0: "healthy", 1: "degraded", 2: "no quorum"}[code]
    counts = leader["status"] if leader else {}
    return {
        "verdict": verdict,
        "exit_code": code,
        "leader": leader["status"]["id"] if leader else "",
        "term": leader["status"]["term"] if leader else None,
        "quorum": f"{len(agreeing)}/{size}",
        "tasks": counts.get("tasks", {}),
        "workers": counts.get("workers", {}),
        "problems": problems,
        "nodes": [
            {
                "name": n["name"],
                "url": n["url"],
                "state": n["state"],
                "role": n["status"].get("role", ""),
                "term": n["status"].get("term"),
                "commit_index": n["status"].get("commit_index"),
                "applied_index": n["status"].get("applied_index"),
                "lag": n.get("lag"),
                "checksum_ok": n["checksum_ok"],
                "uptime_s": n["status"].get("uptime_s"),
            }
            for n in nodes
        ],
    }


def cmd_status(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.watch and not args.json:
        from rich.live import Live

        with Live(render.status(cluster_view(client)), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(1.0)
                live.update(render.status(cluster_view(client)))
    view = cluster_view(client)
    _emit(console, args, view, render.status(view))
    return view["exit_code"]


def cmd_switchover(client: Client, args: argparse.Namespace, console: Console) -> int:
    before = cluster_view(client)
    if not before["leader"]:
        raise CtlError("no leader to switch over from", 2)
    answer = client.request("POST", "/v1/leadership/transfer", json={"to": args.to})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        view = cluster_view(client)
        if view["leader"] and view["leader"] != before["leader"]:
            result = {"from": before["leader"], "to": view["leader"], "term": view["term"]}
            _emit(console, args, result, f"switched over: {result['from']} -> {result['to']} (term {result['term']})")
            return 0 if not args.to or view["leader"] == args.to else 1
        time.sleep(0.1)
    raise CtlError(f"leadership did not move from {before['leader']} to {answer.get('to')} within 10 s")


def cmd_history(client: Client, args: argparse.Namespace, console: Console) -> int:
    data = client.request("GET", "/v1/history")
    _emit(console, args, data, render.history(data))
    return 0


# ---- tasks, runs, workers ---------------------------------------------------------------


def _specs_from_file(path: str) -> tuple[str, list[dict]]:
    text = Path(path).read_text()
    try:
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CtlError(f"{path}: {exc}") from None
    defaults = data.get("defaults", {})
    tasks = [{**defaults, **task} for task in data.get("tasks", [])]
    if not tasks:
        raise CtlError(f"{path}: no [[tasks]]")
    return data.get("run_id", ""), tasks


def cmd_tasks(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.action == "submit":
        return _submit(client, args, console)
    if args.action == "list":
        params = {k: v for k, v in (("run", args.run), ("state", args.state), ("worker", args.worker)) if v}
        data = client.request("GET", "/v1/tasks", params={**params, "limit": str(args.limit)})
        _emit(console, args, data, render.tasks(data["tasks"]))
        return 0
    if args.action == "show":
        data = client.request("GET", f"/v1/tasks/{args.id}")
        _emit(console, args, data, render.task(data))
        return 0
    data = client.request("POST", f"/v1/tasks/{args.id}/cancel")
    _emit(console, args, data, f"task {args.id}: {'cancel requested' if data.get('cancel_requested') else data.get('state')}")
    return 0


def _submit(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.file:
        run_id, specs = _specs_from_file(args.file)
        run_id = args.run or run_id
    else:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise CtlError("nothing to run: give argv after --, or --file", EX_USAGE)
        labels = dict(item.split("=", 1) for item in args.label if "=" in item)
        specs = [{"argv": argv, "name": args.name, "timeout_s": args.timeout, "max_retries": args.retries,
                  "priority": args.priority, "junit": args.junit, "requirements": {"labels": labels}}]
        run_id = args.run
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    answer = client.request("POST", "/v1/tasks", json={"tasks": specs, "run_id": run_id, "client": f"dtfctl-{uuid.uuid4().hex}", "seq": 1})
    if not args.wait:
        data = {"run_id": run_id, "tasks": answer["tasks"]}
        _emit(console, args, data, f"submitted {len(answer['tasks'])} task(s) as run {run_id}")
        return 0
    summary = wait_for_run(client, run_id, len(specs), console, quiet=args.json)
    _emit(console, args, summary, render.run(summary))
    return 0 if summary["states"].get("succeeded", 0) == summary["total"] else 1


def wait_for_run(client: Client, run_id: str, total: int, console: Console, quiet: bool = False) -> dict:
    """Poll the run until every task ended, with a progress bar; rides through failovers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet, transient=False) as progress:
        bar = progress.add_task(f"run {run_id}", total=total)
        while True:
            summary = client.request("GET", f"/v1/runs/{run_id}", deadline_s=60)  # linearizable: sees our own submit
            done = sum(n for state, n in summary["states"].items() if state in render.TERMINAL)
            failed = sum(n for state, n in summary["states"].items() if state in render.FAILED)
            progress.update(bar, completed=done, description=f"run {run_id} ({failed} failed)" if failed else f"run {run_id}")
            if summary["done"]:
                return summary
            time.sleep(0.25)


def cmd_runs(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.action == "list":
        data = client.request("GET", "/v1/runs")
        _emit(console, args, data, render.runs(data["runs"]))
        return 0
    data = client.request("GET", f"/v1/runs/{args.run}")
    _emit(console, args, data, render.run(data))
    return 0 if data["done"] and data["states"].get("succeeded", 0) == data["total"] else 1


def cmd_workers(client: Client, args: argparse.Namespace, console: Console) -> int:
    if args.action == "list":
        data = client.request("GET", "/v1/workers")
        _emit(console, args, data, render.workers(data["workers"]))
        return 0
    data = client.request("POST", f"/v1/workers/{args.id}/drain", json={"draining": args.action == "drain"})
    _emit(console, args, data, f"worker {args.id}: {data['state']}")
    return 0


# ---- config init ------------------------------------------------------------------------


def _config_init(args: argparse.Namespace, console: Console) -> int:
    from dtfd.devcluster import write_configs, write_worker_config

    if not 1 <= args.nodes <= 9 or not 0 <= args.workers <= 64:
        raise CtlError("--nodes 1..9, --workers 0..64", EX_USAGE)
    directory = Path(args.dir).resolve()
    files = write_configs(directory, nodes=args.nodes)
    workers = [write_worker_config(files, f"worker{n + 1}") for n in range(args.workers)]
    client_config = directory / "dtfctl.toml"
    client_config.write_text(tomli_w.dumps({"cluster": [f"http://{a}" for a in files.api.values()], "token": files.admin_token}))
    client_config.chmod(0o600)
    written = {"cluster": str(files.config), "workers": [str(w) for w in workers], "dtfctl": str(client_config)}
    message = "\n".join(
        [f"wrote {files.config} (+ cluster.secret, tokens.toml), {len(workers)} worker config(s), {client_config}",
         "start the nodes:  " + "; ".join(f"dtfd --config {files.config} --node {n}" for n in files.node_ids),
         f"then:             dtfctl --config {client_config} status"]
    )
    _emit(console, args, written, message)
    return 0


COMMANDS = {
    "status": cmd_status,
    "switchover": cmd_switchover,
    "history": cmd_history,
    "tasks": cmd_tasks,
    "runs": cmd_runs,
    "workers": cmd_workers,
}

