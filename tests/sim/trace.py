"""The run's event log: a bounded ring buffer for failure reports, and an optional hash of all of it.

Events are plain tuples `(step, kind, *fields)` so recording one costs an append;
they are formatted only when printed. With `hashing` on, every event (not only the
ones still in the ring) feeds a digest, so two runs of one seed can be compared
exactly: the determinism test and `--seed` replays use it.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable

from dtfd.raft import Message

Event = tuple


class Trace:
    def __init__(self, size: int = 200, hashing: bool = False, narrate: Callable[[Event], None] | None = None) -> None:
        self.ring: deque[Event] = deque(maxlen=size)
        self.events = 0
        self._hash = hashlib.blake2b(digest_size=16) if hashing else None
        self._narrate = narrate

    def add(self, event: Event) -> None:
        self.ring.append(event)
        self.events += 1
        if self._hash is not None:
            self._hash.update(repr(event).encode())
        if self._narrate is not None:
            self._narrate(event)

    def digest(self) -> str:
        """Hash of every event recorded; empty when hashing is off."""
        return self._hash.hexdigest() if self._hash is not None else ""

    def lines(self) -> list[str]:
        return [format_event(e) for e in self.ring]


def format_event(event: Event) -> str:
    step, kind, *fields = event
    return f"{step:>6} {kind:<9} " + " ".join(describe(f) if isinstance(f, Message) else str(f) for f in fields)


def describe(msg: Message) -> str:
    """One short line per message for traces: `n1->n2 APPEND t3 i7 lt2 e2 c5`."""
    parts = [f"{msg.src}->{msg.dst}", msg.type.name, f"t{msg.term}"]
    if msg.index or msg.log_term:
        parts.append(f"i{msg.index} lt{msg.log_term}")
    if msg.entries:
        parts.append(f"e{msg.entries[0].index}..{msg.entries[-1].index}")
    if msg.commit:
        parts.append(f"c{msg.commit}")
    if msg.reject:
        parts.append(f"reject(hint i{msg.hint_index} t{msg.hint_term})")
    if msg.snapshot is not None:
        parts.append(f"snap@{msg.snapshot.meta.index} off{msg.snapshot.offset}{' done' if msg.snapshot.done else ''}")
    return " ".join(parts)
