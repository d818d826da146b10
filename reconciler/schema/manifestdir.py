"""Loading the manifest directory: expanding the paths given into manifest files, looking
each up in the manifest cache (schema/speed/mcache.py), and parsing the rest, in a forked
worker when there are many (schema/speed/worker.py). Each file is parsed by load.py's
load_manifest, so a directory loads exactly as its files would one by one: the same
manifests, the same errors, in the same (sorted) order.

A cache hit is only the same regular file, unchanged (device, inode, size, mtime, ctime of
the name's own lstat: a link, a FIFO or a directory is never a hit and is read, and
refused, as any other file); its references to the config's pools and images are checked
again every time. A worker that fails or ends early loses nothing: what it did not send is
parsed here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import Any

from reconciler.model.errors import InputError, Location
from reconciler.schema import load
from reconciler.schema.config import Config
from reconciler.schema.load import MANIFEST_SUFFIXES, FailedManifest, LoadedManifest
from reconciler.schema.speed.mcache import ManifestCache, construct, dump, stat_key, write_document
from reconciler.schema.speed.worker import Worker
from reconciler.schema.yamlload import Document
from reconciler.util.logs import get_logger

log = get_logger(__name__)


def manifest_files(paths: Iterable[str]) -> tuple[list[str], list[InputError]]:
    """Expand files and directories (not recursively; hidden files skipped), sorted."""
    files: list[str] = []
    errors: list[InputError] = []
    for p in paths:
        if os.path.isdir(p):
            with os.scandir(p) as it:
                names = sorted(
                    e.name
                    for e in it
                    if e.name.endswith(MANIFEST_SUFFIXES) and not e.name.startswith(".")
                )
            files.extend(os.path.join(p, n) for n in names)
        elif os.path.exists(p):
            files.append(p)
        else:
            errors.append(InputError("no such file or directory", Location(p)))
    return files, errors


# Files to parse. Forking and starting a worker costs 20-30 ms (its first touches of the
# parent's memory, its exit), what 300 or so manifests cost to load: below this, it loses.
FORK_THRESHOLD = 400


def load_manifests(
    paths: Iterable[str], config: Config | None, cache: ManifestCache | None = None
) -> tuple[list[LoadedManifest], list[FailedManifest]]:
    """Load every manifest under `paths`; with a cache, unchanged files are not re-parsed
    (their references to the config's pools and images are always checked again)."""
    with ManifestLoad(paths, config, cache) as loading:
        return loading.finish()


_Parsed = tuple[LoadedManifest | FailedManifest, dict[str, Any] | None]


class ManifestLoad:
    """Loading the manifests under some paths, in two steps so the caller can work between
    them: creating it looks every file up in the cache and, when at least
    `fork_threshold` files are left to parse, forks a worker that starts parsing them
    (reconciler/schema/speed/worker.py); `finish` parses here what the worker has not taken,
    and returns what load_manifest on every file in turn would have.

    The worker sends, for a file that loaded, the manifest's dump and its disks' lines
    (rebuilt here as a cache hit is), and for any other file nothing: those are loaded
    again here, so every error is made exactly as in a sequential load. Then, idle, it is
    handed the manifest cache to write while the caller goes on. Use it as a context
    manager: leaving it waits for that write, and stops the worker however loading ends.
    """

    def __init__(
        self,
        paths: Iterable[str],
        config: Config | None,
        cache: ManifestCache | None = None,
        *,
        fork_threshold: int = FORK_THRESHOLD,
    ) -> None:
        self.config = config
        self.cache = cache
        self.files, errors = manifest_files(paths)
        self._errors = [FailedManifest(e.location.file, (e,), None) for e in errors]
        self._done: list[LoadedManifest | None] = [None] * len(self.files)
        self._todo: list[int] = []  # indices of the files to parse
        no_doc = Document("", None)
        for i, f in enumerate(self.files):
            if cache is not None:
                # The name's own lstat: a link (or a FIFO, a directory) is never a hit and
                # is read, and refused, as any other; an entry was stored under the fstat
                # of the bytes it was parsed from, so only that same regular file, unchanged
                # (device, inode, size, mtime, ctime), finds it.
                try:
                    st = os.lstat(f)
                    key = stat_key(st) if stat.S_ISREG(st.st_mode) else None
                except OSError:
                    key = None
                hit = cache.get(os.path.abspath(f), key) if key is not None else None
                if hit is not None and (
                    config is None or not load.check_references(hit[0], no_doc, config)
                ):
                    self._done[i] = LoadedManifest(f, hit[0], hit[1])
                    continue
            self._todo.append(i)
        then = self._write_cache if cache is not None else None
        self.worker = (
            Worker.start(len(self._todo), self._remote, then)
            if len(self._todo) >= fork_threshold
            else None
        )

    def __enter__(self) -> ManifestLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker, or wait for the manifest cache it is writing (STALL_S at most)."""
        w = self.worker
        if w is not None:
            w.close()
            if w.handed and w.failure and self.cache is not None:
                log.warning(
                    "manifest_cache.write_failed", path=str(self.cache.path), error=w.failure
                )

    def finish(self) -> tuple[list[LoadedManifest], list[FailedManifest]]:
        todo = self._todo
        parsed: list[_Parsed | None] = [None] * len(todo)
        w = self.worker
        if w is not None:
            while (chunk := w.claim()) is not None:
                for j in chunk:
                    if parsed[j] is None:
                        parsed[j] = self._here(j)
                for j, sent in w.poll():
                    parsed[j] = self._rebuild(j, sent)
            for j, sent in w.wait():
                parsed[j] = self._rebuild(j, sent)
            rest = w.missing()
            if rest or w.failure:  # the result stays whole: what it did not send is done here
                log.warning(
                    "manifests.worker_failed",
                    why=w.failure or "it ended early",
                    loading_here=len(rest),
                )
            for j in rest:
                parsed[j] = self._here(j)
        else:
            for j in range(len(todo)):
                parsed[j] = self._here(j)

        loaded: list[LoadedManifest] = []
        failed = list(self._errors)
        results = iter(parsed)
        for i, f in enumerate(self.files):
            hit = self._done[i]
            if hit is not None:
                loaded.append(hit)
                continue
            p = next(results)
            assert p is not None
            r, data = p
            if isinstance(r, LoadedManifest):
                loaded.append(r)
                if self.cache is not None and r.key is not None and data is not None:
                    self.cache.put(os.path.abspath(f), r.key, data, r.disk_lines)
            else:
                failed.append(r)
        if self.cache is not None:
            doc = self.cache.unsaved()
            # The worker, idle now, writes the cache while this process goes on to plan.
            if doc is not None and (w is None or not w.hand_off(doc)):
                self.cache.save(doc)
        if w is not None and not w.handed:
            w.close()
        return loaded, failed

    def _write_cache(self, doc: dict[str, Any]) -> None:
        """In the worker: write the cache this process handed off (see finish)."""
        assert self.cache is not None
        write_document(self.cache.path, doc)

    def _here(self, j: int) -> _Parsed:
        """Load the j-th file to parse in this process (and dump it, if it is cached)."""
        r = load.load_manifest(self.files[self._todo[j]], self.config)
        if not isinstance(r, LoadedManifest) or self.cache is None or r.key is None:
            return r, None
        if ManifestCache.trusts(r.key):
            return r, dump(r.manifest)
        return r, None

    def _remote(self, j: int) -> Any:
        """In the worker: the j-th file to parse, as plain data (None: it did not load)."""
        r = load.load_manifest(self.files[self._todo[j]], self.config)
        if isinstance(r, LoadedManifest):
            return dump(r.manifest), r.disk_lines, r.key
        return None

    def _rebuild(self, j: int, sent: Any) -> _Parsed:
        """A file the worker loaded, as if loaded here; one it did not is loaded here."""
        if sent is None:
            return self._here(j)
        data, lines, key = sent
        try:
            manifest = construct(data)
        except (KeyError, ValueError, TypeError):  # pragma: no cover - the worker's own dump
            return self._here(j)
        file = self.files[self._todo[j]]
        return LoadedManifest(file, manifest, tuple(lines), key and tuple(key)), data
