"""A child process for the storage crash tests: `python storage_child.py MODE DATA_DIR [SEED]`.

run:  append batches through DiskStorage forever, sometimes replacing the tail in a new
      term or compacting, printing `append FIRST LAST TERM` before each write and
      `synced FIRST LAST TERM` once `sync()` returned: the parent SIGKILLs it at random.
open: open the dir the way the daemon does (`open_or_exit`), print `opened`, close.
hold: open it and keep it open until stdin closes.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys

from dtfd.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from dtfd.storage.datadir import open_or_exit
from dtfd.storage.interface import EX_IOERR, StorageFailed

SEGMENT_SIZE = 16 * 1024
log = logging.getLogger("dtf.storage")


def payload(index: int, term: int) -> bytes:
    """The data of entry (index, term): random-looking, 0..700 bytes, reproducible by the parent."""
    seed = hashlib.sha256(b"%d/%d" % (index, term)).digest()
    return (seed * 22)[: seed[0] * 700 // 255]


def snapshot_data(index: int) -> bytes:
    return b"state-machine-image-%d" % index * 8


def say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def run(data_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    storage = open_or_exit(data_dir, segment_size=SEGMENT_SIZE)
    state = storage.load()
    snap_index = state.snapshot.meta.index if state.snapshot else 0
    terms = {e.index: e.term for e in state.entries}
    if state.snapshot:
        terms[snap_index] = state.snapshot.meta.term
    last = max(terms, default=0)
    # The stored commit may lag (it is written lazily); a snapshot only holds committed entries.
    term, commit = max(state.hard_state.term, 1), max(state.hard_state.commit, snap_index)
    say("ready", last, term)
    try:
        while True:
            first = last + 1
            if last > commit + 1 and rng.random() < 0.1:
                first, term = rng.randint(commit + 1, last), term + 1
                storage.set_hard_state(HardState(term, "n1", commit))
            batch = [Entry(term, i, data=payload(i, term)) for i in range(first, first + rng.randint(1, 8))]
            say("append", first, batch[-1].index, term)
            storage.append(batch)
            for i in list(terms):
                if i >= first:
                    del terms[i]
            terms.update((e.index, term) for e in batch)
            last = batch[-1].index
            commit = max(commit, first - 1 - rng.randint(0, 20))
            storage.set_hard_state(HardState(term, "n1", commit))
            storage.sync()
            say("synced", first, last, term)
            if commit > snap_index + 50 and rng.random() < 0.05:
                snap_index = commit
                meta = SnapshotMeta(commit, terms[commit], ConfState(("n1",)))
                storage.compact(Snapshot(meta, snapshot_data(commit)))
                say("compacted", commit)
    except StorageFailed as e:
        log.critical("storage failed, stopping: %s", e)
        raise SystemExit(EX_IOERR) from None


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    mode, data_dir = sys.argv[1], sys.argv[2]
    if mode == "run":
        run(data_dir, int(sys.argv[3]))
        return
    storage = open_or_exit(data_dir)
    say("opened")
    if mode == "hold":
        sys.stdin.read()
    storage.close()


if __name__ == "__main__":
    main()
