"""dtf as an operator sees it in the guest: units through systemctl, the cluster through dtfctl and HTTP."""

from __future__ import annotations

import json

from tests.integration.support import until
from tests.system.container import Container, GuestError

NODES = ("node1", "node2", "node3")
RECOVERYD = "http://127.0.0.1:7090"
API = {"node1": "http://127.0.0.1:7001", "node2": "http://127.0.0.1:7002", "node3": "http://127.0.0.1:7003"}
# A small client on the package's own venv: METHOD URL TOKEN [JSON BODY] -> {"status", "body"} on stdout.
_HTTP = """
import json, sys, httpx
method, url, token, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None
reply = httpx.request(method, url, headers={"Authorization": "Bearer " + token} if token else {}, content=body, timeout=5)
try:
    parsed = reply.json()
except ValueError:
    parsed = reply.text
print(json.dumps({"status": reply.status_code, "body": parsed}))
"""


def unit(guest: Container, name: str) -> dict[str, str]:
    """The properties of a unit that the tests read, from `systemctl show`."""
    props = "ActiveState,SubState,Result,MainPID,NRestarts,ExecMainCode,ExecMainStatus,StatusText"
    shown = guest.run("systemctl", "show", f"--property={props}", name).stdout
    return dict(line.partition("=")[::2] for line in shown.splitlines())


def status(guest: Container) -> dict:
    """`dtfctl status --json` (root's default config, written by the package); exit_code is dtfctl's."""
    done = guest.run("dtfctl", "status", "--json", check=False, timeout=30)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"exit_code": done.returncode, "error": done.stderr}


def healthy(guest: Container, timeout: float = 60) -> dict:
    """Every node up and in agreement, one leader: `dtfctl status` exits 0."""
    return until(lambda: (s := status(guest)).get("exit_code") == 0 and s.get("leader") and s, timeout, "dtfctl status healthy", 0.2)


def start_cluster(guest: Container) -> dict:
    guest.run("systemctl", "reset-failed", *(f"dtfd@{n}.service" for n in NODES), check=False)
    guest.run("systemctl", "start", *(f"dtfd@{n}.service" for n in NODES), timeout=90)
    return healthy(guest)


def admin_token(guest: Container) -> str:
    for line in guest.run("cat", "/etc/dtf/dtfctl.toml").stdout.splitlines():
        if line.startswith("token"):
            return line.split('"')[1]
    raise AssertionError("no token in /etc/dtf/dtfctl.toml")


def http(guest: Container, method: str, url: str, token: str, body: object = None) -> tuple[int, object]:
    argv = ["/opt/dtf/bin/python3", "-c", _HTTP, method, url, token, *([json.dumps(body)] if body is not None else [])]
    reply = json.loads(guest.run(*argv, timeout=30).stdout)
    return reply["status"], reply["body"]


def journal(guest: Container, unit_name: str, *options: str) -> list[dict]:
    """The unit's journal entries as journalctl's JSON objects."""
    out = guest.run("journalctl", "--no-pager", "-o", "json", "-u", unit_name, *options).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(guest: Container, unit_name: str, *options: str) -> list[str]:
    return [str(entry.get("MESSAGE", "")) for entry in journal(guest, unit_name, *options)]


def leader_changes(guest: Container) -> list[dict]:
    """Every leader the cluster recorded, as `dtfctl history` shows them: node, term, at."""
    done = guest.run("dtfctl", "history", "--json", check=False, timeout=30)
    return json.loads(done.stdout)["leaders"] if done.returncode == 0 else []


def recoveries(guest: Container, node: str) -> list[dict]:
    """recoveryd's own record of its actions on `node` (GET /v1/history on its listen address)."""
    try:
        code, body = http(guest, "GET", f"{RECOVERYD}/v1/history?node={node}", "")
    except GuestError:  # not listening yet
        return []
    return body["actions"] if code == 200 else []
