"""The core stays sans-IO: no clock, no network, no threads, no hidden randomness.

That is what makes the simulator's fault schedules replayable from a seed.
"""

import ast
import pathlib

import pytest

import dtfd.raft
from dtfd.raft.messages import encode

from tests.unit.raft_net import Net, first_campaign_tick

RAFT_DIR = pathlib.Path(dtfd.raft.__file__).parent
MODULES = sorted(RAFT_DIR.glob("*.py"))
FORBIDDEN = {"trio", "socket", "os", "time", "threading", "asyncio", "select", "subprocess", "secrets"}


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def global_random_uses(tree: ast.AST) -> list[str]:
    """Calls into the `random` module itself (random.random(), randint, a fresh Random(), ...)."""
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name == "random"}
    uses = [
        f"line {n.lineno}: {ast.unparse(n.func)}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id in aliases
    ]
    uses += [
        f"line {n.lineno}: from random import {a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "random"
        for a in n.names
        if a.name != "Random"
    ]
    return uses


def test_modules_found():
    """The checks below are only as good as the list of files they read."""
    assert {p.name for p in MODULES} >= {"__init__.py", "core.py", "messages.py", "config.py", "ready.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_imports_no_io_clock_or_threads(path):
    """Any of these would make a run depend on the machine instead of the inputs."""
    assert imported_modules(ast.parse(path.read_text())) & FORBIDDEN == set()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_uses_only_the_injected_rng(path):
    """Randomness comes from Config.rng only, so a seed replays a run exactly."""
    assert global_random_uses(ast.parse(path.read_text())) == []


def test_the_checks_catch_what_they_look_for():
    """Guard against a checker that silently passes everything."""
    bad = ast.parse("import os.path\nfrom time import monotonic\nimport random as r\nfrom random import randint\nr.random()\nr.Random()\n")
    assert imported_modules(bad) >= {"os", "time"}
    assert len(global_random_uses(bad)) == 3


def run_trace(seed: int) -> list[bytes]:
    """Every message of a 5-node election, some proposals and a leader crash, encoded."""
    net = Net(5, seed=seed)
    net.tick_until(lambda: len(net.leaders()) == 1)
    for i in range(5):
        net.propose(net.leader(), b"%d" % i)
    net.crash(net.leader())
    net.tick_until(lambda: len(net.leaders()) == 1)
    return [encode(m) for m in net.sent]


def test_same_seed_same_message_sequence():
    """Determinism: the simulator can replay a failing schedule from its seed."""
    assert run_trace(7) == run_trace(7)


def test_different_seeds_different_runs():
    """The seed really drives the timeouts: otherwise every schedule would be the same one."""
    assert run_trace(7) != run_trace(8)
    assert len({first_campaign_tick(seed) for seed in range(10)}) > 1
