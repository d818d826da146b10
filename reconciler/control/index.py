"""The manifest directory as the loop knows it: what each file held when last read, and
when each file and instance was last written.

`ManifestIndex` owns which files name which instances and what each held when last read
(one read per change: its stat key, hash and parse all come from the same bytes).
`Settling` owns the writes the loop has seen: the files whose read waits for their writes
to go quiet (`DEBOUNCE`) or for their writer to close them, and when each file and
instance last changed, which says when a plan that destroys disks may be applied.
`DirectoryEvents` hands watchdog's events for the directory's manifest files to it.

Invariants: no file is read while a process holds it open for writing (half a manifest
rewritten in place is a valid manifest naming fewer disks); hidden files and files of
other suffixes are never read; a destructive plan of an instance a manifest names waits
until each of its files has been closed and unchanged for the settle time (by the loop's
events and by the file's ctime, for a change whose events were missed or came before the
loop started), and one of an instance whose manifest was just removed for the settle time
after that; times older than the settle time are dropped, so churn does not grow them.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from reconciler.control.writers import held_for_writing
from reconciler.model import DesiredInstance, Plan
from reconciler.model.errors import InputError
from reconciler.schema.config import Config
from reconciler.schema.load import (
    MANIFEST_SUFFIXES,
    FailedManifest,
    LoadedManifest,
    parse_manifest,
)
from reconciler.schema.readfile import read_regular
from reconciler.schema.speed.mcache import stat_key
from reconciler.util.logs import get_logger

log = get_logger(__name__)

DEBOUNCE = 0.05  # seconds of quiet after a file's last event before it is read


@dataclass
class Entry:
    """What one manifest file holds, as last read."""

    key: tuple[int, int, int, int, int]
    sha256: str
    result: LoadedManifest | FailedManifest


class ManifestIndex:
    """The manifest directory as the loop last read it: file -> what it holds."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files: dict[str, Entry] = {}
        self.by_instance: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def wanted(name: str) -> bool:
        return name.endswith(MANIFEST_SUFFIXES) and not name.startswith(".")

    def names(self) -> list[str]:
        with os.scandir(self.dir) as it:
            return sorted(str(self.dir / e.name) for e in it if self.wanted(e.name))

    def instances(self) -> set[str]:
        with self.lock:
            return set(self.by_instance)

    def _instances_of(self, entry: Entry | None) -> set[str]:
        if entry is None:
            return set()
        r = entry.result
        inst = r.manifest.instance if isinstance(r, LoadedManifest) else r.instance
        return {inst} if inst else set()

    def read(self, path: str, config: Config, *, if_changed: bool = False) -> set[str]:
        """Read one file again (or forget it if it is gone); the instances it named before
        and names now."""
        # One read of the file (reconciler/schema/readfile.py: a regular file only, never
        # through a link, never blocking, bounded): its hash, its key and its manifest
        # all come from the same bytes. The name's lstat only saves reading an unchanged
        # file again; whatever else stands there is read, and refused, once per change.
        try:
            key = stat_key(os.lstat(path))
        except FileNotFoundError:
            return self.forget(path)
        with self.lock:
            old = self.files.get(path)
        if if_changed and old is not None and old.key == key:
            return set()
        result: LoadedManifest | FailedManifest
        try:
            read = read_regular(path)
        except InputError as e:
            if not os.path.lexists(path):
                return self.forget(path)
            result, sha = FailedManifest(path, (e,), None), ""
        else:
            key = stat_key(read.stat)  # what was read, should the name have changed since
            sha = hashlib.sha256(read.data).hexdigest()
            result = parse_manifest(path, read.data, config)
        entry = Entry(key, sha, result)
        with self.lock:
            old = self.files.get(path)
            if old is not None and old.sha256 == sha and type(old.result) is type(result):
                self.files[path] = entry
                return set()  # rewritten with the same content: nothing changed
            before = self._instances_of(old)
            self._unlink(path, old)
            self.files[path] = entry
            after = self._instances_of(entry)
            for inst in after:
                self.by_instance.setdefault(inst, set()).add(path)
        return before | after

    def forget(self, path: str) -> set[str]:
        with self.lock:
            old = self.files.pop(path, None)
            self._unlink(path, old)
            return self._instances_of(old)

    def _unlink(self, path: str, old: Entry | None) -> None:
        for inst in self._instances_of(old):
            paths = self.by_instance.get(inst)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self.by_instance[inst]

    def refresh(
        self,
        config: Config,
        *,
        skip: Callable[[str], bool] | None = None,
        force: bool = False,
    ) -> set[str]:
        """Read every file whose stat changed (every file if `force`) but those `skip`
        keeps as last read, forget the removed ones: what changed."""
        changed: set[str] = set()
        present = set(self.names())
        with self.lock:
            known = set(self.files)
        for path in known - present:
            changed |= self.forget(path)
        for path in sorted(present):
            if skip is not None and skip(path):
                continue
            changed |= self.read(path, config, if_changed=not force)
        return changed

    def key(self, path: str) -> tuple[int, int, int, int, int] | None:
        """The stat key of the file as last read (None: never read)."""
        with self.lock:
            e = self.files.get(path)
            return e.key if e is not None else None

    def paths_of(self, instance: str) -> list[str]:
        with self.lock:
            return sorted(self.by_instance.get(instance, ()))

    def unknown_failures(self) -> list[FailedManifest]:
        """Files that failed to load without saying which instance they are for."""
        with self.lock:
            return [
                e.result
                for e in self.files.values()
                if isinstance(e.result, FailedManifest) and e.result.instance is None
            ]

    def desired_for(self, instance: str) -> tuple[list[LoadedManifest], list[FailedManifest], str]:
        """The instance's loaded and failed manifests, and a hash of their contents."""
        with self.lock:
            entries = [self.files[p] for p in sorted(self.by_instance.get(instance, ()))]
        loaded = [e.result for e in entries if isinstance(e.result, LoadedManifest)]
        failed = [e.result for e in entries if isinstance(e.result, FailedManifest)]
        sha = hashlib.sha256("".join(e.sha256 for e in entries).encode()).hexdigest()
        return loaded, failed, sha if entries else ""

    def everything(self) -> tuple[list[LoadedManifest], list[FailedManifest]]:
        with self.lock:
            entries = list(self.files.values())
        loaded = [e.result for e in entries if isinstance(e.result, LoadedManifest)]
        failed = [e.result for e in entries if isinstance(e.result, FailedManifest)]
        return loaded, failed


class DirectoryEvents(FileSystemEventHandler):
    """watchdog's events for the directory's manifest files, to `changed(path, ended=)`."""

    def __init__(self, directory: Path, changed: Callable[..., None]) -> None:
        self.dir = str(directory)
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        # A close after writing, a rename and a removal end a write. A modification or a
        # creation may be a writer in the middle of the file (or a chmod, or a rename from
        # another directory, which watchdog reports as a creation): the file is read only
        # once no process holds it open for writing.
        ended = event.event_type in ("closed", "moved", "deleted")
        for p in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(p) if p else ""
            if (
                path
                and os.path.dirname(path) == self.dir
                and ManifestIndex.wanted(os.path.basename(path))
            ):
                self.changed(path, ended=ended)


class Settling:
    """The writes the loop has seen: which files wait to be read, which a writer may hold
    open, and when each file and instance last changed (monotonic), all under one
    condition."""

    def __init__(self, index: ManifestIndex, settle: float) -> None:
        self.index = index
        self.settle = settle
        self._cond = threading.Condition()
        self._pending: dict[str, float] = {}  # file -> when its writes went quiet
        self._open: set[str] = set()  # written and not closed since (a writer may hold them)
        self._touched: dict[str, float] = {}  # file -> its last event
        self._changed_at: dict[str, float] = {}  # instance -> its manifests last changed

    def changed(self, path: str, *, ended: bool = True) -> None:
        """A manifest file had an event: read it once its writes are quiet and, unless
        `ended` (closed, renamed, removed), once no writer holds it open."""
        with self._cond:
            now = time.monotonic()
            self._touched[path] = now
            if ended:
                self._open.discard(path)
            else:
                self._open.add(path)
            self._pending[path] = now + DEBOUNCE
            self._cond.notify()

    def due(self) -> list[str]:
        """The files whose writes went quiet, no longer pending; none (after a wait until
        the next is due, or `wake`) if no file is due yet."""
        with self._cond:
            now = time.monotonic()
            due = [p for p, t in self._pending.items() if t <= now]
            for p in due:
                del self._pending[p]
            if not due:
                wait = min(self._pending.values(), default=now + 1.0) - now
                self._cond.wait(max(wait, 0.001))
            return due

    def wake(self) -> None:
        """End any wait in `due` (the loop is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def instance_changed(self, instance: str) -> None:
        with self._cond:
            self._changed_at[instance] = time.monotonic()

    def held_open(self, path: str) -> bool:
        """Whether a writer holds `path` open (then its close is awaited). Asked of every
        file about to be read, not only of those with writes and no close: events come
        late (watchdog holds inotify's for half a second to pair renames), and the close
        of one write may be read after the next writer opened the file again. The
        kernel's answer (a lease) is cheap; /proc is scanned, where the kernel cannot
        say, only for a file that had writes without a close."""
        with self._cond:
            was_open = path in self._open
        if path in held_for_writing([path], scan=was_open):
            with self._cond:
                self._open.add(path)
            log.info("manifest.held_open", file=path, waits="for the writer to close it")
            return True
        with self._cond:
            self._open.discard(path)
        return False

    def busy(self) -> Callable[[str], bool]:
        """For one pass over the directory (a resync, a reload): whether a file that
        changed since it was read is held open by a writer, to be kept as last read; a
        file never read is read (its instance's deletions still wait for the settle
        time)."""

        def busy(path: str) -> bool:
            key = self.index.key(path)
            if key is None:
                return False
            try:
                if stat_key(os.stat(path)) == key:
                    return False
            except OSError:
                return False
            return self.held_open(path)

        return busy

    def forget_settled(self) -> None:
        """Event times older than the settle time say nothing more: dropped, so that a
        directory with much churn does not grow these maps."""
        with self._cond:
            old = time.monotonic() - self.settle
            for times in (self._touched, self._changed_at):
                for k in [k for k, t in times.items() if t < old]:
                    del times[k]

    def unsettled(
        self, instance: str, wanted: tuple[DesiredInstance, ...], p: Plan
    ) -> tuple[float, list[str]]:
        """Seconds until a plan that destroys disks of an instance a manifest still names
        may be applied: each of its files closed (no writer holds it) and unchanged for
        `settle` seconds, by the loop's events and by the file's ctime (a change whose
        events were missed, or made before the loop started); 0: go ahead. And the files
        a writer holds open, if that is why."""
        if not any(a.destructive for a in p.actions):
            return 0.0, []
        now = time.monotonic()
        if not wanted:
            # No manifest names it (--prune): one removed a moment ago may be on its way
            # back (an editor that unlinks and writes anew, `rm f; cat > f`).
            with self._cond:
                t = self._changed_at.get(instance)
            return (max(0.0, t + self.settle - now) if t is not None else 0.0), []
        if all(d.deleted for d in wanted):
            return 0.0, []  # a tombstone: never half a file
        paths = self.index.paths_of(instance)
        with self._cond:
            if any(path in self._open or path in self._pending for path in paths):
                return self.settle, []  # written and not closed, or its event not read yet
            times = [self._touched.get(path) for path in paths]
            times.append(self._changed_at.get(instance))
        ctime = self._ctime_wait(paths)
        if ctime is None:
            return self.settle, []  # changed or removed since it was read: its event follows
        wait = max([ctime, *(t + self.settle - now for t in times if t is not None)])
        if wait > 0:
            return wait, []
        held = sorted(held_for_writing(paths))
        return (self.settle if held else 0.0), held

    def _ctime_wait(self, paths: list[str]) -> float | None:
        """Seconds until each file's ctime (which no one can set; mtime can be) is
        `settle` seconds old; None if one changed since it was read, or is gone."""
        wall, wait = time.time(), 0.0
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                return None  # removed since it was read
            if stat_key(st) != self.index.key(path):
                return None  # changed since it was read
            age = wall - st.st_ctime
            if age >= -1.0:  # a ctime in the future is a clock that went back: ignored
                wait = max(wait, min(self.settle - age, self.settle))
        return wait
