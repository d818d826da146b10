"""What each volume's first bytes announced when last read, so a converged run does not
open 30,000 files to find every header as it was (bench/plan.py: a fifth of a repeat plan).

The header is read for a warning only (drivers/ingest/headers.py; DESIGN invariant 1:
nothing is ever decided from it). An entry is the format a regular file's header announced
with the file's identity when it was read: device, inode, size, mtime and ctime of the
fstat of the very descriptor the bytes were read from. It is used only for a name whose own
lstat (never following a link) is a regular file with that same identity. Whatever writes
the file through the file system (a guest through qemu, a loop device, mmap) changes its
mtime and ctime; utimensat can set mtime back but not ctime. Only files whose times were
at least two seconds in the past when they were read are kept (SAFE_AGE_NS, as the
manifest cache and git's index do): a write in the same clock tick as the read cannot go
unseen. A block device (whose times its writers do not change) is never kept: it is read
every run.

The file sits in the state directory and is someone else's input only if someone else can
write it: it is read only if it is a regular file this user owns and nobody else can write
(the state directory is 0700), and every entry is checked for its shape (five integers and
a known format name) as it is read; a damaged file, or one written by other code (its
fingerprint), is ignored. Losing it costs one run its speed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.drivers.ingest import headers
from reconciler.schema.speed.owncache import read_own
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir

log = get_logger(__name__)

SAFE_AGE_NS = 2_000_000_000
MAX_BYTES = 1 << 28
Key = tuple[int, int, int, int, int]

# The formats header_format names (and nothing a failed read gives: those are read again).
FORMATS = frozenset(
    {"raw", "qcow", "qcow2", "qed", "vmdk", "vpc", "vdi", "luks", "cow", "ploop", "vhdx", "bochs"}
)


@functools.cache  # once a process: the code that runs, not what is on disk later
def _fingerprint() -> str:
    h = hashlib.sha256(__version__.encode())
    h.update(Path(headers.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def stat_key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def cache_path(state_dir: Path, pool: str) -> Path:
    # A pool's name is a config key (a name: no '/'); hashed, it is a file name whatever it is.
    return state_dir / f"header-cache-{hashlib.sha256(pool.encode()).hexdigest()[:16]}.json"


class HeaderCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fingerprint = _fingerprint()
        self.entries: dict[str, Any] = {}
        self.fresh: dict[str, list[Any]] = {}
        self.dirty = False
        read = read_own(path, limit=MAX_BYTES, event="header_cache")
        if read is None:
            return  # missing or unusable: it is only a cache
        try:
            doc = json.loads(read.data)
            if (
                isinstance(doc, dict)
                and doc.get("fingerprint") == self.fingerprint
                and isinstance(doc.get("entries"), dict)
            ):
                self.entries = doc["entries"]
        except (ValueError, RecursionError):
            self.entries = {}  # damaged: it is only a cache

    def get(self, volume: str, st: os.stat_result) -> str | None:
        """The format the header of `volume` announced, if its lstat `st` is a regular file
        with the identity it had when read; None: read it."""
        e = self.entries.get(volume)
        if e is None or not stat.S_ISREG(st.st_mode):
            return None
        # [dev, ino, size, mtime_ns, ctime_ns, format]; anything else is not used (a
        # number that equals the stat's, of whatever type, is that identity).
        try:
            if (
                e[:5] != [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
                or len(e) != 6
                or e[5] not in FORMATS
            ):
                return None
        except TypeError:  # not a list, or an unhashable format
            return None
        self.fresh[volume] = e
        fmt: str = e[5]
        return fmt

    def put(self, volume: str, st: os.stat_result, fmt: str) -> None:
        """Keep what the header of a regular file read with fstat `st` announced, if the
        file's times are old enough to show its next change."""
        if (
            stat.S_ISREG(st.st_mode)
            and fmt in FORMATS
            and max(st.st_mtime_ns, st.st_ctime_ns) <= time.time_ns() - SAFE_AGE_NS
        ):
            self.fresh[volume] = [*stat_key(st), fmt]
            self.dirty = True

    def save(self) -> None:
        """Write the entries used or added by this run (stale ones drop out), if that is not
        what the file holds; a failure is logged, as losing the cache only costs speed."""
        if not self.dirty and self.fresh.keys() == self.entries.keys():
            return
        from reconciler.schema.write import write_atomic

        try:
            private_dir(self.path.parent)
            doc = {"fingerprint": self.fingerprint, "entries": self.fresh}
            write_atomic(str(self.path), json.dumps(doc, separators=(",", ":")))
        except OSError as e:
            log.warning("header_cache.write_failed", path=str(self.path), error=str(e))
