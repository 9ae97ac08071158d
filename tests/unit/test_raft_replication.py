"""Log replication: commit rule, batching, pipelining, backtracking, log repair (Raft §5.3, §5.4.2)."""

import pytest

from dtfd.raft import EntryKind, Message, Proposed

from tests.unit.raft_net import MT, Net, assert_progress_sane


def logs_agree(net: Net, *ids: str) -> bool:
    def log(id):
        raft = net.raft(id)
        return [(e.index, e.term, e.data) for e in raft.log.entries(raft.log.first_index, raft.log.last_index + 1)]

    return all(log(id) == log(ids[0]) for id in ids)


def test_entries_commit_on_a_majority_only():
    """An entry is applied once a majority holds it; the minority catches up later."""
    net = Net(3)
    net.elect("n1")
    net.isolate("n3")
    net.propose("n1", b"a")
    assert [net.nodes[id].applied_data() for id in net.nodes] == [[b"a"], [b"a"], []]
    net.heal()
    net.tick(2)
    assert net.nodes["n3"].applied_data() == [b"a"]


def test_followers_learn_a_commit_at_the_next_tick_not_from_appends_of_its_own():
    """Each commit used to be broadcast at once: two appends (and two acknowledgements) in
    front of every answer the leader gave. Now the next append or tick carries it."""
    net = Net(3)
    net.elect("n1")
    net.tick()
    leader = net.raft("n1")
    sent = len(net.delivered)
    proposed = leader.propose(b"a")
    net.process("n1")
    net.deliver()
    assert [m.type for m in net.delivered[sent:]].count(MT.APPEND) == 2, "one append per follower, none to carry the commit"
    assert leader.log.committed == proposed.last_index
    assert [net.raft(id).log.committed for id in ("n2", "n3")] == [proposed.last_index - 1] * 2

    second = leader.propose(b"b")
    net.process("n1")
    net.deliver()
    assert [net.raft(id).log.committed for id in ("n2", "n3")] == [proposed.last_index] * 2, "the next append carries it"

    leader.tick()
    net.process("n1")
    net.deliver()
    assert [net.raft(id).log.committed for id in ("n2", "n3")] == [second.last_index] * 2, "with no next append, the next tick does"
    assert [net.nodes[id].applied_data() for id in net.nodes] == [[b"a", b"b"]] * 3


def test_majority_down_nothing_commits():
    """Without a majority nothing is acknowledged, however long we wait."""
    net = Net(3)
    net.elect("n1")
    commit = net.raft("n1").log.committed
    net.isolate("n1")
    net.propose("n1", b"a")
    net.tick(5)
    assert net.raft("n1").log.committed == commit
    assert net.nodes["n1"].applied_data() == []


def test_proposal_returns_its_indexes_and_term():
    """Clients match their answer to the entry by (index, term)."""
    net = Net(3)
    term = net.elect("n1")
    last = net.raft("n1").log.last_index
    assert net.propose("n1", b"a") == Proposed(last + 1, last + 1, term)
    assert net.propose("n1", b"b", b"c", b"d") == Proposed(last + 2, last + 4, term)
    assert net.nodes["n2"].applied_data() == [b"a", b"b", b"c", b"d"]


def test_new_leader_commits_a_noop_of_its_term():
    """The no-op lets a new leader learn the commit index and commit earlier-term entries (§5.4.2)."""
    net = Net(3)
    net.elect("n1")
    net.crash("n1")
    term = net.elect("n2")
    raft = net.raft("n2")
    (noop,) = raft.log.entries(raft.log.last_index, raft.log.last_index + 1)
    assert (noop.kind, noop.term) == (EntryKind.NOOP, term)
    assert raft.log.committed == noop.index
    assert net.nodes["n3"].applied[-1] == noop


def catch_up_appends(**limits) -> list[Message]:
    """The non-empty appends n1 sends to n3 to bring it back from 60 entries (30 bytes each) behind."""
    net = Net(3, **limits)
    net.elect("n1")
    net.isolate("n3")
    for i in range(60):
        net.propose("n1", b"%030d" % i)
    net.heal()
    net.tick(20)
    assert net.nodes["n3"].applied_data() == net.nodes["n1"].applied_data()
    return [m for m in net.messages(MT.APPEND, "n1", "n3") if m.entries]


def test_far_behind_follower_gets_at_most_max_entries_per_msg():
    """Catch-up traffic is cut into messages the transport and follower can digest."""
    assert max(len(m.entries) for m in catch_up_appends(max_entries_per_msg=8)) == 8


def test_far_behind_follower_gets_about_max_bytes_per_msg():
    """The byte limit holds too; only the entry that crosses it may overshoot."""
    appends = catch_up_appends(max_bytes_per_msg=100)
    assert max(sum(len(e.data) for e in m.entries[:-1]) for m in appends) <= 100
    assert max(len(m.entries) for m in appends) <= 4


def test_pipelining_bounded_by_max_inflight():
    """A replicating leader streams appends without waiting for acks, but only max_inflight of them."""
    net = Net(3, max_inflight=4)
    net.elect("n1")
    net.propose("n1", b"warm-up")
    leader = net.raft("n1")
    for i in range(10):
        leader.propose(b"%d" % i)
        net.process("n1")
    outstanding = [m for m in net.queue if m.type == MT.APPEND and m.dst == "n2" and m.entries]
    assert 2 <= len(outstanding) <= 4
    net.deliver()
    net.tick(4)
    assert net.nodes["n2"].applied_data() == [b"warm-up"] + [b"%d" % i for i in range(10)]


def test_follower_that_lost_a_full_inflight_window_catches_up():
    """The leader retries appends indefinitely (§5.3), even when every pipelined append was lost."""
    net = Net(3, max_inflight=4)
    net.elect("n1")
    net.propose("n1", b"warm-up")
    net.isolate("n3")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    net.heal()
    net.tick(net.nodes["n1"].config.election_max)
    assert net.raft("n1").status().progress["n3"].match == net.raft("n1").log.last_index
    assert net.nodes["n3"].applied_data() == net.nodes["n1"].applied_data()


def old_leader_with_conflicting_tail(conflicting: int) -> Net:
    """n1 is cut off with `conflicting` uncommitted entries; n2 then n3 lead the majority meanwhile.

    n3 is elected with a log longer than the common prefix, so its first probe to n1 conflicts.
    """
    net = Net(5)
    net.elect("n1")
    net.propose("n1", b"committed")
    net.isolate("n1")
    for i in range(conflicting):
        net.propose("n1", b"lost%d" % i)
    net.elect("n2")
    net.propose("n2", *[b"new%d" % i for i in range(conflicting)])
    net.crash("n2")
    net.elect("n3")
    net.heal()
    return net


def test_fast_backtracking_repairs_long_conflicting_tail_in_few_round_trips():
    """Conflict term/index hints skip a whole stale term at once instead of one entry per round trip."""
    net = old_leader_with_conflicting_tail(50)
    net.tick(10)
    assert logs_agree(net, "n1", "n3", "n4", "n5")
    rejects = [m for m in net.messages(MT.APPEND_RESP, "n1") if m.reject]
    assert 1 <= len(rejects) <= 3


def test_conflicting_uncommitted_entries_are_overwritten():
    """Entries a deposed leader never committed are replaced by the new leader's and never applied."""
    net = old_leader_with_conflicting_tail(5)
    net.tick(10)
    assert net.leaders() == ["n3"]
    assert logs_agree(net, "n1", "n3", "n4", "n5")
    expected = [b"committed"] + [b"new%d" % i for i in range(5)]
    assert all(net.nodes[id].applied_data() == expected for id in net.alive())


@pytest.mark.parametrize(
    ("bugs", "commit"),
    [(frozenset(), 1), (frozenset({"commit_old_term"}), 2)],
    ids=["safe", "planted-bug-shows-the-scenario-bites"],
)
def test_figure8_old_term_entry_on_majority_is_not_committed_by_counting(bugs, commit):
    """Raft Figure 8: a leader counts replicas only for entries of its own term."""
    net = Net(5, max_entries_per_msg=1, planted_bugs=bugs)
    net.elect("n1")
    # (a) n1 replicates index 2 to n2 only.
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    net.propose("n1", b"x")
    old_term = net.raft("n1").term
    # (b) n1 crashes; n5 wins with n3, n4 but its own entry at index 2 never leaves it.
    net.crash("n1")
    net.heal()
    net.drop_if(lambda m: m.src == "n5" and m.type == MT.APPEND)
    net.elect("n5")
    net.crash("n5")
    net.heal()
    # (c) n1 restarts, wins, and gets index 2 onto n3 but its no-op (index 3) onto n2 only.
    net.restart("n1")
    net.cut("n1", "n4")
    n3 = net.raft("n3")
    net.drop_if(lambda m: m.dst == "n3" and m.type == MT.APPEND and n3.log.last_index >= 2)
    net.elect("n1")
    net.tick(6)
    leader = net.raft("n1")
    assert leader.term > old_term
    assert [net.raft(id).log.term(2) for id in ("n1", "n2", "n3")] == [old_term] * 3
    assert leader.log.committed == commit
    # (d) once an entry of the current term reaches a majority, everything before it commits.
    net.heal()
    net.tick(4)
    assert leader.log.committed == 3
    assert net.nodes["n3"].applied_data() == [b"x"]


@pytest.mark.parametrize(
    "bogus",
    [
        {"index": 1000},  # acks entries the leader never had
        {"index": 1000, "reject": True, "hint_index": 1000},
        {"index": 0, "reject": True},  # claims to hold nothing
    ],
)
def test_weird_append_responses_keep_progress_within_the_log(bogus):
    """A confused or malicious ack must not push next_index past the leader's log."""
    net = Net(3)
    term = net.elect("n1")
    net.propose("n1", b"a", b"b")
    leader = net.raft("n1")
    leader.step(Message(type=MT.APPEND_RESP, src="n2", dst="n1", term=term, **bogus))
    assert_progress_sane(leader)
    net.process("n1")
    net.deliver()
    net.tick(3)
    assert_progress_sane(leader)
    assert leader.log.committed == leader.log.last_index


def test_duplicate_and_stale_append_responses_are_harmless():
    """The network may duplicate and reorder acks; replaying all of them changes nothing."""
    net = Net(3)
    net.elect("n1")
    for i in range(5):
        net.propose("n1", b"%d" % i)
    leader = net.raft("n1")
    before = leader.status().progress
    for m in net.messages(MT.APPEND_RESP, dst="n1") + net.messages(MT.HEARTBEAT_RESP, dst="n1"):
        leader.step(m)
    assert_progress_sane(leader)
    assert {p: pr.match for p, pr in leader.status().progress.items()} == {p: pr.match for p, pr in before.items()}


def test_restart_keeps_term_vote_commit_and_log():
    """A crash loses nothing the node acknowledged: its promises and its log survive."""
    net = Net(3)
    net.elect("n1")
    net.propose("n1", b"a", b"b")
    raft = net.raft("n2")
    before = raft.status()
    log = raft.log.entries(1, before.last_index + 1)
    net.crash("n2")
    raft = net.restart("n2")
    after = raft.status()
    assert (after.term, after.vote, after.commit, after.last_index) == (before.term, before.vote, before.commit, before.last_index)
    assert raft.log.entries(1, after.last_index + 1) == log
    assert net.nodes["n2"].applied_data() == [b"a", b"b"]
