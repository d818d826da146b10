"""The one way the reconciler opens an input file that someone else may have put there.

The manifest directory is written by another service (Nova), and the reconciler runs as
root, so a name in it may be anything: a symbolic link to /etc/shadow, a FIFO (an open
for reading waits for a writer, for ever), a device (/dev/zero never ends), a directory,
a file of gigabytes. `read_regular` reads only regular files, and never waits:

- the name is opened with O_PATH (no open of the object itself: no FIFO wait, no device
  side effect) and, unless the caller allows following, O_NOFOLLOW, so a link is found
  as the link itself and refused;
- the opened object's own fstat decides (not a stat of the name, which another process can
  swap between the stat and the open): anything but a regular file is refused;
- only then is that same object opened for reading (through /proc/self/fd, so it is the
  inode just checked; where /proc is missing, the name is opened again, O_NONBLOCK and
  O_NOFOLLOW, and must still be that inode), and at most `limit` + 1 bytes are read.

Every refusal is an InputError naming the file and quoting nothing of it. The fstat of
what was read comes back with the bytes, so a cache keyed on a file's identity is keyed
on what was actually read (reconciler/schema/mcache.py).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from reconciler.errors import InputError, Location

MAX_FILE_BYTES = 1 << 20

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class FileRead:
    """A regular file's bytes (at most the limit) and the fstat of the opened file."""

    data: bytes
    stat: os.stat_result


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"  # pragma: no cover - every type Linux has is listed


def read_regular(
    path: str,
    *,
    limit: int = MAX_FILE_BYTES,
    follow: bool = False,
    display: str | None = None,
) -> FileRead:
    """Read the regular file at `path` without blocking; raises InputError (one line,
    naming `display` or `path`, quoting nothing of the file) for anything else.

    `follow` allows a symbolic link as the last component (the config, an argument of the
    operator's); manifests are never read through one (README: the manifest directory).
    """
    where = Location(display or path)
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC | nofollow)
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", where) from None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{kind_of(st.st_mode)}, not a regular file: only regular files are read", where
            )
        if st.st_size > limit:
            raise InputError(f"file is larger than {limit} bytes", where)
        fd = _reopen(pfd, path, st, nofollow, where)
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)  # what is read: its times and size, for a cache's key
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", where) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise InputError(f"file is larger than {limit} bytes", where)
    return FileRead(data, st)


def _reopen(pfd: int, path: str, st: os.stat_result, nofollow: int, where: Location) -> int:
    """Open for reading the regular file `pfd` (an O_PATH descriptor) refers to."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(f"/proc/self/fd/{pfd}", flags)
    except FileNotFoundError:
        pass  # no /proc: open the name again, and check it is still the same file
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", where) from None
    try:
        fd = os.open(path, flags | nofollow)
    except OSError as e:
        what = "it was replaced by a link" if e.errno == errno.ELOOP else e.strerror
        raise InputError(f"cannot read file: {what}", where) from None
    again = os.fstat(fd)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise InputError("the file was replaced while it was opened; run again", where)
    return fd
