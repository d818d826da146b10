"""The pool's image names (what `rbd ls` lists), kept in the host's state directory between
runs for as long as the RADOS objects they are listed from are unchanged, so a plan that
changes nothing does not pay for the whole pool's listing (it grows with every host's
disks: 70 ms at 9,000 images) but for two `stat`s.

librbd lists a pool's images from two objects of its default namespace: `rbd_directory`
(every image's name, format 2 in its omap, format 1 in its data) and `rbd_trash` (images
being migrated). RADOS gives every object a version that grows with each write to it
(data, omap, or a delete and re-create), so a listing made while both versions stayed the
same is the listing at those versions. A run stats both objects, and uses the kept names
only if their versions (and the cluster's fsid, the pool's id and name) are exactly those
the names were listed at; else it lists the pool, stats both again, and keeps the names
only if nothing changed meanwhile. The stat is made where the listing was: the pool's
volumes are still observed before its records (control/session.py), and the names seen are
the pool's at that moment, as a listing's are.

The file (`rbd-listing-<pool>.json`, 0600 in the 0700 state directory) is this host's own;
it is read only if this user owns it and nobody else can write it (one others could write
is removed; one others can read is tightened to 0600), and anything wrong with it
(missing, damaged, another cluster's) makes a listing, never an error: it is only a cache.
The versions are read on a private ioctx (`get_last_version` is per ioctx).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.model.errors import InputError
from reconciler.schema.bounded import load_json
from reconciler.schema.readfile import read_regular
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir, private_file

log = get_logger(__name__)

PREFIX = "rbd-listing-"  # in the state directory: PREFIX + the config's pool name + .json
LISTED_FROM = ("rbd_directory", "rbd_trash")  # what librbd lists images from
MAX_BYTES = 256 << 20  # some 4 million names
FORMAT = 1


def path_for(state_dir: Path, pool: str) -> Path:
    """The file of the config's pool `pool` (a validated name: no slash)."""
    return state_dir / f"{PREFIX}{pool}.json"


def versions(rados: Any, io: Any) -> list[int]:
    """The version of each of LISTED_FROM (0: the object does not exist), read on `io`,
    an ioctx nobody else uses (its last version is per ioctx)."""
    out = []
    for oid in LISTED_FROM:
        try:
            io.stat(oid)
        except rados.ObjectNotFound:
            out.append(0)
            continue
        out.append(int(io.get_last_version()))
    return out


class KeptListing:
    """The kept names of one pool's images, in `path` (None: nothing is kept)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def names(
        self,
        key: dict[str, Any],
        now: Callable[[], list[int]],
        listing: Callable[[], frozenset[str]],
    ) -> frozenset[str]:
        """The pool's image names: kept ones if `now()` (the objects' versions) is what
        they were listed at, under the same `key` (fsid, pool id and name); else
        `listing()`, kept when the versions did not change while it ran."""
        if self.path is None:
            return listing()
        before = now()
        kept = self._read()
        if kept is not None and kept.get("key") == key and kept.get("versions") == before:
            names = kept.get("names")
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return frozenset(names)
        names = listing()
        if now() == before:
            self._write({"format": FORMAT, "key": key, "versions": before, "names": sorted(names)})
        return names

    def _read(self) -> dict[str, Any] | None:
        assert self.path is not None
        try:
            read = read_regular(str(self.path), limit=MAX_BYTES)
        except InputError as e:
            if os.path.lexists(self.path):
                log.warning("rbd_listing.ignored", path=str(self.path), why=e.message)
            return None
        st = read.stat
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.warning(
                "rbd_listing.ignored",
                path=str(self.path),
                why=f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}",
            )
            if st.st_uid == os.geteuid():  # others could write it: listed and made anew
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            return None
        if st.st_mode & 0o077:
            with contextlib.suppress(OSError):
                private_file(self.path, ())  # 0600, as every file of the state directory
        try:
            # Its own private file (above): its nesting is not scanned first (mcache.py).
            doc = load_json(read.data, what=str(self.path), max_depth=None, max_bytes=MAX_BYTES)
        except ValueError:
            return None  # damaged: list the pool
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        """Replace the file atomically (no fsync: a file a crash left empty or torn is
        damaged, and only costs a listing); a failure is logged."""
        assert self.path is not None
        try:
            private_dir(self.path.parent)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(json.dumps(doc, separators=(",", ":")).encode())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            log.warning("rbd_listing.write_failed", path=str(self.path), error=str(e))
