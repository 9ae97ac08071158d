"""The checker on hand-made histories, linearizable and not, and against brute force."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos.linearizability import KeyFailure, Op, check, check_key, lost_writes, step


def w(client: str, value: str | None, start: float, end: float | None, outcome: str = "ok", key: str = "k") -> Op:
    return Op(client, key, "write", start, end, "unknown" if end is None else outcome, value=value)


def r(client: str, observed: str | None, start: float, end: float, key: str = "k") -> Op:
    return Op(client, key, "read", start, end, observed=observed)


def cas(client: str, expected: str | None, value: str, start: float, end: float | None, ok: bool = True, observed: str | None = None) -> Op:
    return Op(client, "k", "cas", start, end, "unknown" if end is None else "ok", value=value, expected=expected, ok=ok, observed=observed)


def linearizable(*ops: Op) -> bool:
    return check(ops).linearizable is True


def test_empty_and_sequential_histories():
    assert linearizable()
    assert linearizable(w("a", "1", 0, 1), r("b", "1", 2, 3), w("a", "2", 4, 5), r("b", "2", 6, 7))
    assert linearizable(r("a", None, 0, 1))  # absent at first


def test_a_read_of_an_overwritten_value_after_the_fact_is_not_linearizable():
    verdict = check([w("a", "1", 0, 1), w("a", "2", 2, 3), r("b", "1", 4, 5)])
    assert verdict.linearizable is False
    assert verdict.failures[0].stuck.kind == "read"
    assert "cannot place" in verdict.failures[0].explain()


def test_a_read_may_see_either_value_of_a_concurrent_write():
    assert linearizable(w("a", "1", 0, 1), w("a", "2", 2, 10), r("b", "1", 3, 4))
    assert linearizable(w("a", "1", 0, 1), w("a", "2", 2, 10), r("b", "2", 3, 4))


def test_reads_must_not_go_back_in_time():
    # Both reads overlap the write, but once one has seen the new value a later one cannot see the old.
    assert not linearizable(w("a", "1", 0, 1), w("a", "2", 2, 10), r("b", "2", 3, 4), r("c", "1", 5, 6))
    assert linearizable(w("a", "1", 0, 1), w("a", "2", 2, 10), r("b", "1", 3, 4), r("c", "2", 5, 6))


def test_concurrent_writes_in_either_order_but_reads_agree_on_one():
    writes = [w("a", "1", 0, 10), w("b", "2", 0, 10)]
    assert linearizable(*writes, r("c", "1", 11, 12), r("d", "1", 13, 14))
    assert not linearizable(*writes, r("c", "1", 11, 12), r("d", "2", 13, 14))
    # Readers concurrent with both writes may disagree, consistently with one order.
    assert linearizable(*writes, r("c", "1", 1, 2), r("d", "2", 3, 4))


def test_a_lost_acknowledged_write_is_caught():
    assert not linearizable(w("a", "1", 0, 1), r("b", None, 2, 3))


def test_lost_writes_names_the_acknowledged_write_and_the_read_that_missed_it():
    [lost] = lost_writes([w("a", "1", 0, 1), w("a", "2", 2, 3), r("b", "1", 4, 5), r("b", "2", 6, 7)])
    assert (lost.write.value, lost.seen.observed) == ("2", "1")
    assert "acknowledged" in lost.explain() and "older value" in lost.explain()
    assert [x.write.value for x in lost_writes([w("a", "1", 0, 1), r("b", None, 2, 3)])] == ["1"]  # absent counts as oldest
    assert lost_writes([w("a", "1", 0, 1), w("a", "2", 2, 3), cas("b", "2", "3", 4, 5, ok=False, observed="1")])


def test_lost_writes_ignores_what_may_have_happened_in_another_order():
    assert not lost_writes([w("a", "1", 0, 3), w("b", "2", 2, 4), r("c", "1", 5, 6)])  # concurrent writes
    assert not lost_writes([w("a", "1", 0, None), w("b", "2", 2, 3), r("c", "1", 4, 5)])  # "1" may land late
    assert not lost_writes([w("a", "1", 0, 1), w("b", "2", 2, 6), r("c", "1", 4, 5)])  # "2" not yet acknowledged
    assert not lost_writes([w("a", "1", 0, 1), w("b", "2", 2, 3, outcome="fail"), r("c", "1", 4, 5)])
    assert not lost_writes([w("a", "1", 0, 1), w("b", "2", 2, 3), r("c", "9", 4, 5)])  # never written: not a lost write


def test_unknown_writes_may_or_may_not_take_effect():
    assert linearizable(w("a", "1", 0, None), r("b", "1", 5, 6))
    assert linearizable(w("a", "1", 0, None), r("b", None, 5, 6))
    # ... but not take effect, then be undone, without another write.
    assert not linearizable(w("a", "1", 0, None), r("b", "1", 5, 6), r("b", None, 7, 8))
    # It can take effect late, long after the client gave up.
    assert linearizable(w("x", "0", 0, 1), w("a", "1", 2, None), r("b", "0", 5, 6), r("b", "1", 100, 101))
    # Never before its invocation.
    assert not linearizable(r("b", "1", 0, 1), w("a", "1", 2, None))


def test_definitely_failed_operations_never_take_effect():
    assert not linearizable(w("a", "1", 0, 1, outcome="fail"), r("b", "1", 2, 3))


def test_compare_and_set():
    assert linearizable(w("a", "1", 0, 1), cas("b", "1", "2", 2, 3), r("c", "2", 4, 5))
    assert not linearizable(w("a", "1", 0, 1), cas("b", "0", "2", 2, 3))  # succeeded against the wrong value
    assert linearizable(cas("b", None, "1", 0, 1), r("c", "1", 2, 3))  # null: absent
    assert linearizable(w("a", "1", 0, 1), cas("b", "0", "2", 2, 3, ok=False, observed="1"))
    assert not linearizable(w("a", "1", 0, 1), cas("b", "0", "2", 2, 3, ok=False, observed="5"))
    # A failed cas must have seen a value other than the expected one.
    assert not linearizable(w("a", "1", 0, 1), cas("b", "1", "2", 2, 3, ok=False, observed="1"))


def test_two_cas_from_the_same_value_cannot_both_succeed():
    assert not linearizable(w("a", "1", 0, 1), cas("b", "1", "2", 2, 5), cas("c", "1", "3", 2, 5))
    assert linearizable(w("a", "1", 0, 1), cas("b", "1", "2", 2, 5), cas("c", "1", "3", 2, 5, ok=False, observed="2"))


def test_unknown_cas_applies_only_when_its_expectation_holds():
    assert linearizable(w("a", "1", 0, 1), cas("b", "1", "2", 2, None), r("c", "2", 3, 4))
    assert not linearizable(w("a", "1", 0, 1), cas("b", "9", "2", 2, None), r("c", "2", 3, 4))


def test_keys_are_independent():
    ops = [w("a", "1", 0, 1, key="x"), w("a", "1", 0, 1, key="y"), r("b", None, 2, 3, key="y")]
    verdict = check(ops)
    assert verdict.linearizable is False and verdict.keys == 2
    assert [f.key for f in verdict.failures] == ["y"]


def test_many_concurrent_unknowns_stay_tractable():
    ops = [w(f"c{n}", f"v{n}", n, None) for n in range(40)] + [r("z", "v7", 50, 51), r("z", "v31", 52, 53)]
    assert check(ops, budget_s=5).linearizable is True


def test_an_exhausted_budget_is_undecided_not_a_verdict():
    ops = [w(f"c{n}", f"v{n}", 0, 100) for n in range(20)] + [r(f"r{n}", f"v{n}", 1, 99) for n in range(20)] + [r("z", "none", 101, 102)]
    assert check_key("k", ops, deadline=0) is None


# ---- against brute force -------------------------------------------------------------------


def brute_force(ops: list[Op]) -> bool:
    """Every order of every subset that keeps all completed operations and respects real time."""
    required = [op for op in ops if op.outcome == "ok"]
    optional = [op for op in ops if op.outcome == "unknown" and op.kind != "read"]
    for size in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, size):
            for order in itertools.permutations(required + list(chosen)):
                if any(a.end < b.invoke for i, b in enumerate(order) for a in order[i + 1 :]):
                    continue
                state: str | None = None
                for op in order:
                    allowed, state = step(state, op)
                    if not allowed:
                        break
                else:
                    return True
    return False


values = st.sampled_from([None, "1", "2"])


@st.composite
def histories(draw: st.DrawFn) -> list[Op]:
    ops = []
    for n in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, 8))
        end = None if draw(st.integers(0, 5)) == 0 else start + draw(st.integers(0, 4))
        kind = draw(st.sampled_from(["write", "cas", "read"]))
        outcome = "unknown" if end is None else "ok"
        if kind == "read" and end is None:
            end, outcome = start + 1, "ok"
        ok = draw(st.booleans())
        ops.append(
            Op(f"c{n}", "k", kind, start, end, outcome, value=draw(st.sampled_from(["1", "2"])), expected=draw(values), observed=draw(values), ok=ok)
        )
    return ops


@settings(max_examples=400, deadline=None)
@given(histories())
def test_agrees_with_brute_force(ops: list[Op]):
    result, truth = check_key("k", ops), brute_force(ops)
    assert (result is True) == truth, ops
    assert result is True or isinstance(result, KeyFailure)
    assert not (lost_writes(ops) and truth), ops  # a lost write is never linearizable
