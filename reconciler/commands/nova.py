"""`reconcile import-nova`: take a Nova compute host's instance disks under management:
one manifest per instance into --out, a record per disk, the disks moved into the pool and
their `_base` files made the pool's cache entries. What is read, and how each disk's
format is decided, is commands/nova_layout.py; an instance with any error is not imported
at all (nothing of it is moved), the others are.

A qcow2 disk's `_base` file becomes a cache entry of the pool (linked or copied, checked
as raw by the format inspector first), and the overlay's header is pointed at it with
backing format raw.

Order, so a crash at any point loses nothing and a second run finishes: cache entries are
placed and recorded first; then each disk is moved (one rename on one file system, else a
synced copy linked into place, then the source removed) and then recorded; the manifest is
written last. The instance's intent file (nova_layout.INTENT), written before its first
disk moves and removed after its manifest, names the disks an interrupted import was
moving: a disk found in the pool under its name without a record, whose Nova file is gone,
is recorded now. The instance's libvirt domain still names Nova's paths: stop it before
the import, and redefine it after.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.commands.common import EXIT_ERROR, EXIT_OK, parse, read_config
from reconciler.commands.nova_layout import (
    FILE_IMAGES_TYPES,
    INTENT,
    NovaDisk,
    NovaInstance,
    intent,
    nova_base_entry,
    scan,
)
from reconciler.control.session import Session
from reconciler.drivers.api import ManagingDriver, overlays_of
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.write import write_atomic
from reconciler.util import faults


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile import-nova",
        description="Take a Nova compute host's instance disks under management: one "
        "manifest per instance into --out, a record per disk, the disks moved into POOL "
        "(renamed on one file system, else copied) and their _base files made the pool's "
        "cache entries. Formats come from each instance's disk.info, else from the Nova "
        "config given; never from the disks' bytes. Stop the instances first.",
    )
    p.add_argument("--instances-path", required=True, metavar="DIR")
    p.add_argument("--images-type", required=True, choices=FILE_IMAGES_TYPES)
    p.add_argument("--use-cow-images", action="store_true", help="Nova's use_cow_images")
    p.add_argument("--pool", required=True, metavar="POOL")
    p.add_argument("--out", required=True, metavar="MANIFEST_DIR")
    p.add_argument("--dry-run", action="store_true", help="show what would be done")
    args = parse(p, argv)
    config = read_config(args)
    with Session(config) as s:
        drv = s.managing_drivers().get(args.pool)
        if drv is None:
            raise ReconcileError(f"pool {args.pool} is not in the config, or has no driver")
        rep = import_nova(
            Path(args.instances_path),
            images_type=args.images_type,
            use_cow_images=args.use_cow_images,
            pool=args.pool,
            driver=drv,
            store=s.store,
            out=Path(args.out),
            catalog=dict.fromkeys(config.images, ""),
            dry_run=args.dry_run,
            backends=config.pools[args.pool].backends,
        )
    for line in rep.lines:
        print(line)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR if rep.errors else EXIT_OK


def _spec(d: NovaDisk, pool: str, images: Mapping[str, str]) -> dict[str, Any]:
    """The manifest's disk. Its source says how it would be made again; an import makes
    nothing, so a root disk names its image where the config's catalog has the one Nova
    cached it as (by its id's sha1), and every other disk a template (swap for swap)."""
    source: dict[str, Any] = {"template": "blank"}
    if d.name == "disk.swap":
        source = {"template": "swap"}
    elif d.base is not None and d.base in images:
        source = {"image": images[d.base]}
    backend = {
        DiskFormat.RAW: Backend.FLAT,
        DiskFormat.QCOW2: Backend.QCOW2 if d.base is not None else Backend.FLAT,
        DiskFormat.PLOOP: Backend.PLOOP,
    }[d.format]
    return {
        "name": d.name,
        "backend": backend.value,
        "pool": pool,
        "format": d.format.value,
        "size": d.virtual_size,
        "source": source,
        "deletionPolicy": "Delete",
    }


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Import:
    """One run's where and how: Nova's directory, the pool and its store, the manifests'
    directory, the config's images by the name Nova caches them as."""

    instances_path: Path
    pool: str
    driver: ManagingDriver
    store: RecordStore
    out: Path
    images: Mapping[str, str]
    dry_run: bool


def import_nova(
    instances_path: Path,
    *,
    images_type: str,
    use_cow_images: bool,
    pool: str,
    driver: ManagingDriver,
    store: RecordStore,
    out: Path,
    catalog: Mapping[str, str],
    dry_run: bool,
    backends: Collection[Backend],
) -> Report:
    """`catalog`: image id -> (unused); Nova names `_base` files by sha1 of the id.
    `backends`: those the pool serves; an instance with a disk that would be recorded in
    another (Nova's disks become flat, qcow2 or ploop disks) is not imported."""
    # Nova names a `_base` file by the sha1 of its image's id (imagecache.get_cache_fname).
    images = {hashlib.sha1(i.encode()).hexdigest(): i for i in catalog}
    job = _Import(instances_path, pool, driver, store, out, images, dry_run)
    rep = Report()
    if not instances_path.is_dir():
        raise ReconcileError(f"{instances_path} is not a directory")
    found = scan(instances_path, images_type, use_cow_images, driver, store, pool)
    for inst in found:
        for d in inst.disks:
            backend = Backend(_spec(d, pool, images)["backend"])
            if backend not in backends:
                inst.errors.append(
                    f"{d.path}: it would be a {backend} disk, and pool {pool} serves "
                    f"{', '.join(sorted(b.value for b in backends))}"
                )
    if not dry_run:
        store.check_writable()
        driver.claim()
    for inst in found:
        if inst.errors:
            rep.errors += [f"{inst.uuid}: {e}" for e in inst.errors]
            rep.errors.append(f"{inst.uuid}: not imported (nothing of it is moved)")
            continue
        _import_instance(job, inst, rep)
    if not dry_run:
        store.sync()
    return rep


def _import_instance(job: _Import, inst: NovaInstance, rep: Report) -> None:
    """One instance without errors: its disks moved and recorded, then its manifest
    written (of every disk it has a record of, from this run or an earlier one)."""
    verb = "would " if job.dry_run else ""
    rep.warnings += [
        f"{inst.uuid}: {s} is not one of Nova's instance disks; left where it is"
        for s in inst.skipped
    ]
    specs = [
        r.spec for r in job.store.for_instance(inst.uuid) if r.kind is RecordKind.DISK
    ]  # imported by an earlier run
    if inst.disks and not job.dry_run:
        names = sorted({d.name for d in inst.disks} | set(intent(inst.path)))
        write_atomic(str(inst.path / INTENT), json.dumps(names) + "\n")
    for d in inst.disks:
        if d.header != d.format.value:
            rep.warnings.append(
                f"{inst.uuid}/{d.name}: its first bytes look like {d.header}, but "
                f"{d.format_from} says {d.format.value}: recorded as {d.format.value} "
                "(a guest may have written that header)"
            )
        spec = _spec(d, job.pool, job.images)
        specs.append(spec)
        vol = volume_name(inst.uuid, d.name)
        entry = nova_base_entry(d.base) if d.base else None
        how = f", backed by cache entry {entry}" if entry else ""
        what = "record" if d.name in inst.resumed else "move"
        rep.lines.append(
            f"{verb}{what} {d.path} -> {job.pool}/{vol} ({d.format.value} from "
            f"{d.format_from}, {format_size(d.virtual_size)}{how})"
        )
        if not job.dry_run:
            _import_disk(job.driver, job.store, job.pool, job.instances_path, inst, d, spec)
    if not specs:
        return
    manifest = job.out / f"{inst.uuid}.yaml"
    rep.lines.append(f"{verb}write {manifest} ({len(specs)} disk(s))")
    if not job.dry_run:
        job.out.mkdir(parents=True, exist_ok=True)
        specs.sort(key=lambda sp: _ORDER.get(sp["name"], 9))
        write_atomic(str(manifest), _manifest_text(inst.uuid, specs, job.instances_path))
        faults.point("nova.manifest.written")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inst.path / INTENT)


_ORDER = {"disk": 0, "disk.local": 1, "disk.swap": 3, "disk.config": 4}


def _import_disk(
    driver: ManagingDriver,
    store: RecordStore,
    pool: str,
    instances_path: Path,
    inst: NovaInstance,
    d: NovaDisk,
    spec: dict[str, Any],
) -> None:
    vol = volume_name(inst.uuid, d.name)
    entry = nova_base_entry(d.base) if d.base else None
    if entry is not None and d.base is not None:
        _place_entry(driver, store, pool, instances_path / "_base" / d.base, entry)
    with driver.lock(vol):
        if store.get(pool, vol) is not None:
            raise ReconcileError(f"{pool}/{vol} already has a record; not imported again")
        if d.name not in inst.resumed:
            if entry is not None and not d.rebased:
                # Before the move: Nova's disk then names the pool's copy of the same base
                # (it still works), and a disk found moved already names its entry.
                overlays_of(driver).point_overlay_at(str(d.path), entry)
                faults.point("nova.disk.pointed")
            driver.take_file(str(d.path), vol, keep_source=False)
        rec = DiskRecord(
            kind=RecordKind.DISK,
            backend=Backend(spec["backend"]),
            pool=pool,
            volume=vol,
            instance=inst.uuid,
            disk=d.name,
            format=d.format,
            virtual_size=d.virtual_size,
            spec=spec,
            source=dict(spec["source"]),
            backing=entry,
            state=RecordState.READY,
            generation=1,
        )
        store.put(rec, None)
        faults.point("nova.disk.recorded")
        driver.keep_record_copy(rec)


def _place_entry(
    driver: ManagingDriver, store: RecordStore, pool: str, base: Path, entry: str
) -> None:
    """A Nova `_base` file as a cache entry of the pool (linked or copied: other Nova
    instances may still use it), checked as raw first, recorded after it is in place."""
    from reconciler.drivers.flows.qemuimg import open_volume
    from reconciler.drivers.ingest.check import check_local_raw

    with driver.lock(entry):
        if store.get(pool, entry) is not None:
            return
        with open_volume(str(base), write=False) as fd:
            sha = check_local_raw(fd, str(base))
            size = os.fstat(fd).st_size
        if not driver.volume_exists(entry):
            driver.take_file(str(base), entry, keep_source=True)
        spec = {"nova_base": base.name, "sha256": sha, "format": "raw", "size": size}
        store.put(
            DiskRecord(
                kind=RecordKind.CACHE,
                backend=Backend.FLAT,
                pool=pool,
                volume=entry,
                instance="",
                disk="",
                format=DiskFormat.RAW,
                virtual_size=max(size, 512),
                spec=spec,
                source=dict(spec),
                state=RecordState.READY,
                generation=1,
            ),
            None,
        )
        faults.point("nova.entry.recorded")


def _manifest_text(instance: str, disks: list[dict[str, Any]], origin: Path) -> str:
    lines = [
        f"# Imported from Nova ({origin / instance}) by reconcile import-nova.",
        "apiVersion: reconciler/v1",
        "kind: InstanceStorage",
        f"instance: {instance}",
        "disks:",
    ]
    for d in disks:
        lines.append(f"  - name: {d['name']}")
        for k in ("backend", "pool", "format", "size"):
            lines.append(f"    {k}: {d[k]}")
        src = d["source"]
        key, value = next(iter(src.items()))
        lines += ["    source:", f"      {key}: {value}"]
    return "\n".join(lines) + "\n"
