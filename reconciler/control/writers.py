"""Which files some process holds open for writing, as Linux's /proc tells.

The loop never acts on a manifest that a writer still holds open: a file rewritten in place
(`cat >`, `cp`, an editor that does not rename) is a valid manifest naming fewer disks for
as long as the write is paused. inotify says when a writer closed the file; this says, for
a file that had writes and no close yet (or whose events were missed), whether a writer is
still there. It sees only the processes this one may inspect (all of them as root, the
loop's usual user); a writer it cannot see is covered by the loop's settle time alone.

First, and cheaply, the kernel is asked: a read lease (F_SETLEASE F_RDLCK) is refused with
EAGAIN while any process (in any PID namespace) has the file open for writing, and is
released at once when granted. It needs the file's owner or CAP_LEASE; where it cannot be
had (EACCES, a file system without leases), one pass over /proc answers instead. A writer
that opens the file in the microseconds the lease is held waits until it is released (one
opening with O_NONBLOCK gets EWOULDBLOCK); the lease break is told with SIGURG, which no
one here handles and whose default is to be ignored (SIGIO's would end the process).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from collections.abc import Iterable

PROC = "/proc"


def _write_mode(pid: str, fd: str) -> bool:
    try:
        with open(f"{PROC}/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags:"):
                    return (int(line.split()[1], 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        pass  # the process or the descriptor went away meanwhile
    return False


def _lease(path: str) -> bool | None:
    """Whether `path` is open for writing, as a read lease says; None: it cannot say."""
    try:
        # Only a regular file is opened: opening a device or a FIFO may do something.
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            return True if e.errno == errno.EAGAIN else None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError:
        return None
    finally:
        os.close(fd)


def held_for_writing(paths: Iterable[str], *, scan: bool = True) -> set[str]:
    """The given files that a process holds open for writing: by a read lease, else (if
    `scan`) by one pass over /proc."""
    held: set[str] = set()
    unknown: list[str] = []
    for p in paths:
        answer = _lease(p)
        if answer:
            held.add(p)
        elif answer is None:
            unknown.append(p)
    if unknown and scan:
        held |= _scan(unknown)
    return held


def _scan(paths: Iterable[str]) -> set[str]:
    """The given files that a process holds open for writing (one pass over /proc)."""
    wanted: dict[tuple[int, int], list[str]] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        wanted.setdefault((st.st_dev, st.st_ino), []).append(p)
    if not wanted:
        return set()
    held: set[str] = set()
    try:
        pids = [e for e in os.listdir(PROC) if e.isdigit()]
    except OSError:
        return held
    for pid in pids:
        try:
            fds = os.listdir(f"{PROC}/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                st = os.stat(f"{PROC}/{pid}/fd/{fd}")
            except OSError:
                continue
            found = wanted.get((st.st_dev, st.st_ino))
            if found and _write_mode(pid, fd):
                held.update(found)
    return held
