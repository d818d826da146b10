"""A cache of validated manifests, so a converged host re-plans without re-parsing.

Parsing and validating YAML is most of what a plan of a large host costs (bench/plan.py),
and the compute service rewrites few manifests between runs. An entry is reused only if
the file's device, inode, size, mtime and ctime are all unchanged, and only files whose
times were at least two seconds in the past when the entry was written are ever cached
(a file changed twice within one timestamp tick, in the same second it was cached, could
otherwise look unchanged; git's index has the same rule). The cache is keyed to the exact
source of the schema code, so any change to validation empties it. Reference checks
against the config (pools, images) are never cached. The file lives in the state
directory and is replaced atomically; losing it only costs one slow run. It holds each
distinct disk once (a host's manifests repeat a few), which the manifests name by number:
a number that is no disk of the table is damage, and that manifest is parsed again.

The manifest directory is someone else's, so the identity is that of what was read: an
entry is stored under the fstat of the opened file its bytes came from
(reconciler/schema/readfile.py), and found only by a name whose own lstat (never
following a link) is a regular file with that key; a link, or a file swapped in under the
name, is read and judged again. The cache itself is trusted (its entries are not validated
again), so it is read only if it is a regular file this user owns and nobody else can
write, in the 0700 state directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from reconciler import __version__
from reconciler.schema.bounded import load_json
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import (
    AttachSpec,
    DeletionPolicy,
    DiskSpec,
    EncryptionFormat,
    EncryptionSpec,
    ImageSource,
    Manifest,
    TemplateKind,
    TemplateSource,
)
from reconciler.schema.speed.owncache import read_own
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir

log = get_logger(__name__)

SAFE_AGE_NS = 2_000_000_000
MAX_CACHE_BYTES = 1 << 30  # some 2 million manifests: far past any host
Key = tuple[int, int, int, int, int]


@functools.cache  # once a process: the code that runs, not what is on disk later
def _fingerprint() -> str:
    h = hashlib.sha256(__version__.encode())
    package = Path(__file__).resolve().parent.parent.parent  # reconciler/
    for name in (
        "schema/common.py",
        "schema/manifest.py",
        "schema/yamlload.py",
        "schema/speed/plainyaml.py",
        "schema/load.py",
        "schema/manifestdir.py",
        "schema/speed/mcache.py",
        "model/units.py",
    ):
        h.update((package / name).read_bytes())
    return h.hexdigest()


def stat_key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


M = TypeVar("M", bound=BaseModel)

_BACKENDS = {b.value: b for b in Backend}
_FORMATS = {f.value: f for f in DiskFormat}
_TEMPLATES = {t.value: t for t in TemplateKind}
_POLICIES = {p.value: p for p in DeletionPolicy}


_set = object.__setattr__  # as pydantic sets them: the models are frozen


def _model(cls: type[M], values: dict[str, Any]) -> M:
    """A model holding `values`, its attributes set as model_construct sets them but
    without its per-field alias and default lookups, which made rebuilding a manifest cost
    more than validating it."""
    m = cls.__new__(cls)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", set(values))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def dump(manifest: Manifest) -> dict[str, Any]:
    """What the cache keeps of a manifest (and a worker process sends): its JSON dump
    without nulls, written out as DiskSpec.spec_dict is (model_dump cost more than the
    validation it saves a repeat run)."""
    return {
        "apiVersion": manifest.api_version,
        "kind": manifest.kind,
        "instance": manifest.instance,
        "deleted": manifest.deleted,
        "disks": [_disk_dump(d) for d in manifest.disks],
    }


def _disk_dump(d: DiskSpec) -> dict[str, Any]:
    spec = d.spec_dict()
    if d.snapshots is not None:
        spec["snapshots"] = list(d.snapshots)
    if d.attach is not None:
        spec["attach"] = d.attach.to_json()
    return spec


# Rebuilt disks by content. A disk spec names no instance, and a host's manifests repeat
# the same few (same names, pools, sizes, sources); the models are frozen, so one object
# serves every manifest that has that disk. Bounded, as inputs are.
_disks: dict[tuple[Any, ...], DiskSpec] = {}


def _disk(d: dict[str, Any]) -> DiskSpec:
    if "snapshots" in d or "snapshot" in d["source"]:  # rare: validated again, as attach is
        plain = {k: v for k, v in d.items() if k != "attach"}
        valid = DiskSpec.model_validate(plain)
        if d.get("attach") is None:
            return valid
        return valid.model_copy(update={"attach": AttachSpec.model_validate(d["attach"])})
    if "attach" in d:  # rare, and small: validated again rather than rebuilt by hand
        plain = {k: v for k, v in d.items() if k != "attach"}
        if d["attach"] is None:
            return _disk(plain)
        return _disk(plain).model_copy(update={"attach": AttachSpec.model_validate(d["attach"])})
    src = d["source"]
    key = (
        d["name"],
        d["backend"],
        d["pool"],
        d["format"],
        d["size"],
        d["deletionPolicy"],
        (d.get("encryption") or {}).get("format"),
        src.get("image"),
        src.get("template"),
        src.get("label"),
    )
    spec = _disks.get(key)
    if spec is not None:
        return spec
    source: ImageSource | TemplateSource
    if "image" in src:
        source = _model(ImageSource, {"image": src["image"]})
    else:
        source = _model(
            TemplateSource,
            {"template": _TEMPLATES[src["template"]], "label": src.get("label")},
        )
    spec = _model(
        DiskSpec,
        {
            "name": d["name"],
            "backend": _BACKENDS[d["backend"]],
            "pool": d["pool"],
            "format": _FORMATS[d["format"]],
            "size": int(d["size"]),
            "source": source,
            "deletion_policy": _POLICIES[d["deletionPolicy"]],
            "encryption": _encryption(d.get("encryption")),
            "snapshots": None,
            "attach": None,
        },
    )
    if len(_disks) < 10_000:
        _disks[key] = spec
    return spec


def _encryption(e: dict[str, Any] | None) -> EncryptionSpec | None:
    if e is None:
        return None
    return _model(EncryptionSpec, {"format": EncryptionFormat(e["format"])})


def construct(data: dict[str, Any], table: DiskTable | None = None) -> Manifest:
    """Rebuild a Manifest from its own validated dump, without validating it again; its
    disks are dumps, or, with `table`, numbers in the table of the file it was read from.

    Raises KeyError, ValueError or TypeError on data that is not such a dump."""
    disks = data["disks"]
    return _model(
        Manifest,
        {
            "api_version": data["apiVersion"],
            "kind": data["kind"],
            "instance": data["instance"],
            "deleted": bool(data.get("deleted", False)),
            "disks": [_disk(d) for d in disks] if table is None else table.specs(disks),
        },
    )


class DiskTable:
    """The distinct disk dumps a cache file holds: its manifests name their disks by number
    in this table (a host's manifests repeat a few disks: the file is a third the size,
    and each disk is rebuilt once, not once per manifest)."""

    def __init__(self, dumps: list[Any]) -> None:
        if type(dumps) is not list:
            raise TypeError("the disks of a manifest cache are a list")
        self.dumps = dumps
        self._built: dict[int, DiskSpec] = {}

    def specs(self, numbers: list[Any]) -> list[DiskSpec]:
        out = []
        for i in numbers:
            spec = self._built.get(i) if type(i) is int else None
            if spec is None:
                if type(i) is not int or not 0 <= i < len(self.dumps):
                    raise IndexError(f"no disk {i!r} in the table")
                spec = self._built[i] = _disk(self.dumps[i])
            out.append(spec)
        return out

    def dumps_of(self, numbers: list[int]) -> list[Any]:
        return [self.dumps[i] for i in numbers]


def pack(entries: dict[str, list[Any]]) -> tuple[list[Any], dict[str, list[Any]]]:
    """Entries whose manifests hold their disks' dumps, as a table of the distinct dumps
    and entries naming theirs by number (what a cache file holds)."""
    table: list[Any] = []
    numbers: dict[bytes, int] = {}
    by_id: dict[int, int] = {}  # the same dump object (a table entry read) is numbered once
    out: dict[str, list[Any]] = {}
    for path, (key, data, lines) in entries.items():
        refs = []
        for d in data["disks"]:
            n = by_id.get(id(d))
            if n is None:
                # The same dump, key for key in the same order, is the same bytes (a
                # dump made in another order is only kept twice).
                text = marshal.dumps(d, 2)  # version 2: no references, only values
                n = numbers.get(text)
                if n is None:
                    n = numbers[text] = len(table)
                    table.append(d)
                by_id[id(d)] = n
            refs.append(n)
        out[path] = [key, {**data, "disks": refs}, lines]
    return table, out


class ManifestCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fingerprint = _fingerprint()
        self.entries: dict[str, list[Any]] = {}  # as read: disks by number in `table`
        self.table = DiskTable([])
        self.fresh: dict[str, list[Any]] = {}  # the entries used (as read) or added (dumps)
        self._added: set[str] = set()
        self.dirty = False
        # Its entries are trusted as validated manifests: only a file this process's user
        # owns and nobody else can write is read (the state directory is 0700 as well).
        read = read_own(path, limit=MAX_CACHE_BYTES, event="manifest_cache")
        if read is None:
            return  # missing or unusable: it is only a cache
        try:
            # Bounded in size and UTF-8 (bounded.load_json; UnsafeInput is a ValueError).
            # The file is this user's own and private (above), so its nesting is not
            # scanned first (that scan cost 0.15 s a run at 10,000 manifests): a parse
            # that recurses too deep is refused as damaged, never a RecursionError.
            doc = load_json(read.data, what=str(path), max_depth=None, max_bytes=MAX_CACHE_BYTES)
            if doc.get("fingerprint") == self.fingerprint:
                self.table = DiskTable(doc.get("disks", []))
                self.entries = doc["entries"]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.entries = {}  # damaged (even nested absurdly): it is only a cache

    def get(self, path: str, key: Key) -> tuple[Manifest, tuple[int | None, ...]] | None:
        try:
            e = self.entries.get(path)
            if e is None or tuple(e[0]) != key:
                return None
            manifest, lines = construct(e[1], self.table), tuple(e[2])
        except (KeyError, ValueError, TypeError, AttributeError, IndexError):
            return None  # damaged: parse the file
        self.fresh[path] = e
        self._added.discard(path)
        return manifest, lines

    def put(self, path: str, key: Key, data: dict[str, Any], lines: Sequence[int | None]) -> None:
        """Keep a manifest's dump (see dump()) for the next run, if its file is old enough."""
        if self.trusts(key):
            self.fresh[path] = [list(key), data, list(lines)]
            self._added.add(path)
            self.dirty = True

    @staticmethod
    def trusts(key: Key) -> bool:
        """Whether the file's times are old enough to show its next change; a newer file
        is parsed again next run."""
        return max(key[3], key[4]) <= time.time_ns() - SAFE_AGE_NS

    def unsaved(self) -> dict[str, Any] | None:
        """What save() would write: the entries used or added by this run (stale ones drop
        out); None when that is what the file holds already."""
        if not self.dirty and set(self.fresh) == set(self.entries):
            return None
        entries = {
            path: e
            if path in self._added
            else [e[0], {**e[1], "disks": self.table.dumps_of(e[1]["disks"])}, e[2]]
            for path, e in self.fresh.items()
        }
        return {"fingerprint": self.fingerprint, "entries": entries}

    def save(self, doc: dict[str, Any] | None = None) -> None:
        """Write `doc` (default: unsaved()); a failure is logged, as losing the cache only
        costs the next run its speed."""
        doc = self.unsaved() if doc is None else doc
        if doc is None:
            return
        try:
            write_document(self.path, doc)
        except OSError as e:
            log.warning("manifest_cache.write_failed", path=str(self.path), error=str(e))


def write_document(path: Path, doc: dict[str, Any]) -> None:
    """Replace the cache file with `doc` atomically; raises OSError."""
    from reconciler.schema.write import write_atomic

    private_dir(path.parent)  # the state directory: 0700 (the file is mkstemp's, 0600)
    table, entries = pack(doc["entries"])
    packed = {"fingerprint": doc["fingerprint"], "disks": table, "entries": entries}
    write_atomic(str(path), json.dumps(packed, separators=(",", ":")))
