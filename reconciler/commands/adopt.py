"""`reconcile adopt`: bring an existing volume under management, by explicit name only
(Crossplane's adoption; DESIGN invariant 4: a volume without a record is never touched
until an operator adopts it).

The format is the one the operator declares, never the one the bytes announce: the driver
checks the volume as that format (drivers/base.py inspect_unmanaged), refuses what must
not be managed, and only reports a header that disagrees (a raw disk whose guest wrote a
qcow2 header is exactly the raw disk it was). The disk's manifest must already name it:
the record is written to the manifest's spec, in the layout and size found, so the next
plan shows whatever differs (a resize, a migration, or nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.control.session import Session
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import BACKEND_FORMATS, Backend, DiskFormat


@dataclass(frozen=True)
class Adoption:
    record: DiskRecord
    warnings: tuple[str, ...]


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
    spec = specs[0]
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
    found = drv.inspect_unmanaged(volume, fmt)
    warnings = []
    if found.header != fmt.value:
        warnings.append(
            f"{pool}/{volume}'s first bytes look like {found.header}, but it is adopted as the "
            f"declared {fmt}: the record is used, nothing is read through the header (a guest "
            "may have written it)"
        )
    recorded = spec.spec_dict() | {
        "backend": backend.value,
        "pool": pool,
        "format": fmt.value,
        "size": found.virtual_size,
    }
    rec = DiskRecord(
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
    if dry_run:
        return Adoption(rec, tuple(warnings))
    s.store.check_writable()
    drv.claim()
    with drv.lock(volume), contextlib.ExitStack() as held:
        if found.backing is not None:
            # Held shared, as a create holds it: `cache gc` cannot take the entry between
            # the check above and the record that references it.
            held.enter_context(drv.lock(found.backing, shared=True))
            if s.store.get(pool, found.backing) is None:
                raise ReconcileError(f"cache entry {found.backing} was removed meanwhile")
        if s.store.get(pool, volume) is not None:
            raise ReconcileError(f"{pool}/{volume} was adopted meanwhile")
        s.store.put(rec, None)
        drv.keep_record_copy(rec)
    s.store.sync()
    return Adoption(rec, tuple(warnings))
