"""The state directory is the reconciler's alone: 0700, and every file in it 0600.

What it holds says what exists where (the records name every disk's instance, pool,
volume and image; the status every instance's errors; the manifest cache every manifest;
`watch.lock` the loop's PID), and the records decide what the reconciler does, so nobody
else may read, add or replace anything there. The modes are set with an explicit chmod,
never left to the umask (under `umask 000` a mkdir of 0700 is 0700, but one of the
parents `mkdir -p` makes is 0777, and SQLite makes its files 0644 minus the umask).

- `private_dir` makes a directory, and each missing parent, 0700. An existing one of this
  user's that others may use is tightened to 0700, with a warning: the state directory of
  an older reconciler (made under the umask) is fixed on its first run, on every host,
  rather than reported in a log nobody reads; nothing of the reconciler's needs another
  user to see into it. One owned by another user is left as it is, with a warning: whose
  it should be is the operator's decision (it may be a mount of another file system).
- `private_file` makes a file 0600 before anything opens it (SQLite then gives a
  database's -wal and -shm the database's own mode), and tightens an existing one of this
  user's, and its SQLite side files, that others may read or write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from reconciler.util.logs import get_logger

log = get_logger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) 0700, or tighten it; raises OSError if it cannot be
    made, FileExistsError if something else is there (as `mkdir -p` does)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _make(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    _tighten(str(path), st, os.chmod)


def private_file(path: Path, side_files: tuple[str, ...] = SQLITE_SIDE_FILES) -> None:
    """Make `path` an empty 0600 file if it is missing, or tighten it (and `side_files`,
    names with these suffixes beside it) if others may use it; raises OSError if it cannot
    be made. Anything but a regular file at `path` is left for the caller to report."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:  # made meanwhile by another process: as if found
            fd = os.open(path, flags)
        else:
            try:
                os.fchmod(fd, FILE_MODE)  # exactly, whatever the umask took away
            finally:
                os.close(fd)
            return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            _tighten(str(path), st, lambda _p, mode: os.fchmod(fd, mode))
    finally:
        os.close(fd)
    for suffix in side_files:
        side = f"{path}{suffix}"
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(side)
            if stat.S_ISREG(st.st_mode):
                _tighten(side, st, os.chmod)


def _make(path: Path) -> None:
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: private_dir's next call checks it
        os.chmod(d, DIR_MODE)


def _tighten(path: str, st: os.stat_result, chmod: Callable[[str, int], None]) -> None:
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if not loose:
        return
    was = f"{stat.S_IMODE(st.st_mode):04o}"
    if st.st_uid != os.geteuid():
        log.warning(
            "state.foreign_owner",
            path=path,
            uid=st.st_uid,
            mode=was,
            why="the state directory's files say what exists where; make them this user's",
        )
        return
    new = stat.S_IMODE(st.st_mode) & ~0o077 & 0o7777
    try:
        chmod(path, new)
    except OSError as e:  # a read-only file system: the run goes on, and says so
        log.warning("state.not_tightened", path=path, mode=was, error=e.strerror or str(e))
        return
    log.warning("state.tightened", path=path, mode_was=was, mode=f"{new:04o}")
