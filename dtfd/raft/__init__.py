"""dtf's Raft core: a pure state machine in the shape of etcd's raft package.

No I/O, no clock, no global randomness: the driver feeds it messages and ticks, and
drains `ready()`. That is what lets the simulator in tests/sim run thousands of fault
schedules deterministically.

Usage::

    from dtfd.raft import (Raft, Config, Message, MessageType, Entry, EntryKind, HardState, Snapshot,
        SnapshotMeta, ConfState, PersistedState, Ready, ReadState, Role, Proposed, NotLeader, Refused, Status)
    import random
    cfg = Config(id="n1", voters=("n1","n2","n3"), rng=random.Random(seed), learners=(),
                 election_min=10, election_max=20, heartbeat=2,     # ticks
                 pre_vote=True, check_quorum=True, max_entries_per_msg=512, max_bytes_per_msg=1<<20,
                 max_inflight=64, snapshot_chunk=1<<20, planted_bugs=frozenset())
    r = Raft(cfg, persisted=None)           # or PersistedState(hard_state, snapshot, entries) from storage.load()
    r.tick()                                # one unit of logical time
    r.step(msg)                             # never raises on bad/stale input; counted in r.status().dropped
    r.propose(b"data")                      # -> Proposed(first_index, last_index, term) | NotLeader(leader) | Refused(reason)
    r.propose_batch([b"a", b"b"])           # same, one call for many entries
    r.read_index(b"ctx")                    # -> None | NotLeader | Refused; a ReadState(index, context) shows up in a later Ready
    r.transfer_leadership("n2")             # -> None | NotLeader | Refused
    r.compact(index, data)                  # app snapshot at an applied index -> Snapshot; persist it with storage.compact(snapshot)
    r.has_ready(); rd = r.ready(); ...; r.advance(rd)   # at most one Ready outstanding
    r.status()                              # Status(id, role, term, vote, leader, commit, applied, first_index, last_index, snapshot_index, transferee, progress={peer: PeerProgress(match,next,state,recent_active,learner)}, dropped={reason: count})
    r.id, r.role, r.term, r.leader          # properties; Role.FOLLOWER/PRE_CANDIDATE/CANDIDATE/LEADER
    r.log                                   # read-only view: r.log.first_index, r.log.last_index, r.log.committed, r.log.applied,
                                            # r.log.snapshot_index, r.log.term(i) -> int | None (None if compacted/absent), r.log.entries(lo, hi) -> list[Entry] (hi exclusive)

The driver processes a Ready exactly in the order documented on `Ready`::

    rd = r.ready()
    if rd.snapshot: storage.install_snapshot(rd.snapshot)
    if rd.entries: storage.append(rd.entries)
    if rd.hard_state: storage.set_hard_state(rd.hard_state)
    if rd.must_sync: storage.sync()
    send(rd.messages)                                   # only after sync
    if rd.snapshot: app.restore(rd.snapshot.data)       # state machine replaced
    for e in rd.committed: app.apply(e)                 # in index order
    for rs in rd.read_states: serve reads once app applied index >= rs.index
    r.advance(rd)

Restart: ``Raft(cfg, storage.load())``; the app restores from ``persisted.snapshot`` (if
any); committed entries after it come out again in the first Readys (applied starts at
the snapshot index). A new leader appends an ``EntryKind.NOOP`` entry; applications skip
NOOP entries, but their index counts as applied. The storage contract is
dtfd/storage/interface.py. Config.planted_bugs (test-only) breaks one safety rule on
purpose so the simulator's tests can show it catches it: "commit_old_term",
"forget_vote_persist", "accept_stale_vote", "vote_any_log".
"""

from dtfd.raft.config import Config
from dtfd.raft.core import Raft
from dtfd.raft.messages import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)
from dtfd.raft.ready import NotLeader, PeerProgress, Proposed, ReadState, Ready, Refused, Role, Status

__all__ = [
    "Config",
    "ConfState",
    "Entry",
    "EntryKind",
    "HardState",
    "Message",
    "MessageType",
    "NodeId",
    "NotLeader",
    "PeerProgress",
    "PersistedState",
    "Proposed",
    "Raft",
    "ReadState",
    "Ready",
    "Refused",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "Status",
]
