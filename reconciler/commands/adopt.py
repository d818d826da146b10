"""`reconcile adopt`: bring an existing volume under management, by explicit name only
(Crossplane's adoption; DESIGN invariant 4: a volume without a record is never touched
until an operator adopts it).

The format is the one the operator declares, never the one the bytes announce: the driver
checks the volume as that format (drivers/api.py inspect_unmanaged), refuses what must
not be managed, and only reports a header that disagrees (a raw disk whose guest wrote a
qcow2 header is exactly the raw disk it was). The disk's manifest must already name it:
the record is written to the manifest's spec, in the layout and size found, so the next
plan shows whatever differs (a resize, a migration, or nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.commands.common import EXIT_OK, parse, read_config
from reconciler.control.session import Session
from reconciler.drivers.api import Inspected, ManagingDriver
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import BACKEND_FORMATS, Backend, DiskFormat
from reconciler.schema.manifest import DiskSpec


@dataclass(frozen=True)
class Adoption:
    record: DiskRecord
    warnings: tuple[str, ...]


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile adopt",
        description="Bring an existing volume under management as the disk a manifest "
        "names. The format is the one you declare, checked, never taken from the volume's "
        "bytes; the record is written and the manifest owns the disk from then on.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory")
    p.add_argument("--instance", required=True, metavar="UUID")
    p.add_argument("--disk", required=True, metavar="NAME")
    p.add_argument("--volume", required=True, metavar="POOL/VOLUME")
    p.add_argument("--format", required=True, choices=[f.value for f in DiskFormat], dest="fmt")
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        help="the backend the volume is in (default: the manifest's, if it holds FORMAT)",
    )
    p.add_argument("--dry-run", action="store_true", help="check and show; write nothing")
    args = parse(p, argv)
    pool, sep, volume = args.volume.partition("/")
    if not sep or not pool or not volume or "/" in volume:
        raise ReconcileError(f"--volume {args.volume!r}: expected POOL/VOLUME")
    config = read_config(args)
    with Session(config) as s:
        done = adopt(
            s,
            args.paths,
            instance=args.instance,
            disk=args.disk,
            pool=pool,
            volume=volume,
            fmt=DiskFormat(args.fmt),
            backend=Backend(args.backend) if args.backend else None,
            dry_run=args.dry_run,
        )
    for w in done.warnings:
        print(f"warning: {w}", file=sys.stderr)
    r = done.record
    verb = "would adopt" if args.dry_run else "adopted"
    backing = f", backed by cache entry {r.backing}" if r.backing else ""
    print(
        f"{verb} {r.pool}/{r.volume} as disk {r.instance}/{r.disk}: {r.backend.value} "
        f"{r.format.value} {format_size(r.virtual_size)}{backing}"
    )
    return EXIT_OK


def adopt(
    s: Session,
    paths: Sequence[str],
    *,
    instance: str,
    disk: str,
    pool: str,
    volume: str,
    fmt: DiskFormat,
    backend: Backend | None = None,
    dry_run: bool = False,
) -> Adoption:
    """Check everything, then (unless dry_run) write the record under the volume's lock.
    Nothing is written when any check fails."""
    spec = _declared(s, paths, instance, disk)
    drv, backend = _checked(s, spec, instance, disk, pool, volume, fmt, backend)
    found = drv.inspect_unmanaged(volume, fmt)
    warnings = []
    if found.header != fmt.value:
        warnings.append(
            f"{pool}/{volume}'s first bytes look like {found.header}, but it is adopted as the "
            f"declared {fmt}: the record is used, nothing is read through the header (a guest "
            "may have written it)"
        )
    rec = _record(spec, found, backend, pool, volume, instance, disk, fmt)
    if not dry_run:
        _write(s, drv, rec)
    return Adoption(rec, tuple(warnings))


def _declared(s: Session, paths: Sequence[str], instance: str, disk: str) -> DiskSpec:
    """The spec of the one disk the manifests under `paths` name so."""
    desired = s.load(paths)
    specs = [
        d.spec
        for inst in desired.instances
        if inst.instance == instance and not inst.deleted
        for d in inst.disks
        if d.spec.name == disk
    ]
    if len(specs) != 1:
        why = "no manifest names" if not specs else "several manifests name"
        raise ReconcileError(
            f"{why} disk {disk} of instance {instance} under {', '.join(paths)}; write its "
            "manifest first (once adopted, the manifest owns the disk)"
        )
    return specs[0]


def _checked(
    s: Session,
    spec: DiskSpec,
    instance: str,
    disk: str,
    pool: str,
    volume: str,
    fmt: DiskFormat,
    backend: Backend | None,
) -> tuple[ManagingDriver, Backend]:
    """The pool's driver and the backend the volume is in, once the volume is named as the
    disk, exists, can hold `fmt`, and neither it nor the disk has a record."""
    want = volume_name(instance, disk)
    if volume != want:
        raise ReconcileError(
            f"volume {pool}/{volume} is not named as the reconciler names this disk ({want}); "
            "rename it to that first (nothing is renamed for you)"
        )
    drv = s.managing_drivers().get(pool)
    if drv is None:
        raise ReconcileError(f"pool {pool} is not in the config, or has no driver that manages it")
    if backend is None:
        backend = spec.backend if fmt in BACKEND_FORMATS[spec.backend] else None
    if backend is None or fmt not in BACKEND_FORMATS[backend]:
        raise ReconcileError(
            f"the manifest's backend {spec.backend} cannot hold format {fmt}; name the backend "
            "the volume is in (--backend)"
        )
    pc = s.config.pools.get(pool)
    if pc is None or backend not in pc.backends:
        raise ReconcileError(f"pool {pool} does not serve backend {backend}")
    if not drv.volume_exists(volume):
        raise ReconcileError(f"volume {pool}/{volume} does not exist")
    if s.store.get(pool, volume) is not None:
        raise ReconcileError(f"{pool}/{volume} already has a record: it is managed")
    others = [r for r in s.store.for_instance(instance) if r.disk == disk]
    if others:
        raise ReconcileError(
            f"disk {disk} of instance {instance} already has a record "
            f"({others[0].pool}/{others[0].volume}); not adopted"
        )
    return drv, backend


def _record(
    spec: DiskSpec,
    found: Inspected,
    backend: Backend,
    pool: str,
    volume: str,
    instance: str,
    disk: str,
    fmt: DiskFormat,
) -> DiskRecord:
    """The record: the manifest's spec, in the backend, format and size found."""
    recorded = spec.spec_dict() | {
        "backend": backend.value,
        "pool": pool,
        "format": fmt.value,
        "size": found.virtual_size,
    }
    # An adopted volume is recorded as it is found: never as encrypted (the reconciler
    # holds no key for it); a manifest that asks for encryption then plans that change.
    recorded.pop("encryption", None)
    return DiskRecord(
        kind=RecordKind.DISK,
        backend=backend,
        pool=pool,
        volume=volume,
        instance=instance,
        disk=disk,
        format=fmt,
        virtual_size=found.virtual_size,
        spec=recorded,
        source=dict(recorded["source"]),
        backing=found.backing,
        state=RecordState.READY,
        generation=1,
    )


def _write(s: Session, drv: ManagingDriver, rec: DiskRecord) -> None:
    """The record written under the volume's lock, checked again there: a second adoption
    or a `cache gc` of its backing entry may have run since the checks."""
    s.store.check_writable()
    drv.claim()
    with drv.lock(rec.volume), contextlib.ExitStack() as held:
        if rec.backing is not None:
            # Held shared, as a create holds it: `cache gc` cannot take the entry between
            # the check above and the record that references it.
            held.enter_context(drv.lock(rec.backing, shared=True))
            if s.store.get(rec.pool, rec.backing) is None:
                raise ReconcileError(f"cache entry {rec.backing} was removed meanwhile")
        if s.store.get(rec.pool, rec.volume) is not None:
            raise ReconcileError(f"{rec.pool}/{rec.volume} was adopted meanwhile")
        s.store.put(rec, None)
        drv.keep_record_copy(rec)
    s.store.sync()
