"""Every record is input: the one check a record passes wherever it is read.

DESIGN invariant 8. A record is read from the host's database, a pool's RADOS store, a
copy on a volume (a file's extended attribute, an LV's tags, an RBD image's metadata) and
an exported state; each of those can have been written by someone other than this
reconciler (a process with the pool's Ceph caps, whoever edited a state file, root by
hand). So each reader calls `check_record` on what it parsed, and the session, rebuild
and an exported state's load call `validate` on the whole set; a record that fails is a
BadRecord, which the planner turns into that volume's plan error ("record-unreadable"):
it is never acted on, never guessed around.

What a record must be:
- read as POOL/VOLUME, it describes POOL/VOLUME;
- a disk's instance and disk are names (as a manifest's), and its volume is
  `naming.volume_name(instance, disk)`; a cache entry's volume is an entry name
  (`_cache_` + a name) and it names no instance, disk or backing;
- its backing, if any, is the *name* of a cache entry (so never a path: no '/', no
  '..'), and, checked over the set, a cache entry of the same pool with its own record
  (a disk being created may name an entry whose record is not yet written: it holds no
  data, and its create starts again from its spec);
- the spec it was made to is a disk's spec (a cache entry's: an image's, a template's or a
  Nova base's) naming its own disk, pool, backend and format, with a size in bytes and a
  source, and so is a migration's (the planner, the executor and a migration read them);
- its format is one its backend holds, and its backend one its pool's kind holds (a file
  pool: flat, qcow2, ploop; an lvm pool: lvm; an rbd pool: rbd), and so is a migration's;
  a migration's copy goes to the disk's own name or its staging name;
- a preallocation (recorded only where it is not off) is a disk's of a file backend and
  one its format can be made with (common.preallocation_refusal), and so is a migration's;
  a cache entry has none;
- an encryption (recorded only where the spec asks for one) is a disk's, of a backend
  that encrypts (ENCRYPTING_BACKENDS) and a format that can be (not ploop), the one its
  spec names; a spec names no other encryption than `{format: luks}`; a record whose
  spec asks for encryption without recording one (or the reverse) is refused;
- a snapshot's record (kind `snapshot`) is its disk's fields as taken plus `snapshot`:
  its volume is `naming.snapshot_name(volume_name(instance, disk), NAME)` for a snapshot
  name NAME (a manifest's), it is never encrypted, migrating or preallocated, its spec is
  a disk's spec as above, and its handle (once made) is a name, never a path; only a
  snapshot record has `snapshot`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from reconciler.model.errors import RecordError
from reconciler.model.naming import CACHE_PREFIX, migration_name, snapshot_name, volume_name
from reconciler.model.record import BadRecord, DiskRecord, RecordKind, RecordState
from reconciler.schema.common import (
    BACKEND_FORMATS,
    Backend,
    DiskFormat,
    Preallocation,
    check_name,
    preallocation_refusal,
)

# What a cache entry's name may be: image-, template- and nova- entries are all this.
_ENTRY_RE = re.compile(r"^" + re.escape(CACHE_PREFIX) + r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_FILE_BACKENDS = frozenset({Backend.FLAT, Backend.QCOW2, Backend.PLOOP})
# The backends whose drivers make encrypted disks (the planner refuses the others).
ENCRYPTING_BACKENDS = frozenset({Backend.FLAT, Backend.QCOW2, Backend.LVM, Backend.RBD})


# What a snapshot's name may be (a manifest's `snapshots` entry): a name safe as the end of
# a file, LV and RBD snapshot name; '+' and '@' never, so VOLUME+snap-NAME and
# INSTANCE/DISK@NAME are read back one way.
SNAPSHOT_NAME_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
# A disk's source `{snapshot: INSTANCE/DISK@NAME}`: a snapshot of another (or the same)
# instance's disk, named as the manifest names it.
SNAPSHOT_REF_RE = re.compile(
    r"(?P<instance>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/"
    r"(?P<disk>(?![.-])(?!.*\.\.)[A-Za-z0-9._-]{1,100})@"
    r"(?P<name>(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,62})\Z"
)
# A handle: a backend's own name for a snapshot (never a path).
_HANDLE_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._+@-]{0,299}\Z")


def is_snapshot_name(name: str) -> bool:
    """Whether `name` can be a snapshot's name (SNAPSHOT_NAME_RE)."""
    return type(name) is str and bool(SNAPSHOT_NAME_RE.match(name))


def _snapshot_problem(rec: DiskRecord) -> str | None:
    """Why a record of kind snapshot is not one this reconciler writes (None: it is)."""
    snap = rec.snapshot
    if snap is None:
        return "a snapshot's record has no snapshot"
    if not is_snapshot_name(snap.name):
        return f"its snapshot name {snap.name!r} is not a snapshot's name"
    want = snapshot_name(volume_name(rec.instance, rec.disk), snap.name)
    if rec.volume != want:
        return f"snapshot {snap.name} of {rec.instance}/{rec.disk} is {want}, not {rec.volume!r}"
    if rec.encryption is not None or rec.migration is not None or rec.preallocation is not None:
        return "a snapshot is never encrypted, migrating or preallocated"
    if rec.pending_size is not None or rec.last_used is not None:
        return "a snapshot has no pending size or last use"
    if rec.state not in (RecordState.CREATING, RecordState.READY, RecordState.DELETING):
        return f"a snapshot is never {rec.state.value}"
    if snap.handle is not None and not _HANDLE_RE.match(snap.handle):
        return f"its snapshot handle {snap.handle!r} is not a name"
    if rec.spec.get("encryption") is not None:
        return "its spec asks for encryption (an encrypted disk is never snapshotted)"
    return None


def is_entry_name(name: str) -> bool:
    """Whether `name` is a cache entry's volume name (never a path)."""
    return bool(_ENTRY_RE.match(name)) and ".." not in name


# check_name's rule as one expression: the fast path for the names of many records.
_NAME_RE = re.compile(r"(?![.-])(?!.*\.\.)[A-Za-z0-9._-]{1,100}\Z")


def _name(what: str, value: str) -> None:
    if _NAME_RE.match(value):
        return
    try:
        check_name(value)
    except ValueError as e:
        raise RecordError(f"its {what} is not a name ({e})") from None


def _family(backends: Iterable[str]) -> frozenset[Backend]:
    """The backends a pool of these configured backends can hold records of: the config
    may drop a backend a pool once served (its disks then migrate), never its kind."""
    kinds = {str(b) for b in backends}
    if Backend.RBD in kinds:
        return frozenset({Backend.RBD})
    if Backend.LVM in kinds:
        return frozenset({Backend.LVM})
    return _FILE_BACKENDS


def _preallocation_problem(
    backend: Backend, fmt: DiskFormat, mode: Preallocation | None, whose: str
) -> str | None:
    """Why a disk of `backend` and `fmt` cannot have been made with `mode` (None: it can)."""
    if mode is None:
        return None
    if mode is Preallocation.OFF:
        return f"{whose} preallocation says off, which is never recorded (its absence is)"
    if backend not in _FILE_BACKENDS:
        return f"{whose} preallocation {mode.value} is only a file backend's, not {backend.value}'s"
    why = preallocation_refusal(fmt, mode)
    return None if why is None else f"{whose} preallocation {mode.value}: {why}"


def _encryption_problem(rec: DiskRecord) -> str | None:
    """Why `rec`'s encryption is not one this reconciler records for its spec (None: it is)."""
    asked = rec.spec.get("encryption")
    enc = rec.encryption
    if enc is None:
        return None if asked is None else "its spec asks for encryption it does not record"
    if asked != {"format": enc.format}:
        return f"its encryption {enc.format} is not its spec's ({asked!r})"
    if rec.backend not in ENCRYPTING_BACKENDS or rec.format is DiskFormat.PLOOP:
        return f"a {rec.backend.value} {rec.format.value} disk is never encrypted"
    if enc.header is not None and rec.format is not DiskFormat.RAW:
        return "only a raw disk's encryption has a header before its payload"
    if rec.migration is not None:
        return "an encrypted disk is never migrated (its copy would need its key)"
    return None


def _is_size(value: Any) -> bool:
    return type(value) is int and value > 0


def _source_problem(source: Any) -> str | None:
    """Why `source` is not a disk's source as a manifest gives it (None: it is)."""
    if not isinstance(source, dict):
        return "its source is not a mapping"
    if set(source) == {"image"} and isinstance(source["image"], str):
        return None
    if (
        "template" in source
        and set(source) <= {"template", "label"}
        and all(isinstance(v, str) for v in source.values())
    ):
        return None
    if set(source) == {"snapshot"} and type(source["snapshot"]) is str:
        if SNAPSHOT_REF_RE.match(source["snapshot"]):
            return None
        return f"its source's snapshot {source['snapshot']!r} is not INSTANCE/DISK@NAME"
    return (
        "its source is neither {image: ID}, {template: KIND[, label: LABEL]} nor "
        "{snapshot: INSTANCE/DISK@NAME}"
    )


def _spec_problem(
    spec: Mapping[str, Any], disk: str, pool: str, backend: Backend, fmt: DiskFormat, what: str
) -> str | None:
    """Why `spec`, the disk spec a record (or its migration) was made to, is not one that
    agrees with it: a disk's spec as the planner, the executor and a migration read it
    (name, pool, backend, format, size, source, deletionPolicy), naming the record's own
    disk, pool, backend and format (None: it is)."""
    get = spec.get
    # The common case in one comparison (every plan checks every record it reads).
    if (get("name"), get("pool"), get("backend"), get("format")) != (
        disk,
        pool,
        backend.value,
        fmt.value,
    ):
        said = {k: get(k) for k in ("name", "pool", "backend", "format")}
        wanted = {"name": disk, "pool": pool, "backend": backend.value, "format": fmt.value}
        key = next(k for k in wanted if said[k] != wanted[k])
        return f"{what} says {key} {said[key]!r}, the record {wanted[key]!r}"
    size = get("size")
    if type(size) is not int or size <= 0:
        return f"{what} has no size in bytes"
    if get("deletionPolicy", "Delete") not in ("Delete", "Retain"):
        return f"{what} has no deletionPolicy Delete or Retain"
    if "encryption" in spec and spec["encryption"] != {"format": "luks"}:
        return f"{what} has an encryption other than {{format: luks}}"
    source = get("source")
    if type(source) is dict and len(source) == 1 and type(source.get("image")) is str:
        return None
    why = _source_problem(source)
    return f"{what}: {why}" if why else None


def _entry_spec_problem(spec: Mapping[str, Any]) -> str | None:
    """Why a cache entry's spec is not one the reconciler writes: an image's (its id and
    sha256), a Nova base's (its name and sha256) or a template's (its kind), each with a
    size in bytes (what `cache ls` and the entry's users read of it)."""
    if not _is_size(spec.get("size")):
        return "its spec (a cache entry's) has no size in bytes"
    for keys in (("image", "sha256"), ("nova_base", "sha256"), ("template",)):
        if all(isinstance(spec.get(k), str) for k in keys):
            return None
    return "its spec is no image's, Nova base's or template's (a cache entry's)"


def _problem(rec: DiskRecord) -> str | None:
    """Why `rec` cannot be a record this reconciler wrote (None: it can be)."""
    try:
        if rec.format not in BACKEND_FORMATS[rec.backend]:
            return f"backend {rec.backend.value} holds no {rec.format.value} disk"
        if rec.kind is RecordKind.CACHE:
            if not is_entry_name(rec.volume):
                return f"a cache entry's volume must be an entry name, not {rec.volume!r}"
            if rec.instance or rec.disk or rec.backing is not None or rec.migration or rec.snapshot:
                return "a cache entry names no instance, disk, backing or migration"
            if rec.preallocation is not None:
                return "a cache entry has no preallocation (only a disk has)"
            if rec.encryption is not None:
                return "a cache entry is never encrypted (only a disk is)"
            return _entry_spec_problem(rec.spec)
        _name("instance", rec.instance)
        _name("disk", rec.disk)
        if rec.kind is RecordKind.SNAPSHOT or rec.snapshot is not None:
            if rec.kind is not RecordKind.SNAPSHOT:
                return "only a snapshot's record has a snapshot"
            why = _snapshot_problem(rec)
            if why is not None:
                return why
            if rec.backing is not None and not is_entry_name(rec.backing):
                return f"its backing {rec.backing!r} is not a cache entry's name"
            return _spec_problem(rec.spec, rec.disk, rec.pool, rec.backend, rec.format, "its spec")
        want = volume_name(rec.instance, rec.disk)
        if rec.volume != want:
            return (
                f"disk {rec.instance}/{rec.disk} is volume {want}, not {rec.volume!r} "
                "(a volume's name is derived from its instance and disk)"
            )
        if rec.backing is not None and not is_entry_name(rec.backing):
            return (
                f"its backing {rec.backing!r} is not a cache entry's name (a backing is "
                "the name of a cache entry of the same pool, never a path)"
            )
        why = _preallocation_problem(rec.backend, rec.format, rec.preallocation, "its")
        if why is not None:
            return why
        why = _encryption_problem(rec)
        if why is not None:
            return why
        mig = rec.migration
        if mig is not None:
            _name("migration pool", mig.pool)
            if mig.spec.get("encryption") is not None:
                return "its migration's spec asks for encryption (a copy is never encrypted)"
            if mig.format not in BACKEND_FORMATS[mig.backend]:
                return f"its migration's backend {mig.backend.value} holds no {mig.format.value}"
            why = _preallocation_problem(
                mig.backend, mig.format, mig.preallocation, "its migration's"
            )
            if why is not None:
                return why
            if mig.final_volume != want or mig.volume not in (want, migration_name(want)):
                return (
                    f"its migration's volumes {mig.volume!r}/{mig.final_volume!r} are not {want}'s"
                )
            if mig.retained_as is not None and not re.fullmatch(
                re.escape(rec.volume) + r"\+retained-g[0-9]{1,18}", mig.retained_as
            ):
                return f"its migration would keep the old volume as {mig.retained_as!r}"
            why = _spec_problem(
                mig.spec, rec.disk, mig.pool, mig.backend, mig.format, "its migration's spec"
            )
            if why is not None:
                return why
    except RecordError as e:
        return str(e)
    return _spec_problem(rec.spec, rec.disk, rec.pool, rec.backend, rec.format, "its spec")


def problem(rec: DiskRecord, pool: str, volume: str) -> str | None:
    """Why `rec`, read as `pool`/`volume`, is not a record this reconciler could have
    written (the checks of one record alone; see the docstring); None: it could be."""
    if (rec.pool, rec.volume) != (pool, volume):
        return f"it describes {rec.pool}/{rec.volume}"
    return _problem(rec)


def check_record(rec: DiskRecord, pool: str, volume: str) -> None:
    """Raise RecordError if `problem` finds one."""
    why = problem(rec, pool, volume)
    if why is not None:
        raise RecordError(f"record {pool}/{volume} is refused: {why}")


def _config_problem(rec: DiskRecord, pools: Mapping[str, Collection[str]]) -> str | None:
    # A pool the config lacks is the planner's to report (its records are not acted on).
    for pool, backend in [(rec.pool, rec.backend)] + (
        [(rec.migration.pool, rec.migration.backend)] if rec.migration else []
    ):
        configured = pools.get(pool)
        if configured is not None and backend not in _family(configured):
            kinds = ", ".join(sorted(str(b) for b in configured))
            return f"backend {backend.value} cannot be in pool {pool} (backends: {kinds})"
    return None


def validate(
    records: Iterable[DiskRecord],
    pools: Mapping[str, Collection[str]] | None,
    entries: Iterable[tuple[str, str]] = (),
    *,
    checked: bool = False,
) -> tuple[list[DiskRecord], list[BadRecord]]:
    """The records that pass every check, and the others as BadRecords.

    `pools`: each configured pool's backends (None: no config check). `entries`: (pool, volume) of
    cache entries known to have a record beyond `records` (a plan of one instance reads
    only the entries its disks name). `checked`: each record passed `check_record` as it
    was read (the stores do), so only the checks over the config and the set are left."""
    good: list[DiskRecord] = []
    bad: list[BadRecord] = []
    for rec in records:
        why = None if checked else _problem(rec)
        if why is None and pools is not None:
            why = _config_problem(rec, pools)
        if why is None:
            good.append(rec)
        else:
            bad.append(
                BadRecord(rec.pool, rec.volume, f"record {rec.pool}/{rec.volume} is refused: {why}")
            )
    have = {r.key() for r in good if r.kind is RecordKind.CACHE} | set(entries)
    kept: list[DiskRecord] = []
    for rec in good:
        if (
            rec.backing is not None
            and rec.state is not RecordState.CREATING
            and (rec.pool, rec.backing) not in have
        ):
            bad.append(
                BadRecord(
                    rec.pool,
                    rec.volume,
                    f"record {rec.pool}/{rec.volume} is refused: its backing {rec.backing} is "
                    f"no cache entry of pool {rec.pool} with a record of its own",
                )
            )
        else:
            kept.append(rec)
    return kept, bad
