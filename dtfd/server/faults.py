"""Test-only faults of a running node above its storage, for recoveryd's tests: a state that
drifts from the others, leaked file descriptors or memory, a partition, a starved follower.

Nothing here runs unless DTF_NODE_FAULTS is set (storage faults are dtfd.storage.failpoints).

DTF_NODE_FAULTS=PATH   ({node} in PATH is replaced by the node's id)
    While PATH is absent the node only stats it, every POLL_S. A test writes commands
    into it (`command`); the node reads them, deletes the file and obeys, so each
    command acts once, on that one process (a restarted node starts clean). One a line:
      diverge          change the state machine behind Raft's back: from now on this
                       node's checksum differs from the others' at the same index
      leak_fds N       open N file descriptors and keep them
      leak_rss BYTES   allocate and touch BYTES of memory and keep it
      drop TYPE...     drop incoming peer messages of these types (e.g. `drop append`:
                       a follower that hears heartbeats but gets no entries)
      isolate          drop every Raft message to and from the peers; the API still answers
      heal             stop dropping
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping

import trio

from dtfd.journal import fields
from dtfd.raft import Message, MessageType
from dtfd.server.node import Node
from dtfd.storage.files import write_atomically

log = logging.getLogger("dtf.faults")

FAULTS_ENV = "DTF_NODE_FAULTS"
POLL_S = 0.05
LEAK_CHUNK = 4 << 20  # memory is leaked a chunk at a time, so the node keeps leading and answering meanwhile
DIVERGED_KEY = "dtf-fault-diverged"


def command(path: str, *lines: str) -> None:
    """Ask the node watching `path` to inject faults (lines as in the module docstring)."""
    write_atomically(path, "".join(f"{line}\n" for line in lines).encode())


class Faults:
    def __init__(self, path: str, node_id: str) -> None:
        self.path, self.node_id = path, node_id
        self.dropped_in: frozenset[MessageType] = frozenset()
        self.isolated = False
        self._kept: list[object] = []  # leaked fds and memory, alive as long as the process

    @classmethod
    def from_env(cls, node_id: str, environ: Mapping[str, str] = os.environ) -> Faults | None:
        path = environ.get(FAULTS_ENV)
        if not path:
            return None
        path = path.replace("{node}", node_id)
        log.warning("node faults enabled (test only) %s", fields(node=node_id, path=path))
        return cls(path, node_id)

    def sender(self, send: Callable[[Iterable[Message]], None]) -> Callable[[Iterable[Message]], None]:
        def filtered(messages: Iterable[Message]) -> None:
            if not self.isolated:
                send(messages)

        return filtered

    def drops(self, message: Message) -> bool:
        """Whether an incoming peer message is lost."""
        return self.isolated or message.type in self.dropped_in

    async def run(self, node: Node) -> None:
        while True:
            await trio.sleep(POLL_S)
            try:
                with open(self.path) as f:
                    text = f.read()
                os.unlink(self.path)
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                if line.strip():
                    await self.obey(line.split(), node)

    async def obey(self, words: list[str], node: Node) -> None:
        name, args = words[0], words[1:]
        try:
            if name == "diverge":
                node.machine.image.kv[DIVERGED_KEY] = node.id
            elif name == "leak_fds":
                self._kept += [os.open(os.devnull, os.O_RDONLY) for _ in range(int(args[0]))]
            elif name == "leak_rss":
                for start in range(0, int(args[0]), LEAK_CHUNK):
                    self._kept.append(b"\x01" * min(LEAK_CHUNK, int(args[0]) - start))  # written, so resident
                    await trio.sleep(0.005)
            elif name == "drop":
                self.dropped_in = frozenset(MessageType[a.upper()] for a in args)
            elif name == "isolate":
                self.isolated = True
            elif name == "heal":
                self.dropped_in, self.isolated = frozenset(), False
            else:
                raise ValueError(f"unknown fault {name!r}")
        except (ValueError, IndexError, KeyError) as exc:
            log.error("fault command refused %s", fields(node=self.node_id, command=" ".join(words), error=exc))
            return
        log.warning("fault injected %s", fields(node=self.node_id, command=" ".join(words)))
