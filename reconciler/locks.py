"""Advisory file locks that live beside what they protect.

A lock is a file under the pool's own directory (`.reconciler/locks/`), so two reconcilers
that share a pool, as two processes or, over NFS, two hosts, see the same locks. flock(2)
locks belong to the open file description, so they are released when the process dies:
a crash never leaves a lock behind. Exclusive locks serialise work on one volume or cache
entry; cache users hold the entry's lock shared so garbage collection can wait for them.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class LockDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self, name: str) -> int:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_NOFOLLOW: a planted symlink cannot make us create or lock a file elsewhere.
        return os.open(
            self.path / f"{name}.lock",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )

    @contextmanager
    def hold(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the lock `name`, waiting (blocked in the kernel) while another holds it."""
        fd = self._open(name)
        try:
            op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                log.info("lock.wait", lock=name, shared=shared, dir=str(self.path))
                fcntl.flock(fd, op)
            yield
        finally:
            os.close(fd)

    def try_hold(self, name: str) -> int | None:
        """Take the lock exclusively without waiting; returns the fd to close, or None."""
        fd = self._open(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd
