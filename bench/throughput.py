"""Write throughput: committed writes/s and latency, 1 sequential client and 64 concurrent, dtf beside its peers.

    .venv/bin/python bench/throughput.py [--quick] [--seconds S] [--profile] [--systems dtf,etcd,pysyncobj]

Three nodes on loopback, fsync on, one command per request, and for dtf also batches of
BATCH commands per request (`POST /v1/kv`, one replicated entry; its rate is counted in
commands/s, its latency per request). The load comes from wrk (apt-get install -y
wrk), not from Python, whose HTTP clients top out near 400-600 requests/s here: wrk runs
one thread per connection, so each connection is one client with its own id and
increasing seq (dtf applies a retried (client, seq) once; a connection with several
requests in flight could reorder them). Requests go to the leader. Beside each system
the generator's ceiling is measured against `GET /health` of the same node with the
same connections, and the CPU used by the generator and each node is shown, so a
saturated generator would show.

etcd (apt-get install -y etcd-server etcd-client) gets the same wrk load on its JSON
gateway, `POST /v3/kv/put`. PySyncObj has no client protocol: an application embeds a
cluster member, so its load runs inside the leader process (bench/pysyncobj_kv.py,
N commands outstanding through callbacks), with no HTTP in the path.

--profile adds one more run of 1 and of 64 clients on dtf with py-spy sampling the leader (not
counted in the table) and prints where the leader's CPU goes. Nothing here fails on timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Cluster, Dtf, Etcd, PySyncObj, Timing, machine_line  # noqa: E402

WHOLE_DEADLINE_S = 60.0
IDLE_LEAVES = {"WorkerThread._work", "EpollIOManager.get_events"}  # trio's idle thread cache and its wait for I/O
WRK_SCRIPT = r"""
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(s)
  return ((s:gsub(".", function(c)
    local r, b = "", c:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({"", "==", "="})[#s % 3 + 1])
end

function init(args)
  kind, token, client, seq = args[1], args[2], args[3] .. "-" .. tid, 0
end

function request()
  seq = seq + 1
  local key = client .. "-" .. seq
  if kind == "dtf" then
    local body = '{"value":"x","client":"' .. client .. '","seq":' .. seq .. '}'
    return wrk.format("PUT", "/v1/kv/" .. key, {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}, body)
  elseif kind == "dtf-batch" then
    local ops = {}
    for i = 1, BATCH do ops[i] = '{"op":"put","key":"' .. key .. '-' .. i .. '","value":"x"}' end
    local body = '{"ops":[' .. table.concat(ops, ",") .. '],"client":"' .. client .. '","seq":' .. seq .. '}'
    return wrk.format("POST", "/v1/kv", {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}, body)
  elseif kind == "etcd" then
    return wrk.format("POST", "/v3/kv/put", {["Content-Type"] = "application/json"}, '{"key":"' .. b64(key) .. '","value":"eA=="}')
  end
  return wrk.format("GET", "/health")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


BATCH = 100  # commands per batch request

@dataclass
class Row:
    system: str
    load: str
    clients: int
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    cpu: str  # CPU used during the run, % of one core: generator and nodes


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    times = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            times[name] = t.user + t.system
        except psutil.NoSuchProcess:
            times[name] = 0.0
    return times


def run_wrk(script: Path, url: str, kind: str, token: str, clients: int, seconds: float, watch: dict[str, int]) -> tuple[dict, str]:
    """Run wrk with one thread per connection; its RESULT line and the CPU use of it and `watch`."""
    command = ["wrk", f"-t{clients}", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script), url, "--", kind, token, f"c{time.monotonic_ns()}"]
    before = cpu_seconds(watch)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        generator = psutil.Process(proc.pid)
        generator_cpu = 0.0
        while proc.poll() is None:
            try:
                t = generator.cpu_times()
                generator_cpu = t.user + t.system
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    after = cpu_seconds(watch)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"wrk printed no result: {output[-2000:]}")
    usage = {"wrk": generator_cpu, **{n: after[n] - before[n] for n in watch}}
    cpu = " ".join(f"{n} {100 * s / elapsed:.0f}%" for n, s in usage.items())
    return json.loads(lines[-1][len("RESULT ") :]), cpu


def wrk_rows(cluster: Cluster, kind: str, token: str, script: Path, seconds: float) -> list[Row]:
    leader = cluster.wait_whole(WHOLE_DEADLINE_S)
    url = cluster.base_url(leader)
    pids = {("leader" if n == leader else n): cluster.pid(n) for n in cluster.nodes}
    rows = []
    loads = {"GET /health": ("health", 1), "write": (kind, 1)}
    if kind == "dtf":
        loads[f"batch x{BATCH}"] = ("dtf-batch", BATCH)
    for clients in (1, 64):
        for load, (lua_kind, per_request) in loads.items():
            result, cpu = run_wrk(script, url, lua_kind, token, clients, seconds, pids)
            ok = (result["requests"] - result["non2xx"]) * per_request
            rate = ok / (result["duration_us"] / 1e6)
            failed = result["non2xx"] + result["socket_errors"]
            rows.append(Row(cluster.name, load, clients, rate, result["p50_us"] / 1000, result["p99_us"] / 1000, failed, cpu))
            print(f"  {cluster.name} {load} x{clients}: {rate:,.0f}/s", flush=True)
    return rows


def pysyncobj_rows(cluster: PySyncObj, seconds: float) -> list[Row]:
    leader = cluster.wait_whole(WHOLE_DEADLINE_S)
    pids = {("leader" if n == leader else n): cluster.pid(n) for n in cluster.nodes}
    rows = []
    with httpx.Client(timeout=seconds + 30) as client:
        for clients in (1, 64):
            before, started = cpu_seconds(pids), time.monotonic()
            result = client.post(f"{cluster.base_url(leader)}/bench", params={"clients": clients, "seconds": seconds}).json()
            elapsed, after = time.monotonic() - started, cpu_seconds(pids)
            cpu = " ".join(f"{n} {100 * (after[n] - before[n]) / elapsed:.0f}%" for n in pids)
            rate = result["writes"] / result["seconds"]
            rows.append(Row(cluster.name, "write, in-process", clients, rate, result["p50_ms"], result["p99_ms"], result["failed"], cpu))
            print(f"  {cluster.name} write x{clients}: {rate:,.0f}/s", flush=True)
    return rows


def profile(cluster: Dtf, script: Path, clients: int, seconds: float, out: Path) -> None:
    """Sample the dtf leader with py-spy under `clients` clients; print its hottest functions."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    leader = cluster.wait_whole(WHOLE_DEADLINE_S)
    raw = out / f"dtf-leader-{clients}.raw"
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(cluster.pid(leader)), "--duration", str(int(seconds)), "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        run_wrk(script, cluster.base_url(leader), "dtf", cluster.files.admin_token, clients, seconds, {})
        spy.wait(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    summarize_profile(raw, f"py-spy on the dtf leader, {clients} clients, 200 Hz for {seconds:.0f} s")


def summarize_profile(raw: Path, heading: str) -> None:
    """The hottest functions of a py-spy raw profile, by own and inclusive busy samples."""
    if not raw.exists():
        print("py-spy wrote no profile (needs ptrace: run as root or with CAP_SYS_PTRACE)")
        return
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" for f in stack.split(";") if f]
        if not frames:
            continue
        n = int(count)
        if frames[-1].split(" (")[0] in IDLE_LEAVES:
            idle += n
            continue
        busy += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"\n{heading}: {busy} busy samples, {idle} idle waits left out")
    print(f"{'own %':>6}  function (file), share of busy samples, all threads")
    for frame, n in own.most_common(15):
        print(f"{100 * n / max(busy, 1):>6.1f}  {frame}")
    print(f"\n{'incl %':>6}  function (file)")
    for frame, n in total.most_common(25):
        print(f"{100 * n / max(busy, 1):>6.1f}  {frame}")
    print(f"(raw stacks: {raw})")


def print_table(rows: list[Row]) -> None:
    print(f"\nThroughput, 3 nodes on loopback, fsync on; ok/s counts commands (a batch request carries {BATCH})")
    print(f"{'system':<10} {'load':<18} {'clients':>7} {'ok/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6}  CPU % of a core")
    for r in rows:
        print(f"{r.system:<10} {r.load:<18} {r.clients:>7} {r.ok_per_s:>9,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.failed:>6}  {r.cpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--profile", action="store_true", help="also sample the dtf leader with py-spy")
    parser.add_argument("--systems", default="dtf,etcd,pysyncobj", help="comma-separated; etcd is skipped when not installed")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    timing = Timing()
    rows: list[Row] = []
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="dtf-throughput-") as tmp:
        script = Path(tmp) / "put.lua"
        script.write_text(WRK_SCRIPT.replace("BATCH", str(BATCH)))
        for name in args.systems.split(","):
            directory = Path(tmp) / name
            if name == "etcd" and not Etcd.installed():
                print("etcd: not installed (apt-get install -y etcd-server etcd-client), skipped")
                continue
            cluster: Cluster = {"dtf": Dtf, "etcd": Etcd, "pysyncobj": PySyncObj}[name](directory, timing)
            print(f"{name}: {seconds:.0f} s per run", flush=True)
            try:
                cluster.start_all()
                if isinstance(cluster, PySyncObj):
                    rows += pysyncobj_rows(cluster, seconds)
                else:
                    token = cluster.files.admin_token if isinstance(cluster, Dtf) else ""
                    rows += wrk_rows(cluster, name, token, script, seconds)
                    if args.profile and isinstance(cluster, Dtf):
                        out = Path(tempfile.mkdtemp(prefix="dtf-profile-"))
                        for clients in (1, 64):
                            profile(cluster, script, clients, seconds, out)
            except (TimeoutError, RuntimeError) as exc:
                print(f"  {name}: stopped early, results so far kept: {exc}\n{cluster.post_mortem()}", flush=True)
            finally:
                cluster.stop_all()
    print(f"\nat the end, {machine_line()}")
    print_table(rows)


if __name__ == "__main__":
    main()
