"""Reading one of the caches the reconciler keeps in its state directory (the manifest
cache, file pools' header caches, the judged record rows): each is trusted only as far as
its file is this process's own, so it is read only if it is a regular file (never through
a link, never blocking, bounded: readfile.read_regular) that this user owns and nobody
else can write. Anything else is logged once as `EVENT.ignored` with why, and the caller
goes on without it: losing a cache only costs a run its speed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reconciler.model.errors import InputError
from reconciler.schema.readfile import FileRead, read_regular
from reconciler.util.logs import get_logger

log = get_logger(__name__)


def read_own(path: Path, *, limit: int, event: str) -> FileRead | None:
    """The bytes (and fstat) of the cache at `path`, or None: missing (silently), or not a
    regular file this user owns that nobody else can write (logged as EVENT.ignored)."""
    try:
        read = read_regular(str(path), limit=limit)
    except InputError as e:
        if os.path.lexists(path):
            log.warning(f"{event}.ignored", path=str(path), why=e.message)
        return None
    st = read.stat
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        log.warning(
            f"{event}.ignored",
            path=str(path),
            why=f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}",
        )
        return None
    return read
