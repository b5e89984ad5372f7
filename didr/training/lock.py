"""One writer per output: an exclusive fcntl.flock on `.<name>.lock` beside an output or checkpoint folder.

The lock file holds the holder's pid and host; a second process stops at once with one line naming them. The
holder removes the file when it is done; the kernel releases the lock when the holder exits however it exits, so
the file a kill -9 leaves is harmless: the next process takes it over. flock works across processes of one host
and, on Linux, over NFS v4.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock of an output; the message names it, its pid and its host."""


def lock_file(target: Path) -> Path:
    """The lock file of an output or checkpoint folder: `.<name>.lock` beside it."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def hold_lock(target: Path) -> Iterator[Path]:
    """Hold the exclusive lock of `target` for the block (yields the lock file); LockedError if another process holds
    it. The lock file is created (with its folder) and removed when the block ends."""
    path = lock_file(Path(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = [*os.pread(fd, 256, 0).decode("utf-8", "replace").split(), "?", "?"][:2]
            os.close(fd)
            raise LockedError(
                f"{target} is being written by another didr process (pid {pid} on host {host}; lock {path}):"
                " wait for it to end"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting process then finds the file gone and retries
        os.close(fd)  # releases the lock
