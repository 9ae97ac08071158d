"""dtf under a real systemd, run the way an operator runs it: the Debian package, systemctl, dtfctl, journalctl.

The tests share one guest; each starts from a healthy three-node cluster (the `cluster`
fixture starts whatever is not running). The corrupt-log test comes last: if recoveryd
failed to repair the node, the tests after it could not get their cluster.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.support import until
from tests.system.cluster import (
    API, NODES, admin_token, healthy, http, journal, leader_changes, messages, recoveries, start_cluster, unit,
)
from tests.system.container import Container, unavailable

pytestmark = [pytest.mark.system, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

ELECTION = re.compile(r"^dtf\.node: leader node=(\w+) leader=(\w+) term=(\d+) role=(\w+)$")


@pytest.fixture
def cluster(guest: Container) -> dict:
    """The three nodes active and healthy; the `dtfctl status --json` that said so."""
    return start_cluster(guest)


def cursor(guest: Container, unit_name: str) -> str:
    """The journal's current end for a unit, to read only what comes after it."""
    out = guest.run("journalctl", "--no-pager", "-n", "0", "--show-cursor", "-u", unit_name).stdout
    return out.rsplit("-- cursor: ", 1)[1].strip()


def test_three_nodes_start_as_notify_units_and_elect_one_leader(guest: Container) -> None:
    guest.run("systemctl", "start", *(f"dtfd@{n}" for n in NODES), timeout=90)
    for node in NODES:
        props = unit(guest, f"dtfd@{node}.service")
        # systemctl start of a Type=notify unit returns once READY=1 arrived; STATUS= came with it.
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert re.search(r"term=\d+", props["StatusText"]), props
    roles = [n["role"] for n in healthy(guest)["nodes"]]
    assert sorted(roles) == ["follower", "follower", "leader"], roles
    table = guest.run("dtfctl", "status", timeout=30)  # exit 0: healthy, as the README's first commands promise
    assert "healthy" in table.stdout, table.stdout


def test_reload_rereads_tokens_without_a_restart(guest: Container, cluster: dict) -> None:
    token = "system-test-reader-token-0123456789"
    guest.sh(f"printf '\\n[[tokens]]\\nname = \"system-test\"\\nrole = \"reader\"\\ntoken = \"{token}\"\\n' >> /etc/dtf/tokens.toml")
    assert http(guest, "GET", API["node1"] + "/v1/status", token)[0] == 401
    pid = unit(guest, "dtfd@node1.service")["MainPID"]
    since = cursor(guest, "dtfd@node1.service")
    guest.run("systemctl", "reload", "dtfd@node1.service", timeout=60)
    after = messages(guest, "dtfd@node1.service", f"--after-cursor={since}")
    # RELOADING=1 ... READY=1: `systemctl reload` returns once dtfd has re-read its config (the new
    # token works at once, below). dtfd logs before READY=1, but journald may file its stderr line
    # after systemd's own "Reloaded": the order across the two sources is not the journal's to keep.
    order = [next((i for i, m in enumerate(after) if pattern in m), None) for pattern in ("Reloading", "configuration reloaded", "Reloaded")]
    assert None not in order and order[0] < order[1] and order[0] < order[2], after
    props = unit(guest, "dtfd@node1.service")
    assert (props["ActiveState"], props["MainPID"]) == ("active", pid), props
    assert http(guest, "GET", API["node1"] + "/v1/status", token)[0] == 200


def test_killed_leader_is_restarted_by_systemd_and_replaced_meanwhile(guest: Container, cluster: dict) -> None:
    old_leader, old_term = cluster["leader"], cluster["term"]
    name = f"dtfd@{old_leader}.service"
    restarts = int(unit(guest, name)["NRestarts"])
    guest.run("systemctl", "kill", "--signal=KILL", name)
    until(lambda: int((p := unit(guest, name))["NRestarts"]) == restarts + 1 and p["ActiveState"] == "active",
          30, f"{name} restarted by systemd", 0.2)
    healthy(guest)
    successors = [c for c in leader_changes(guest) if c["term"] > old_term]
    assert successors and successors[0]["node"] != old_leader, successors
    assert any("status=9/KILL" in m for m in messages(guest, name)), "systemd did not see the SIGKILL"


def test_stopped_process_is_restarted_by_the_watchdog(guest: Container, cluster: dict) -> None:
    follower = next(n["name"] for n in cluster["nodes"] if n["role"] == "follower")
    name = f"dtfd@{follower}.service"
    restarts = int(unit(guest, name)["NRestarts"])
    guest.run("systemctl", "kill", "--kill-who=main", "--signal=STOP", name)
    # WatchdogSec=10s: no WATCHDOG=1 from the stopped tick loop, so SIGABRT, then Restart=on-failure.
    until(lambda: int((p := unit(guest, name))["NRestarts"]) == restarts + 1 and p["ActiveState"] == "active",
          60, f"{name} restarted after its watchdog fired", 0.5)
    assert any("Watchdog timeout" in m for m in messages(guest, name)), messages(guest, name)[-20:]
    healthy(guest)


def test_stopping_the_leader_hands_leadership_over_and_exits_cleanly(guest: Container, cluster: dict) -> None:
    for _ in range(3):  # the node stopped must still be the leader when SIGTERM arrives; a re-election in between means again
        current = healthy(guest)
        leader, term = current["leader"], current["term"]
        name = f"dtfd@{leader}.service"
        since = cursor(guest, name)
        guest.run("systemctl", "stop", name, timeout=60)
        lines = messages(guest, name, f"--after-cursor={since}")
        transfers = [m for line in lines if (m := re.search(r"leadership transfer node=\w+ to=(\w+)", line))]
        if transfers:
            break
        start_cluster(guest)
    assert transfers, lines
    props = unit(guest, name)
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), props  # exit 0
    assert any("dtfd stopped" in m for m in lines), lines
    assert guest.run("systemctl", "list-units", "--failed", "--plain", "--no-legend", "dtf*", "recoveryd*").stdout.strip() == ""
    # The successor the stopping leader named is the next leader: no election timeout, no other candidate.
    successor = transfers[0].group(1)
    after = until(lambda: [c for c in leader_changes(guest) if c["term"] > term], 30, f"a leader after term {term}")
    assert after[0]["node"] == successor, after


def test_dtf_target_starts_and_stops_the_enabled_nodes(guest: Container, cluster: dict) -> None:
    units = [f"dtfd@{n}.service" for n in NODES]
    guest.run("systemctl", "enable", "--quiet", *units)  # WantedBy=dtf.target
    try:
        # PartOf=dtf.target stops the nodes too; the target itself is down first (it is ordered after them).
        guest.run("systemctl", "stop", "dtf.target", timeout=90)
        until(lambda: all(unit(guest, u)["ActiveState"] == "inactive" for u in units), 60, "every node stopped", 0.2)
        assert [unit(guest, u)["Result"] for u in units] == ["success"] * 3
        guest.run("systemctl", "start", "dtf.target", timeout=90)
        assert [unit(guest, u)["ActiveState"] for u in units] == ["active"] * 3
        healthy(guest)
    finally:
        guest.run("systemctl", "disable", "--quiet", *units)


def test_journal_has_priorities_and_key_value_context(guest: Container, cluster: dict) -> None:
    entries = [e for e in journal(guest, "dtfd@node1.service") if e.get("SYSLOG_IDENTIFIER") == "dtfd"]
    assert entries, "dtfd wrote nothing to the journal"
    # The <N> prefix became the entry's priority; none is left in a message.
    assert not [e["MESSAGE"] for e in entries if str(e["MESSAGE"]).startswith("<")]
    elections = [m for e in entries if (m := ELECTION.match(str(e["MESSAGE"]))) and e["PRIORITY"] == "6"]
    assert elections, [e["MESSAGE"] for e in entries]
    assert all(m.group(1) == "node1" and m.group(4) in ("leader", "follower") for m in elections)
    shown = guest.run("journalctl", "--no-pager", "-o", "cat", "-u", "dtfd@node1.service", "-p", "err").stdout
    assert not any(ELECTION.match(line) or "dtfd started" in line for line in shown.splitlines()), shown


def test_worker_units_run_submitted_tasks(guest: Container, cluster: dict) -> None:
    guest.sh("sed 's/^id = \"\"/id = \"w1\"/' /etc/dtf/worker.toml > /etc/dtf/worker.d/w1.toml")
    guest.run("systemctl", "start", "dtf-worker@w1.service", timeout=60)  # READY=1 after registering
    try:
        passed = guest.run("dtfctl", "tasks", "submit", "--wait", "--run", "system-whoami", "--", "/usr/bin/id", "-un", timeout=120)
        assert "1/1 passed" in passed.stdout, passed.stdout
        (task,) = json.loads(guest.run("dtfctl", "tasks", "list", "--run", "system-whoami", "--json").stdout)["tasks"]
        shown = json.loads(guest.run("dtfctl", "tasks", "show", task["id"], "--json").stdout)
        assert shown["result"]["output_tail"] == "dtf-worker\n", shown["result"]  # the unit's user, not root
        failed = guest.run("dtfctl", "tasks", "submit", "--wait", "--", "/bin/false", check=False, timeout=120)
        assert failed.returncode == 1, failed
    finally:
        guest.run("systemctl", "stop", "dtf-worker@w1.service", timeout=150)
    props = unit(guest, "dtf-worker@w1.service")
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), props


@pytest.mark.parametrize("unit_name, limit", [("dtfd@node1.service", 2.0), ("recoveryd.service", 2.5), ("dtf-worker@w1.service", 3.5)])
def test_units_stay_sandboxed_as_the_running_systemd_judges_them(guest: Container, unit_name: str, limit: float) -> None:
    shown = guest.run("systemd-analyze", "security", "--no-pager", unit_name).stdout
    exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", shown).group(1))
    assert exposure <= limit, shown


def test_recoveryd_reseeds_a_node_whose_log_is_corrupt(guest: Container, cluster: dict) -> None:
    victim = "node1"
    if cluster["leader"] == victim:
        guest.run("dtfctl", "switchover", "--to", "node2", timeout=60)
    token = admin_token(guest)
    for seq in range(1, 21):  # records after the one to be damaged, so it is corruption, not a torn tail
        assert http(guest, "PUT", API["node2"] + f"/v1/kv/system-{seq}", token, {"value": f"v{seq}", "client": "system-test", "seq": seq})[0] == 200
    name = f"dtfd@{victim}.service"
    guest.run("systemctl", "stop", name)
    guest.run("/opt/dtf/bin/python3", "-c", f"""
import pathlib
segment = sorted(pathlib.Path('/var/lib/dtf/{victim}/wal').glob('*.wal'))[0]
data = bytearray(segment.read_bytes())
data[len(data) // 2] ^= 0xFF
segment.write_bytes(data)
""")
    assert guest.run("systemctl", "start", name, check=False, timeout=60).returncode != 0
    props = unit(guest, name)
    # RestartPreventExitStatus=65: systemd leaves a corrupt node alone; recoveryd's job.
    assert (props["ActiveState"], props["ExecMainStatus"], props["NRestarts"]) == ("failed", "65", "0"), props
    try:
        guest.run("systemctl", "start", "recoveryd.service", timeout=60)
        reseeds = until(lambda: [a for a in recoveries(guest, victim) if a["action"] == "reseed" and a["result"] == "ok"],
                        120, f"recoveryd reseeds {victim}", 0.5)
        assert "exited 65" in reseeds[0]["evidence"]["reason"], reseeds[0]
        healthy(guest)
        code, body = http(guest, "GET", API[victim] + "/v1/kv/system-20?stale=ok", token)  # its own copy, sent by the leader
        assert (code, body["value"]) == (200, "v20"), body
        assert guest.sh(f"ls -d /var/lib/dtf/{victim}.backup-*").stdout.strip(), "the damaged data was not kept"
    finally:
        guest.run("systemctl", "stop", "recoveryd.service", timeout=60)
    # The journal: the corruption is an error line; -p err shows nothing below that priority.
    errors = journal(guest, name, "-p", "err")
    assert any("corrupt" in str(e.get("MESSAGE")) and e.get("SYSLOG_IDENTIFIER") == "dtfd" for e in errors), errors
    assert all(int(e["PRIORITY"]) <= 3 for e in errors), errors
