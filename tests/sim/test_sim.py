"""The simulator over many seeds: invariants hold, proposals are acknowledged and applied, liveness is bounded.

The 500-seed batch runs once per module (two worker processes) and the tests below
read its results; each failure message carries the replay command.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dtfd.raft import Config, Message, MessageType, Raft, Role
from tests.sim.__main__ import main
from tests.sim.harness import Params, Result, percentiles, run_many, run_seed
from tests.sim.invariants import SAFETY

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2000
JOBS = 2


@pytest.fixture(scope="module")
def mixed() -> list[Result]:
    """300 seeds of 3 nodes and 200 of 5, mixed faults, 2000 steps of chaos each."""
    three = run_many(range(300), Params(nodes=3, steps=STEPS), JOBS)
    five = run_many(range(1000, 1200), Params(nodes=5, steps=STEPS), JOBS)
    return [*three, *five]


def _failures(results: list[Result], invariants: tuple[str, ...]) -> str:
    return "\n\n".join(r.report() for r in results if r.violation in invariants)


def test_safety_invariants_hold_over_500_seeds_of_mixed_faults(mixed: list[Result]) -> None:
    assert len(mixed) == 500
    assert not _failures(mixed, SAFETY)


def test_the_faults_really_happen(mixed: list[Result]) -> None:
    """A quiet run proves nothing: crashes (some losing unsynced writes), elections and snapshots occur."""
    total = {k: sum(r.stats[k] for r in mixed) for k in mixed[0].stats}
    assert total["crashes"] > 5 * len(mixed)
    assert total["writes_lost"] > len(mixed)
    assert total["leaders"] > 5 * len(mixed)
    assert total["snapshots_installed"] > len(mixed)
    assert total["snapshot_chunks"] > 3 * total["snapshots_installed"]  # InstallSnapshot is chunked
    assert total["dropped"] > 0 and total["duplicated"] > 0
    assert sum(1 for r in mixed if r.stats["snapshots_installed"]) > len(mixed) // 2


def test_every_seed_converges_after_healing_with_every_proposal_applied(mixed: list[Result]) -> None:
    assert not _failures(mixed, ("liveness",))
    assert all(r.ok and r.acked > 0 for r in mixed)
    elect = percentiles([r.elect_ticks for r in mixed if r.elect_ticks is not None])
    converge = percentiles([r.converge_ticks for r in mixed if r.converge_ticks is not None])
    assert elect["max"] <= Params.election_bound
    assert converge["max"] <= Params.converge_bound


def test_follower_catches_up_after_its_only_inflight_append_is_lost() -> None:
    """A stall the simulator found (liveness, ~15% of seeds), reduced: max_inflight 1, one APPEND lost."""
    ids = ("n1", "n2", "n3")
    cores = {i: Raft(Config(id=i, voters=ids, rng=random.Random(n), max_inflight=1)) for n, i in enumerate(ids)}

    def pump(drop: Callable[[Message], bool] = lambda m: False) -> None:
        while any(r.has_ready() for r in cores.values()):
            for r in cores.values():
                if r.has_ready():
                    rd = r.ready()
                    r.advance(rd)
                    for m in rd.messages:
                        if not drop(m):
                            cores[m.dst].step(m)

    leader = cores["n1"]
    while leader.role is not Role.LEADER:
        leader.tick()
        pump()
    leader.propose(b"lost on the way to n2")
    pump(drop=lambda m: m.type is MessageType.APPEND and m.dst == "n2")
    for _ in range(200):
        for r in cores.values():
            r.tick()
        pump()
    assert cores["n2"].log.last_index == leader.log.last_index


def test_acknowledged_proposals_are_applied_on_every_node() -> None:
    """A seed the stalling core bug does not hit converges fully."""
    result = run_seed(3, Params(nodes=5, steps=STEPS))
    assert result.ok, result.report()
    assert result.acked > 100
    assert result.elect_ticks is not None and result.converge_ticks is not None


@pytest.mark.parametrize("profile", ["fig8", "vote_crash", "stale_votes", "demo"])
def test_targeted_fault_profiles_find_nothing_in_a_correct_core(profile: str) -> None:
    results = list(run_many(range(40), Params(nodes=3, steps=1500, profile=profile), JOBS))
    assert not _failures(results, SAFETY)


def test_same_seed_same_run() -> None:
    params = Params(nodes=5, steps=1500, hashing=True)
    first, second = run_seed(11, params), run_seed(11, params)
    assert first.trace_hash and first.trace_hash == second.trace_hash
    assert (first.stats, first.acked, first.elect_ticks) == (second.stats, second.acked, second.elect_ticks)
    assert run_seed(12, params).trace_hash != first.trace_hash


def test_same_seed_same_trace_across_interpreters_and_hash_seeds() -> None:
    """No dependence on set order or id(): PYTHONHASHSEED changes nothing."""
    hashes = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-m", "tests.sim", "--seed", "5", "--nodes", "5", "--steps", "800"],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        hashes.add(next(line for line in out.splitlines() if "trace hash" in line))
    assert len(hashes) == 1


def test_a_failing_seed_prints_its_replay_command_and_trace(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--seed", "0", "--nodes", "3", "--steps", "300", "--bug", "forget_vote_persist", "--trace", "20"])
    out = capsys.readouterr().out
    assert status == 1
    assert "invariant violated" in out
    assert "replay: python -m tests.sim --seed 0 --nodes 3 --steps 300 --bug forget_vote_persist" in out
    assert "VIOLATION" in out


def test_many_seeds_report_rate_and_liveness(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--seeds", "6", "--nodes", "3", "--steps", "500"])
    out = capsys.readouterr().out
    assert "seeds/s" in out
    assert "leader elected after healing" in out


def test_demo_tells_the_story_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "is elected leader" in out
    assert "crashes" in out
    assert "partition leader" in out
    assert "Verdict: every invariant held" in out
    assert "Liveness after healing" in out
