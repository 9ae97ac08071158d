"""Compaction and InstallSnapshot: chunked, retried, resumable across leaders, verified (Raft §7)."""

import hashlib

import pytest

from dtfd.raft import ConfState, Message, Raft, Ready, Snapshot, SnapshotMeta
from dtfd.raft.messages import SnapshotChunk

from tests.unit.raft_net import MT, Net, drain, make_raft, stored_log

STATE = bytes(range(100))  # the app's snapshot: 100 bytes, so 7 chunks of 16


def lagging_follower(net: Net, *compacting: str) -> Snapshot:
    """n3 misses 10 entries that the `compacting` nodes then compact away behind a snapshot."""
    net.elect("n1")
    net.isolate("n3")
    for i in range(10):
        net.propose("n1", b"%d" % i)
    (snap,) = {net.compact(id, net.raft("n1").log.applied, STATE) for id in compacting}  # the same everywhere
    return snap


def test_compact_drops_entries_up_to_index():
    """Compaction bounds the log; entries after the snapshot stay readable."""
    net = Net(3)
    net.elect("n1")
    for i in range(8):
        net.propose("n1", b"%d" % i)
    log = net.raft("n1").log
    tail = log.entries(6, log.last_index + 1)
    snap = net.compact("n1", 5, STATE)
    assert (snap.meta.index, snap.meta.term, snap.data) == (5, net.raft("n1").term, STATE)
    assert (snap.meta.digest, snap.meta.size) == (hashlib.sha256(STATE).hexdigest(), len(STATE))
    assert snap.meta.conf == ConfState(voters=("n1", "n2", "n3"))
    assert (log.first_index, log.snapshot_index, net.raft("n1").status().snapshot_index) == (6, 5, 5)
    assert log.term(4) is None
    assert log.entries(6, log.last_index + 1) == tail


def test_lagging_follower_gets_snapshot_in_chunks_then_entries():
    """A follower behind the compaction point is seeded by a chunked snapshot, then by appends."""
    net = Net(3, snapshot_chunk=16)
    snap = lagging_follower(net, "n1")
    net.heal()
    net.tick(6)
    chunks = [m.snapshot for m in net.messages(MT.SNAPSHOT, "n1", "n3")]
    assert [c.offset for c in chunks] == list(range(0, 100, 16))
    assert [c.done for c in chunks] == [False] * 6 + [True]
    assert b"".join(c.data for c in chunks) == STATE
    assert net.nodes["n3"].restored == [snap]
    assert net.raft("n3").log.first_index == snap.meta.index + 1
    net.propose("n1", b"after")
    assert net.nodes["n3"].applied_data() == [b"after"]


def test_lost_snapshot_chunk_is_sent_again():
    """One lost chunk must not stall the transfer or corrupt the result."""
    net = Net(3, snapshot_chunk=16)
    snap = lagging_follower(net, "n1")
    net.heal()
    lost = net.drop_first(lambda m: m.type == MT.SNAPSHOT and m.snapshot.offset == 16)
    net.tick(20)
    assert len(lost) == 1
    offsets = [m.snapshot.offset for m in net.messages(MT.SNAPSHOT, "n1", "n3")]
    assert offsets.count(16) >= 2
    assert net.nodes["n3"].restored == [snap]


def test_snapshot_transfer_resumes_after_leader_change():
    """A new leader with the same snapshot continues from the follower's offset, not from 0."""
    net = Net(3, snapshot_chunk=16)
    snap = lagging_follower(net, "n1", "n2")
    net.heal()
    net.drop_if(lambda m: m.type == MT.SNAPSHOT and m.snapshot.offset >= 32)
    net.tick(2)
    assert [m.snapshot.offset for m in net.delivered if m.type == MT.SNAPSHOT] == [0, 16]
    net.crash("n1")
    net.heal()
    net.elect("n2")
    net.tick(4)
    first_chunk = net.messages(MT.SNAPSHOT, "n2", "n3")[0].snapshot
    first_ask = net.messages(MT.SNAPSHOT_RESP, "n3", "n2")[0]
    assert first_chunk.offset == 32 or (first_ask.index == 32 and first_chunk.offset == 0)
    assert 0 not in [m.snapshot.offset for m in net.messages(MT.SNAPSHOT, "n2", "n3")[1:]]
    assert net.nodes["n3"].restored == [snap]


def send_whole_snapshot(follower: Raft, meta: SnapshotMeta, data: bytes) -> list[Ready]:
    """Step a one-chunk snapshot from leader n1 of term 1 into `follower`."""
    chunk = SnapshotChunk(meta=meta, offset=0, data=data, done=True)
    follower.step(Message(type=MT.SNAPSHOT, src="n1", dst=follower.id, term=1, snapshot=chunk))
    return drain(follower)


def snapshot_meta(index: int) -> SnapshotMeta:
    return SnapshotMeta(index=index, term=1, conf=ConfState(("n1", "n2", "n3")), digest=hashlib.sha256(STATE).hexdigest(), size=len(STATE))


def test_snapshot_with_wrong_digest_is_not_installed():
    """A chunk corrupted in transit must never replace a follower's state."""
    follower = make_raft("n2")
    corrupt = send_whole_snapshot(follower, snapshot_meta(5), STATE[:-1] + b"\xff")
    assert [rd.snapshot for rd in corrupt if rd.snapshot] == []
    assert follower.log.snapshot_index == 0
    genuine = send_whole_snapshot(follower, snapshot_meta(5), STATE)
    assert [rd.snapshot for rd in genuine if rd.snapshot] == [Snapshot(snapshot_meta(5), STATE)]
    assert follower.log.snapshot_index == 5


def test_snapshot_older_than_commit_does_not_roll_back():
    """A delayed snapshot must not replace a log that already holds more committed entries."""
    follower = make_raft("n2", persisted=stored_log([1] * 6, term=1, commit=6))
    log = follower.log.entries(1, 7)
    readys = send_whole_snapshot(follower, snapshot_meta(3), STATE)
    assert [rd.snapshot for rd in readys if rd.snapshot] == []
    assert (follower.log.entries(1, 7), follower.log.committed, follower.log.snapshot_index) == (log, 6, 0)


def test_compaction_never_drops_unapplied_entries():
    """Compacting past what the app applied would lose commands; it is refused, log untouched."""
    net = Net(3)
    net.elect("n1")
    net.isolate("n1")
    net.propose("n1", b"uncommitted")
    log = net.raft("n1").log
    with pytest.raises(ValueError):
        net.raft("n1").compact(log.last_index, STATE)
    assert (log.first_index, log.snapshot_index) == (1, 0)


def test_restart_replays_committed_entries_after_the_snapshot():
    """The app restores the snapshot, then gets exactly the committed entries after it again."""
    net = Net(3)
    net.elect("n1")
    for i in range(6):
        net.propose("n1", b"%d" % i)
    snap = net.compact("n2", 4, STATE)
    net.crash("n2")
    net.restart("n2")
    node = net.nodes["n2"]
    assert node.restored == [snap]
    assert [e.index for e in node.applied] == list(range(5, net.raft("n1").log.committed + 1))
    assert node.applied_data() == [b"%d" % i for i in range(3, 6)]


def test_an_unanswered_chunk_is_resent_every_other_heartbeat_not_on_each():
    """A chunk may still be on its way when a heartbeat answer comes back: resending it on every
    one doubled a busy link's load. Unanswered for a whole heartbeat round, it goes again."""
    net = Net(3, snapshot_chunk=16)
    lagging_follower(net, "n1")
    net.heal()
    net.drop_if(lambda m: m.type == MT.SNAPSHOT_RESP and m.src == "n3")  # every chunk goes unanswered
    net.tick(40)
    chunks = net.messages(MT.SNAPSHOT, "n1", "n3")
    answers = net.messages(MT.HEARTBEAT_RESP, "n3", "n1")
    assert {c.snapshot.offset for c in chunks} == {0}
    assert len(answers) >= 6 and 2 <= len(chunks) <= len(answers) // 2 + 1
