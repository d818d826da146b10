"""An lvm pool's LVs as this process knows them: made (`lvcreate`), renamed, cleared and
removed with LVM2's own tools (drivers/lvm/tools.py runs them, confined to the VG); the
host's locks of the VG; the temporary files and LVs of fetches, templates and imports.

Invariants:
- every LV the reconciler makes carries `reconciler.record:STORE/POOL`, the back-pointer to
  its record, set by the `lvcreate` that makes it, so every LV the reconciler made names
  the store that recorded it; sweep_temp removes only temporary LVs that carry ours;
- LV names are checked as LVM would before anything is made (a disk's in create_from_*,
  a cache entry's before its record);
- what this process knows of an LV (existence, the tags it wrote) is kept only while one
  of its threads holds the LV's lock (only a holder changes it), and dropped when the lock
  is taken and when it is released;
- delete clears the LV's extents first (volumeClear: zero, or none; volumeClearSize bytes,
  0 = all), since LVM hands freed extents to the next LV, then `lvremove`; a crash between
  leaves a cleared LV its record still claims, removed again next run;
- a VG is local to its host (no lvmlockd here), so the locks are the usual byte-range
  locks, in /run/lock/reconciler/lvm-VG/locks, shared by every reconciler on the host
  whatever its store.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from reconciler.drivers.api import VolumeExists
from reconciler.drivers.host.locks import LockDir
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.lvm.tools import (
    LvData,
    Lvm,
    LvmError,
    PiecesSink,
    PiecesSource,
    message,
    zero,
)
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.schema.common import lv_name_refusal
from reconciler.schema.config import LvmConfig
from reconciler.util import faults
from reconciler.util.statedir import private_dir

LOCK_ROOT = Path("/run/lock/reconciler")
BACKPOINTER = "reconciler.record:"
# An LV being filled before it takes its name (take_file); swept by sweep_temp.
LV_TEMP_PREFIX = "_tmp_"


def check_lv_name(name: str) -> None:
    """Refuse, before anything is made, a volume name LVM would refuse as an LV name
    (manifest validation refuses such disks already; cache entry names are checked here)."""
    why = lv_name_refusal(name)
    if why:
        raise ReconcileError(why)


class Lvs:
    """The LVs of one lvm pool's VG."""

    def __init__(self, name: str, config: LvmConfig, store: Callable[[], RecordStore]) -> None:
        self.name = name
        self.config = config
        self.store = store
        self.lvm = Lvm(name, config)
        self.data = LvData(self.lvm)
        self.vg = config.vg
        self._locks: LockDir | None = None
        self._mu = threading.Lock()
        self._held: Counter[str] = Counter()
        self._known: dict[str, bool] = {}
        self._tags: dict[str, list[str]] = {}

    # -- locks, and what is known under them --------------------------------------------

    def locks(self) -> LockDir:
        if self._locks is None:
            self._locks = LockDir(LOCK_ROOT / f"lvm-{self.vg}")
        return self._locks

    @contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        with self.locks().hold(name, shared=shared):
            with self._mu:
                self._held[name] += 1
                self._known.pop(name, None)
                self._tags.pop(name, None)
            try:
                yield
            finally:
                with self._mu:
                    self._held[name] -= 1
                    if not self._held[name]:
                        del self._held[name]
                        self._known.pop(name, None)
                        self._tags.pop(name, None)

    def note(self, lv: str, exists: bool, tags: list[str] | None = None) -> None:
        with self._mu:
            if lv in self._held:
                self._known[lv] = exists
                if tags is not None:
                    self._tags[lv] = tags
                else:
                    self._tags.pop(lv, None)

    def known_tags(self, lv: str) -> list[str] | None:
        """The tags this process wrote on `lv` while it holds its lock, if any."""
        with self._mu:
            return self._tags.get(lv)

    def exists(self, volume: str) -> bool:
        with self._mu:
            if volume in self._known:
                return self._known[volume]
        exists = self.lvm.lv_exists(volume)
        with self._mu:
            if volume in self._held:
                self._known[volume] = exists
        return exists

    @contextmanager
    def reader(self, volume: str, size: int | None = None) -> Iterator[PiecesSource]:
        with self.data.open(volume, size, write=False) as pieces:
            yield PiecesSource(pieces, f"{self.name}/{volume}", size)

    @contextmanager
    def writer(self, volume: str) -> Iterator[PiecesSink]:
        """All of the LV (whole extents), to be written whole."""
        with self.data.open(volume, None, write=True) as pieces:
            yield PiecesSink(pieces, f"{self.name}/{volume}")

    # -- LVs made, sized, renamed, removed ----------------------------------------------

    def backpointer(self) -> str:
        return f"{BACKPOINTER}{self.store().identity().id}/{self.name}"

    def create(self, name: str, size: int, *, contiguous: bool = False) -> None:
        check_lv_name(name)
        act = ["-ay"] if self.config.activate else ["-an"]
        if contiguous:
            act += ["--alloc", "contiguous"]
        tag = self.backpointer()
        rc, out, err = self.lvm.execute(
            "lvcreate", *act, "-Zn", "-Wn", "-L", f"{size}b", "-n", name, "--addtag", tag,
            self.vg, lv=name,
        )  # fmt: skip
        if rc != 0:
            msg = message(err, out)
            if "already exists" in msg:
                raise VolumeExists(
                    f"volume {name} appeared in pool {self.name} from elsewhere; it is not "
                    "ours and is left untouched"
                )
            raise LvmError(f"lvcreate failed in {self.lvm.where(name)}: {msg}")
        self.note(name, True, [tag])

    def size(self, lv: str) -> int:
        rows = self.lvm.report("lvs", "lv_name,lv_size", f"{self.vg}/{lv}", lv=lv)
        return int(rows[0]["lv_size"])

    def delete(self, volume: str) -> None:
        """Clear the LV's extents (volumeClear), then remove it; a missing one is fine."""
        if not self.exists(volume):
            return
        cfg = self.config
        if cfg.volume_clear == "zero":
            with self.data.open(volume, None, write=True) as pieces:
                zero(pieces, cfg.volume_clear_size or None)
            faults.point("volume.cleared")
        self.lvm.run("lvremove", "-y", f"{self.vg}/{volume}", lv=volume)
        self.note(volume, False)
        faults.point("volume.deleted")

    def rename(self, old: str, new: str, *, replace: bool) -> None:
        """`lvrename` in the VG (one metadata commit). It never takes an existing name
        (VolumeExists); with `replace`, an existing `new` is cleared and removed first
        (LVM has no rename over an LV): a crash between the two leaves `old` holding the
        data under its name, and the caller (a `switched` migration) renames it next run."""
        check_lv_name(new)
        if replace and self.exists(new):
            self.delete(new)
        rc, out, err = self.lvm.execute("lvrename", self.vg, old, new, lv=old)
        if rc != 0:
            msg = message(err, out)
            if "already exists" in msg:
                raise VolumeExists(
                    f"volume {new} exists in pool {self.name}; {old} is not renamed over it"
                )
            raise LvmError(f"lvrename failed in {self.lvm.where(old)}: {msg}")
        self.note(old, False)
        self.note(new, True)

    # -- temporary files and LVs --------------------------------------------------------

    def tmp_dir(self) -> Path:
        """Beside the records database: temporary files of fetches and templates."""
        d = Path(self.store().identity().location).parent / "lvm-tmp" / self.name
        private_dir(d)  # and lvm-tmp: 0700 whatever the umask (reconciler/util/statedir.py)
        return d

    @contextmanager
    def tmp_file(self, name: str, size: int = 0) -> Iterator[int]:
        """A fresh temporary file, made exclusively (the caller holds `name`'s lock)."""
        path = self.tmp_dir() / (TEMP_PREFIX + name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an interrupted run
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if size:
                os.ftruncate(fd, size)
            yield fd
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def sweep_temp(self) -> list[str]:
        """Remove temporary files an interrupted run left, unless their lock is held."""
        removed: list[str] = []
        root = self.tmp_dir()
        with os.scandir(root) as it:
            temps = [e.name for e in it if e.name.startswith(TEMP_PREFIX)]
        for name in temps:
            entry = name[len(TEMP_PREFIX) :].removesuffix(".raw")
            with self.locks().attempt(entry) as taken:
                if not taken:
                    continue  # another reconciler is writing it right now
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(root / name)
                    removed.append(name)
        # LVs an interrupted take_file left: only ours (the back-pointer to this store).
        mine = self.backpointer()
        for lv, tags in sorted(self.lvm.lv_tags().items()):
            if not lv.startswith(LV_TEMP_PREFIX) or mine not in tags:
                continue
            with self.locks().attempt(lv[len(LV_TEMP_PREFIX) :]) as taken:
                if taken:
                    self.delete(lv)
                    removed.append(lv)
        return removed
