"""Errors are values: bad requests get answers, bad messages get dropped and counted, bad configs fail fast."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtfd.raft import Entry, Message, NotLeader, Role

from tests.unit.raft_net import MT, Net, arbitrary_messages, assert_progress_sane, dropped_total, make_config, make_raft


def cluster_in_term_above_one() -> Net:
    """n2 leads in a term > 1, so messages from an earlier (nonzero) term exist."""
    net = Net(3)
    net.elect("n1")
    net.crash("n1")
    net.elect("n2")
    net.restart("n1")
    net.tick(2)
    return net


def test_propose_on_follower_names_the_leader():
    """A follower tells the client where to go instead of failing blindly."""
    net = Net(3)
    net.elect("n1")
    assert net.raft("n2").propose(b"x") == NotLeader("n1")
    assert net.raft("n3").propose_batch([b"x", b"y"]) == NotLeader("n1")


def test_propose_with_no_leader_known():
    """Before any election there is nobody to name; the caller should back off and retry."""
    assert make_raft("n1").propose(b"x") == NotLeader("")


def entries(*pairs: tuple[int, int]) -> tuple[Entry, ...]:
    return tuple(Entry(term=t, index=i) for t, i in pairs)


# Each builder gets (leader term, last index) and returns a message for follower n3.
TO_FOLLOWER = {
    "unknown-sender": lambda t, i: Message(type=MT.APPEND, src="zz", dst="n3", term=t + 1, index=i, log_term=t, entries=entries((t + 1, i + 1))),
    "unknown-sender-vote": lambda t, i: Message(type=MT.VOTE, src="zz", dst="n3", term=t + 5, index=i + 9, log_term=t + 5),
    "wrong-dst": lambda t, i: Message(type=MT.APPEND, src="n2", dst="n1", term=t, index=i, log_term=t, entries=entries((t, i + 1))),
    "non-contiguous": lambda t, i: Message(type=MT.APPEND, src="n2", dst="n3", term=t, index=i, log_term=t, entries=entries((t, i + 1), (t, i + 3))),
    "not-after-prev": lambda t, i: Message(type=MT.APPEND, src="n2", dst="n3", term=t, index=i, log_term=t, entries=entries((t, i + 2))),
    "entry-term-above-message": lambda t, i: Message(type=MT.APPEND, src="n2", dst="n3", term=t, index=i, log_term=t, entries=entries((t + 1, i + 1))),
    "snapshot-without-chunk": lambda t, i: Message(type=MT.SNAPSHOT, src="n2", dst="n3", term=t),
}

# And these go to the leader n2.
TO_LEADER = {
    "stale-append-resp": lambda t, i: Message(type=MT.APPEND_RESP, src="n3", dst="n2", term=t - 1, index=i),
    "stale-heartbeat-resp": lambda t, i: Message(type=MT.HEARTBEAT_RESP, src="n3", dst="n2", term=t - 1, context=b"r"),
    "stale-vote-resp": lambda t, i: Message(type=MT.VOTE_RESP, src="n3", dst="n2", term=t - 1),
    "unknown-sender-resp": lambda t, i: Message(type=MT.APPEND_RESP, src="zz", dst="n2", term=t, index=i),
}


def observable(net: Net, id: str):
    raft = net.raft(id)
    s = raft.status()
    return s.role, s.term, s.vote, s.leader, s.commit, s.last_index, raft.log.entries(1, s.last_index + 1), {p: (pr.match, pr.next) for p, pr in s.progress.items()}


@pytest.mark.parametrize(("dst", "build"), [("n3", b) for b in TO_FOLLOWER.values()] + [("n2", b) for b in TO_LEADER.values()], ids=list(TO_FOLLOWER) + list(TO_LEADER))
def test_bad_or_stale_message_is_dropped_and_counted(dst, build):
    """A buggy or old peer cannot crash a node or change its state; the count makes it visible."""
    net = cluster_in_term_above_one()
    leader = net.raft("n2")
    assert leader.role == Role.LEADER and leader.term > 1
    raft = net.raft(dst)
    before, dropped = observable(net, dst), dropped_total(raft)
    raft.step(build(leader.term, leader.log.last_index))
    net.process(dst)
    assert dropped_total(raft) > dropped
    assert observable(net, dst) == before
    net.deliver()
    net.propose("n2", b"still fine")
    assert net.nodes["n3"].applied_data()[-1:] == [b"still fine"]


def test_request_from_earlier_term_is_answered_with_current_term():
    """A deposed leader's append changes nothing, and the reply tells it the newer term (§5.1)."""
    net = cluster_in_term_above_one()
    term, last = net.raft("n2").term, net.raft("n2").log.last_index
    before = observable(net, "n3")
    stale = Message(type=MT.APPEND, src="n1", dst="n3", term=term - 1, index=last, log_term=term - 1, entries=entries((term - 1, last + 1)))
    net.raft("n3").step(stale)
    net.process("n3")
    replies = [m for m in net.queue if m.src == "n3" and m.dst == "n1"]
    assert observable(net, "n3") == before
    assert replies and all(m.term == term for m in replies)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("voters", {"voters": ()}),
        ("voters", {"voters": ("n1", "n1")}),
        ("learners", {"learners": ("n2",)}),
        ("id", {"id": "n9"}),
        ("heartbeat", {"heartbeat": 0}),
        ("election_min", {"election_min": 2, "heartbeat": 2}),
        ("election_max", {"election_max": 10}),
        ("max_entries_per_msg", {"max_entries_per_msg": 0}),
        ("max_bytes_per_msg", {"max_bytes_per_msg": 0}),
        ("max_inflight", {"max_inflight": 0}),
        ("snapshot_chunk", {"snapshot_chunk": -1}),
        ("planted_bugs", {"planted_bugs": frozenset({"no_such_bug"})}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x!r}" for k, x in v.items()),
)
def test_bad_config_raises_value_error_naming_the_field(field, overrides):
    """An operator who mistypes the config learns which option to fix, at start, not in production."""
    args = {"id": "n1", "voters": ("n1", "n2", "n3")} | overrides
    with pytest.raises(ValueError, match=field):
        make_config(**args)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(arbitrary_messages(st.integers(0, 12), st.sampled_from(["n1", "n2", "n3", "zz"])), max_size=12))
def test_arbitrary_messages_never_raise(batch):
    """Whatever peers send, step() returns and the leader's bookkeeping stays within its log."""
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"a")
    for m in batch:
        for id in net.alive():
            net.raft(id).step(m)
            net.process(id)
        assert_progress_sane(net.raft("n1"))
    net.deliver()
