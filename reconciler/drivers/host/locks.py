"""Advisory locks that live beside what they protect.

All locks of a pool are byte-range locks on one file inside the pool itself,
`.reconciler/locks`: a lock named N is the one byte at an offset derived from N's sha256
(62 bits, so two names never share a byte in practice). So two reconcilers sharing a pool,
as two processes or two hosts, see the same locks; taking one is a single system call with
no file to create; and the kernel releases a lock when its holder dies, so a crash never
leaves a lock behind.

They are Linux's open-file-description locks (F_OFD_SETLK, since Linux 3.15), not classic
POSIX ones. A POSIX lock belongs to the whole process, so two threads of one reconciler
would both "get" the same lock, and closing any descriptor of the file would drop every
lock the process holds. An OFD lock belongs to one open of the file: each hold below uses
a descriptor of its own (kept in a small pool for reuse), so threads exclude each other
exactly as processes do. OFD and POSIX locks on the same bytes conflict with each other.
On NFS, Linux's client hands both kinds to the server's lock manager through the same
path, the lock owner being the open file instead of the process (the tests here have no
NFS server, so that is from the kernel's design, not measured). Descriptors are opened
O_CLOEXEC: an OFD lock lives as long as any copy of its descriptor, and a qemu-img we
start must not keep one alive. Exclusive locks serialise work on one volume or cache
entry; cache users hold the entry's lock shared so garbage collection waits for them. One
thread must not take the same lock twice (the second would wait for the first forever).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from reconciler.util.logs import get_logger

log = get_logger(__name__)

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)

# Idle descriptors of each lock file, ready for the next hold (they hold no lock).
_free: dict[str, list[int]] = {}
_free_lock = threading.Lock()


def _offset(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 2


def _flock(kind: int, offset: int) -> bytes:
    """struct flock (LP64 Linux): type, whence, start, length, pid (0: OFD locks require
    it), padded to the struct's 32 bytes."""
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


class LockDir:
    """The locks of one pool, in the file `path/locks`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = os.path.join(path, "locks")

    def _take_fd(self) -> int:
        with _free_lock:
            idle = _free.get(self._file)
            if idle:
                return idle.pop()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_NOFOLLOW: a planted symlink cannot make us lock or create a file elsewhere.
        return os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def _give_back(self, fd: int) -> None:
        with _free_lock:
            _free.setdefault(self._file, []).append(fd)

    def _set(self, fd: int, kind: int, offset: int, wait: bool) -> bool:
        """Take (or with F_UNLCK drop) the byte; False if another holder has it (no wait)."""
        try:
            fcntl.fcntl(fd, F_OFD_SETLKW if wait else F_OFD_SETLK, _flock(kind, offset))
        except OSError as e:
            if not wait and e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _release(self, fd: int, offset: int) -> None:
        try:
            self._set(fd, fcntl.F_UNLCK, offset, wait=False)
        except OSError:
            os.close(fd)  # closing the descriptor drops its locks, and only its own
        else:
            self._give_back(fd)

    @contextmanager
    def _held(self, name: str, kind: int, *, wait: bool) -> Iterator[bool]:
        """Take the byte of `name` on a descriptor of its own; yields whether it was taken
        (with `wait`, always: it waits, blocked in the kernel, while another holds it)."""
        fd = self._take_fd()
        off = _offset(name)
        try:
            taken = self._set(fd, kind, off, wait=False)
            if not taken and wait:
                log.info("lock.wait", lock=name, shared=kind == fcntl.F_RDLCK, dir=str(self.path))
                taken = self._set(fd, kind, off, wait=True)
        except BaseException:
            self._give_back(fd)  # no lock was taken on it
            raise
        if not taken:
            self._give_back(fd)
            yield False
            return
        try:
            yield True
        finally:
            self._release(fd, off)

    @contextmanager
    def hold(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the lock `name`, waiting (blocked in the kernel) while another holds it."""
        with self._held(name, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, wait=True):
            yield

    def attempt(self, name: str) -> AbstractContextManager[bool]:
        """Take the lock exclusively if nobody holds it; yields whether it was taken."""
        return self._held(name, fcntl.F_WRLCK, wait=False)
