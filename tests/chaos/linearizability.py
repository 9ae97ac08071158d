"""A linearizability checker for key/value histories: Wing & Gong with Lowe's memoization.

A history of register operations (write, compare-and-set, read) recorded by concurrent
clients is linearizable when every operation can be given a single instant between its
invocation and its completion such that, taken in that order, each one behaves as on a
single register. The search is the WGL algorithm as improved by Lowe ("Testing for
linearizability", 2017) and used by Porcupine: walk the time-ordered events, try to
linearize each pending call, backtrack when a completion is reached whose call has not
been linearized, and never revisit a (set of linearized operations, register value) pair.

Keys are independent registers, so each key is checked alone (P-compositionality).
An operation whose outcome is unknown (the client gave up) completes at infinity: it may
take effect at any instant after its invocation, or never, which is the same as taking
effect after everything else. Unknown reads carry no information and are dropped, as are
operations that definitely failed. An unknown write or compare-and-set whose value no
operation ever observed is dropped too: it is linearizable at the end, where nothing sees
it, exactly when it is linearizable anywhere, and dropping it keeps the search small.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["write", "cas", "read"]
Outcome = Literal["ok", "fail", "unknown"]
INFINITY = float("inf")


@dataclass(frozen=True)
class Op:
    """One client operation on one key, as the recorder saw it.

    write: `value` is written (None deletes). cas: from `expected` to `value`; a completed
    cas has `ok` True, or False with `observed` the value the register held. read: `observed`
    is the value read (None: absent). `complete` is None when the outcome is unknown.
    """

    client: str
    key: str
    kind: Kind
    invoke: float
    complete: float | None
    outcome: Outcome = "ok"
    value: str | None = None
    expected: str | None = None
    observed: str | None = None
    ok: bool = True

    @property
    def end(self) -> float:
        return INFINITY if self.outcome == "unknown" or self.complete is None else self.complete


@dataclass
class Verdict:
    """The result for a whole history: linearizable, not, or undecided within the budget."""

    linearizable: bool | None
    keys: int = 0
    operations: int = 0
    failures: list[KeyFailure] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {True: "linearizable", False: "NOT linearizable", None: "undecided (budget exhausted)"}[self.linearizable]


@dataclass
class KeyFailure:
    """Why one key's history failed: the longest order found and the operation it could not place."""

    key: str
    linearized: list[Op]
    stuck: Op
    concurrent: list[Op]

    def explain(self) -> str:
        lines = [f"key {self.key!r}: no linearization; the longest found places {len(self.linearized)} operations, ending:"]
        lines += [f"  {describe(op)}" for op in self.linearized[-5:]]
        lines.append(f"then cannot place, before it completes: {describe(self.stuck)}")
        lines += [f"  concurrent: {describe(op)}" for op in self.concurrent]
        return "\n".join(lines)


def describe(op: Op) -> str:
    end = "?" if op.end == INFINITY else f"{op.end:.6f}"
    if op.kind == "write":
        what = f"write {op.value!r}"
    elif op.kind == "read":
        what = f"read -> {op.observed!r}"
    elif op.outcome == "unknown":
        what = f"cas {op.expected!r} -> {op.value!r} (outcome unknown)"
    else:
        what = f"cas {op.expected!r} -> {op.value!r}: " + ("ok" if op.ok else f"failed, held {op.observed!r}")
    return f"[{op.invoke:.6f}, {end}] {op.client}: {what}"


def step(state: str | None, op: Op) -> tuple[bool, str | None]:
    """The sequential register: whether `op` may happen in `state`, and the state after it."""
    if op.kind == "write":
        return True, op.value
    if op.kind == "read":
        return state == op.observed, state
    if op.outcome == "unknown":
        return True, op.value if state == op.expected else state
    if op.ok:
        return state == op.expected, op.value
    return state == op.observed and state != op.expected, state


def relevant(ops: Iterable[Op]) -> list[Op]:
    """The operations that constrain the search (see the module docstring)."""
    kept = [op for op in ops if op.outcome == "ok" or (op.outcome == "unknown" and op.kind != "read")]
    seen: set[str | None] = set()
    for op in kept:
        if op.kind == "read" or (op.kind == "cas" and op.outcome == "ok" and not op.ok):
            seen.add(op.observed)
        if op.kind == "cas":
            seen.add(op.expected)
    return [op for op in kept if op.outcome == "ok" or op.value in seen]


@dataclass
class _Entry:
    op: int
    is_call: bool
    match: _Entry | None = None
    prev: _Entry | None = None
    next: _Entry | None = None


def _events(ops: list[Op]) -> _Entry:
    """A doubly linked list of call and return events in time order, behind a sentinel head.

    At equal times calls sort before returns, so touching operations count as concurrent."""
    order = sorted(
        [(op.invoke, 0, n) for n, op in enumerate(ops)] + [(op.end, 1, n) for n, op in enumerate(ops)],
    )
    head = _Entry(-1, False)
    calls: dict[int, _Entry] = {}
    last = head
    for _, is_return, n in order:
        entry = _Entry(n, not is_return, prev=last)
        if is_return:
            entry.match = calls[n]
            calls[n].match = entry
        else:
            calls[n] = entry
        last.next = entry
        last = entry
    return head


def _lift(entry: _Entry) -> None:
    """Take a call and its return out of the list."""
    for e in (entry, entry.match):
        assert e is not None and e.prev is not None
        e.prev.next = e.next
        if e.next is not None:
            e.next.prev = e.prev


def _unlift(entry: _Entry) -> None:
    for e in (entry.match, entry):
        assert e is not None and e.prev is not None
        e.prev.next = e
        if e.next is not None:
            e.next.prev = e


def check_key(key: str, ops: list[Op], deadline: float = INFINITY, initial: str | None = None) -> bool | None | KeyFailure:
    """True if one key's history is linearizable, a KeyFailure if not, None past `deadline`."""
    ops = relevant(ops)
    if not ops:
        return True
    head = _events(ops)
    cache: set[tuple[int, str | None]] = set()
    stack: list[tuple[_Entry, str | None]] = []
    state, linearized = initial, 0
    best: list[int] | None = None
    stuck = -1
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps % 4096 == 0 and time.monotonic() > deadline:
            return None
        assert entry is not None
        if entry.is_call:
            allowed, after = step(state, ops[entry.op])
            marked = linearized | (1 << entry.op)
            if allowed and (marked, after) not in cache:
                cache.add((marked, after))
                stack.append((entry, state))
                state, linearized = after, marked
                _lift(entry)
                entry = head.next
            else:
                entry = entry.next
            continue
        if best is None or len(stack) > len(best):
            best, stuck = [e.op for e, _ in stack], entry.op
        if not stack:
            return _failure(key, ops, best, stuck)
        entry, state = stack.pop()
        linearized &= ~(1 << entry.op)
        _unlift(entry)
        entry = entry.next
    return True


def _failure(key: str, ops: list[Op], best: list[int], stuck: int) -> KeyFailure:
    blocked = ops[stuck]
    placed = set(best)
    concurrent = [op for n, op in enumerate(ops) if n not in placed and n != stuck and op.invoke <= blocked.end and op.end >= blocked.invoke]
    return KeyFailure(key, [ops[n] for n in best], blocked, concurrent[:8])


@dataclass(frozen=True)
class LostWrite:
    """An acknowledged write, and an observation that began after it completed yet saw a value
    every write of which had completed before it began: the write was lost (or the read stale)."""

    write: Op
    seen: Op

    def explain(self) -> str:
        return f"key {self.write.key!r}: acknowledged {describe(self.write)}, then {describe(self.seen)}: an older value"


def lost_writes(ops: Iterable[Op]) -> list[LostWrite]:
    """Witnesses of acknowledged writes missing from later reads, one per observation that saw the past.

    From the history alone a lost write and a stale read look alike; with every read
    linearizable (ReadIndex), it is the write that was lost. Clearer than a failed
    linearization, which only names where the search got stuck, and found in O(n log n)
    per key. Values must be unique per write, as the chaos clients make them; the absent
    value (None) counts as written before the history began."""
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    found = []
    for key_ops in by_key.values():
        produced: dict[str | None, float] = {None: -INFINITY}  # value -> when its last writer ended
        for op in key_ops:
            if (op.kind == "write" or (op.kind == "cas" and op.ok)) and op.outcome != "fail":  # an unknown cas may have written
                produced[op.value] = max(produced.get(op.value, -INFINITY), op.end)
        acked = sorted((op for op in key_ops if op.outcome == "ok" and op.kind != "read" and op.ok), key=lambda op: op.invoke)
        earliest = _suffix_earliest_end(acked)
        starts = [op.invoke for op in acked]
        for seen in key_ops:
            if seen.outcome != "ok" or not (seen.kind == "read" or (seen.kind == "cas" and not seen.ok)):
                continue
            written = produced.get(seen.observed, INFINITY)  # never written: not this check's business
            first = bisect_right(starts, written)  # acknowledged writes begun after the seen value was written
            if first < len(acked) and earliest[first].end < seen.invoke:
                found.append(LostWrite(earliest[first], seen))
    return found


def _suffix_earliest_end(ops: list[Op]) -> list[Op]:
    """For each position, the op ending first among it and those after it."""
    best: list[Op] = []
    for op in reversed(ops):
        best.append(op if not best or op.end < best[-1].end else best[-1])
    return best[::-1]


def check(ops: Iterable[Op], budget_s: float = 60.0) -> Verdict:
    """Check every key of a history within `budget_s` seconds in total."""
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    deadline = time.monotonic() + budget_s
    verdict = Verdict(True, keys=len(by_key), operations=sum(len(v) for v in by_key.values()))
    for key in sorted(by_key):
        result = check_key(key, by_key[key], deadline)
        if isinstance(result, KeyFailure):
            verdict.failures.append(result)
            verdict.linearizable = False
        elif result is None:
            verdict.undecided.append(key)
            if verdict.linearizable:
                verdict.linearizable = None
    return verdict
