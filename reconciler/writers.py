"""Which files some process holds open for writing, as Linux's /proc tells.

The loop never acts on a manifest that a writer still holds open: a file rewritten in place
(`cat >`, `cp`, an editor that does not rename) is a valid manifest naming fewer disks for
as long as the write is paused. inotify says when a writer closed the file; this says, for
a file that had writes and no close yet (or whose events were missed), whether a writer is
still there. It sees only the processes this one may inspect (all of them as root, the
loop's usual user); a writer it cannot see is covered by the loop's settle time alone.
"""

from __future__ import annotations

import os
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


def held_for_writing(paths: Iterable[str]) -> set[str]:
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
