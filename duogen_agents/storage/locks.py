"""Lock files that cannot be turned against other files.

A lock file lives in a folder of ours, is opened without following symlinks (``O_NOFOLLOW``) and must
be a regular file: a symlink planted at its path is refused, never truncated or written through.
Locks are ``flock`` locks, so they die with their process (``kill -9`` included).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from duogen_agents.errors import StorageError


def open_lock_file(path: Path, *, create: bool = True) -> int:
    """Open ``path`` for locking; returns the descriptor (the caller closes it)."""
    folder = path.parent
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise StorageError(f"{folder} is not a folder (a symlink?); remove it and try again")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StorageError(f"lock file {path} is a symbolic link; refusing to follow it (remove it)") from None
        if e.errno == errno.ENOSPC:
            from duogen_agents.storage.images import no_space_message

            raise StorageError(no_space_message(folder)) from None
        raise StorageError(f"cannot open lock file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"lock file {path} is not a regular file; remove it and try again")
    return fd


def try_flock(fd: int, operation: int) -> bool:
    """``flock`` without blocking; False when another process holds a conflicting lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def flocked(path: Path, *, shared: bool = False, timeout: float = 60.0) -> Iterator[None]:
    """Hold a shared or exclusive lock on ``path`` for the ``with`` block (polling up to ``timeout``)."""
    fd = open_lock_file(path)
    try:
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        while not try_flock(fd, op):
            if time.monotonic() >= deadline:
                raise StorageError(f"timed out waiting for the lock {path}")
            time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
