"""A file the reconciler writes for an operator (an exported disk): whole or absent.

Order of changes, with the step boundaries (util/faults.py) in brackets:

  `.NAME.export-tmp` beside FILE made (O_EXCL, 0600, never through a link) and locked
  (flock) [outfile.created] -> the caller writes it -> fsynced [outfile.written] ->
  hard-linked to FILE (link(2) fails if FILE exists; with `force`, rename(2) replaces it
  at once) [outfile.linked] -> the temporary's name removed, the directory fsynced
  [outfile.done].

So a SIGKILL leaves either no FILE or the whole one, and at most the temporary, which
the next write to FILE removes: a temporary nobody holds locked is a dead writer's (a
live writer holds its lock until it is done), and a temporary still locked is another
writer's, which is an error here, never overwritten. The temporary is checked to be
the file this writer locked after taking the lock (another writer may have removed an
unlocked one in between), so two writers never write into, or link, one file.
A failure (not a kill) removes the temporary at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from reconciler.model.errors import ReconcileError
from reconciler.util import faults

TEMP_SUFFIX = ".export-tmp"


class OutFileError(ReconcileError):
    """FILE cannot be written (its directory, an existing FILE, another writer)."""


def temp_path(target: Path) -> Path:
    """Where the file bound for `target` is written first: beside it, hidden."""
    return target.with_name(f".{target.name}{TEMP_SUFFIX}")


@dataclass
class OutFile:
    """The temporary being written; `fd` is open read-write."""

    target: Path
    temp: Path
    fd: int


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def check_target(target: Path, *, force: bool) -> None:
    """Refuse early (before any data is read) what linking would refuse at the end."""
    parent = target.parent
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise OutFileError(f"{target}: its directory {parent} does not exist") from None
    except OSError as e:
        raise OutFileError(f"{target}: its directory {parent}: {_why(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutFileError(f"{target}: {parent} is not a directory")
    try:
        tst = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutFileError(f"{target}: {_why(e)}") from None
    if stat.S_ISDIR(tst.st_mode):
        raise OutFileError(f"{target} is a directory")
    if not force:
        raise OutFileError(f"{target} exists; not overwritten (--force replaces it)")


def _open_locked(temp: Path) -> int:
    """Our temporary, made new and locked; a dead writer's is removed first."""
    for _ in range(10):
        try:
            fd = os.open(
                temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            _remove_stale(temp)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o600)  # whatever the umask: a disk's bytes are not for all
            same = os.lstat(temp)
            mine = os.fstat(fd)
            if (same.st_dev, same.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass  # another writer removed it before we locked it: make another
        except BlockingIOError:
            pass  # another writer took it between our create and our lock
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OutFileError(f"{temp}: another writer keeps replacing it; try again")


def _remove_stale(temp: Path) -> None:
    """Remove a temporary no live writer holds (a killed export's); refuse a held one."""
    try:
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            os.unlink(temp)  # a link where our temporary belongs is nobody's file to keep
            return
        raise OutFileError(f"{temp}: {_why(e)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutFileError(f"{temp} is not a regular file; remove it yourself")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutFileError(
                f"another export to {temp.parent / temp.name[1 : -len(TEMP_SUFFIX)]} is "
                f"under way ({temp} is locked)"
            ) from None
        # Ours now: still the file at that name? Then it is a dead writer's.
        with suppress(FileNotFoundError):
            same = os.lstat(temp)
            mine = os.fstat(fd)
            if (same.st_dev, same.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(temp)
    finally:
        os.close(fd)


def sweep(target: Path) -> bool:
    """Remove a dead writer's temporary of `target`, if any: whether one was removed."""
    temp = temp_path(target)
    if not os.path.lexists(temp):
        return False
    _remove_stale(temp)
    return not os.path.lexists(temp)


def fsync_dir(path: Path) -> None:
    """fsync(2) the directory `path`: the names made or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def written(target: Path, *, force: bool = False) -> Iterator[OutFile]:
    """The temporary for `target`, to write into; on leaving the block without error it
    is fsynced and put in place (see the module docstring). OSError while it is made or
    put in place (ENOSPC, EACCES, EIO) ends as OutFileError naming FILE."""
    target = Path(os.path.abspath(target))
    check_target(target, force=force)
    temp = temp_path(target)
    try:
        fd = _open_locked(temp)
    except OSError as e:
        raise OutFileError(f"cannot write beside {target}: {_why(e)}") from None
    faults.point("outfile.created")
    placed = False
    try:
        try:
            yield OutFile(target, temp, fd)
            os.fsync(fd)
            faults.point("outfile.written")
            if force:
                os.rename(temp, target)
            else:
                os.link(temp, target)
            placed = True
            faults.point("outfile.linked")
            if not force:
                os.unlink(temp)
            fsync_dir(target.parent)
            faults.point("outfile.done")
        except FileExistsError:
            raise OutFileError(f"{target} exists; not overwritten (--force replaces it)") from None
        except IsADirectoryError:
            raise OutFileError(f"{target} is a directory") from None
        except OSError as e:
            raise OutFileError(f"writing {target}: {_why(e)}") from None
    finally:
        if not placed:
            with suppress(FileNotFoundError):
                os.unlink(temp)  # our own (we hold its lock): a failure leaves nothing
        os.close(fd)
