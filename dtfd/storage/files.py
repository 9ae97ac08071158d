"""Durable file primitives: whole writes, atomic replacement, directory fsync.

The write and fsync functions can be swapped for fault injection (ENOSPC, EIO) in tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

WriteFn = Callable[[int, bytes], int]
FsyncFn = Callable[[int], None]


def write_all(fd: int, data: bytes, write: WriteFn = os.write) -> None:
    view = memoryview(data)
    while view:
        view = view[write(fd, view) :]


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, fsync: FsyncFn = os.fsync, write: WriteFn = os.write) -> None:
    """Replace `path` with `data` all at once: write a temp file, fsync, rename, fsync the dir."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data, write)
        fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
