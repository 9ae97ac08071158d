"""The state machine must be deterministic, idempotent per client session, and snapshot exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtfd.state.machine import (
    CompareAndSet,
    Delete,
    Envelope,
    Put,
    SetConfig,
    StateMachine,
    encode_envelope,
)

keys = st.sampled_from(["a", "b", "c"])
values = st.text(max_size=5)
commands = st.one_of(
    st.builds(Put, keys, values),
    st.builds(Delete, keys),
    st.builds(CompareAndSet, keys, st.one_of(st.none(), values), values),
    st.builds(SetConfig, keys, values),
)
envelopes = st.builds(
    Envelope,
    client=st.sampled_from(["c1", "c2"]),
    seq=st.integers(1, 6),
    at=st.floats(0, 1e6, allow_nan=False),
    command=commands,
)


def _apply_all(machine: StateMachine, batch: list[Envelope]) -> list:
    return [machine.apply(machine.applied + 1, encode_envelope(e)) for e in batch]


@settings(max_examples=200, deadline=None)
@given(st.lists(envelopes, max_size=30), st.lists(envelopes, max_size=10))
def test_snapshot_restore_gives_the_same_state_and_future(prefix, suffix):
    original = StateMachine()
    _apply_all(original, prefix)
    copy = StateMachine()
    copy.restore(original.snapshot())
    assert copy.checksum() == original.checksum()
    assert _apply_all(copy, suffix) == _apply_all(original, suffix)
    assert copy.checksum() == original.checksum()


@settings(max_examples=100, deadline=None)
@given(st.lists(envelopes, max_size=30))
def test_two_replicas_applying_the_same_log_agree(batch):
    a, b = StateMachine(), StateMachine()
    assert _apply_all(a, batch) == _apply_all(b, batch)
    assert a.checksum() == b.checksum()


def test_retried_command_applies_once_and_returns_the_first_result():
    machine = StateMachine()
    first = machine.apply(1, encode_envelope(Envelope("c", 1, 10.0, CompareAndSet("k", None, "v1"))))
    assert first.ok
    retry = machine.apply(2, encode_envelope(Envelope("c", 1, 11.0, CompareAndSet("k", None, "v1"))))
    assert retry.ok and retry.duplicate and retry.index == 1
    assert machine.get("k") == "v1"
    stale = machine.apply(3, encode_envelope(Envelope("c", 0, 12.0, Put("k", "old"))))
    assert not stale.ok and stale.error == "stale_sequence"
    assert machine.get("k") == "v1"


def test_compare_and_set_reports_the_current_value_on_failure():
    machine = StateMachine()
    machine.apply(1, encode_envelope(Envelope("c", 1, 0.0, Put("k", "a"))))
    failed = machine.apply(2, encode_envelope(Envelope("c", 2, 0.0, CompareAndSet("k", "b", "c"))))
    assert (failed.ok, failed.value, failed.error) == (False, "a", "cas_failed")


def test_undecodable_entry_is_a_recorded_failure_not_a_crash():
    machine = StateMachine()
    result = machine.apply(1, b"\xff\x00garbage")
    assert not result.ok and result.error == "undecodable"
    assert machine.applied == 1


def test_out_of_order_apply_is_a_bug_and_raises():
    machine = StateMachine()
    with pytest.raises(ValueError):
        machine.apply(2, b"")


def test_commands_without_a_client_are_applied_every_time_and_keep_no_session():
    machine = StateMachine()
    machine.apply(1, encode_envelope(Envelope("", 0, 0.0, Put("k", "a"))))
    machine.apply(2, encode_envelope(Envelope("", 0, 0.0, Put("k", "b"))))
    assert machine.get("k") == "b"
    assert machine.image.sessions == {}


def test_sessions_expire_after_their_ttl_and_stay_bounded(monkeypatch):
    from dtfd.state import machine as m

    monkeypatch.setattr(m, "MAX_SESSIONS", 10)
    monkeypatch.setattr(m, "SESSION_SWEEP_EVERY", 4)
    machine = StateMachine()
    for n in range(1, 13):
        machine.apply(n, encode_envelope(Envelope(f"c{n}", 1, float(n), Put("k", "v"))))
    assert len(machine.image.sessions) <= 10 and "c12" in machine.image.sessions and "c1" not in machine.image.sessions
    late = m.SESSION_TTL_S + 100.0
    for n in range(13, 17):
        machine.apply(n, encode_envelope(Envelope("fresh", n, late, Put("k", "v"))))
    assert set(machine.image.sessions) == {"fresh"}


def test_a_batch_applies_its_commands_in_order_with_one_result_each():
    from dtfd.state.machine import Batch

    machine = StateMachine()
    result = machine.apply(1, encode_envelope(Envelope("c", 1, 0.0, Batch([Put("a", "1"), CompareAndSet("a", "1", "2"), CompareAndSet("a", "1", "3"), Delete("b")]))))
    assert result.ok and [r["ok"] for r in result.value] == [True, True, False, True]
    assert machine.get("a") == "2"
    assert machine.apply(2, encode_envelope(Envelope("c", 1, 0.0, Batch([Put("a", "9")])))).duplicate
    assert machine.get("a") == "2"


def test_leader_changes_are_recorded_once_per_term_in_order():
    from dtfd.state.health import RecordLeader

    machine = StateMachine()
    assert machine.apply(1, encode_envelope(Envelope("", 0, 5.0, RecordLeader("n1", 2)))).ok
    assert not machine.apply(2, encode_envelope(Envelope("", 0, 6.0, RecordLeader("n2", 2)))).ok
    assert machine.apply(3, encode_envelope(Envelope("", 0, 7.0, RecordLeader("n2", 3)))).ok
    assert [(c.node, c.term) for c in machine.image.health.leaders] == [("n1", 2), ("n2", 3)]
