"""Advisory locks that live beside what they protect.

All locks of a pool are byte-range locks (fcntl/POSIX, the kind NFS's lock manager carries
between hosts) on one file inside the pool itself, `.reconciler/locks`: a lock named N is the
one byte at an offset derived from N's sha256 (62 bits, so two names never share a byte in
practice). So two reconcilers sharing a pool, as two processes or two hosts, see the same
locks; taking one is a single system call with no file to create; and the kernel releases a
process's locks when it dies, so a crash never leaves a lock behind.

POSIX locks belong to the process: the one file stays open for the process's life (closing
any descriptor of it would drop every lock on it), and a process does not nest two locks of
the same name. Exclusive locks serialise work on one volume or cache entry; cache users
hold the entry's lock shared so garbage collection waits for them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_open_files: dict[str, int] = {}
_open_lock = threading.Lock()


def _offset(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 2


class LockDir:
    """The locks of one pool, in the file `path/locks`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _fd(self) -> int:
        key = str(self.path)
        with _open_lock:
            fd = _open_files.get(key)
            if fd is None:
                self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
                # O_NOFOLLOW: a planted symlink cannot make us lock or create a file elsewhere.
                fd = os.open(
                    os.path.join(self.path, "locks"),
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                _open_files[key] = fd
            return fd

    @contextmanager
    def hold(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the lock `name`, waiting (blocked in the kernel) while another holds it."""
        fd = self._fd()
        off = _offset(name)
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.lockf(fd, op | fcntl.LOCK_NB, 1, off)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.info("lock.wait", lock=name, shared=shared, dir=str(self.path))
            fcntl.lockf(fd, op, 1, off)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, off)

    def try_hold(self, name: str) -> bool:
        """Take the lock exclusively without waiting; True if taken (release with release)."""
        try:
            fcntl.lockf(self._fd(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(name))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self, name: str) -> None:
        fcntl.lockf(self._fd(), fcntl.LOCK_UN, 1, _offset(name))
