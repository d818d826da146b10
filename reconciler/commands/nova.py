"""`reconcile import-nova`: take a Nova compute host's instance disks under management.

Nova's libvirt driver keeps, under its `instances_path` (nova/virt/libvirt/imagebackend.py,
the file backends Flat, Qcow2 and Ploop; nova/virt/libvirt/driver.py `_create_image`):

  <instances_path>/<uuid>/disk         the root disk
  <instances_path>/<uuid>/disk.local   the ephemeral disk (disk.eph0, disk.eph1, ... when
                                       several are asked for by block device mapping)
  <instances_path>/<uuid>/disk.swap    swap
  <instances_path>/<uuid>/disk.config  the config drive (always a raw file)
  <instances_path>/<uuid>/disk.info    Nova's own record of the formats: one line of JSON,
                                       {"<absolute path of a disk>": "raw"|"qcow2"|"ploop"}
                                       (Image.resolve_driver_format writes it)
  <instances_path>/_base/<name>        the shared image cache: <name> is the sha1 of the
                                       image id (imagecache.get_cache_fname); qcow2 disks are
                                       overlays on these (raw with force_raw_images, the
                                       default), as are `ephemeral_*` and `swap_*` templates

disk.info is in a directory others write (Nova, and whoever has its files): it is read as
input, within bounds (reconciler/schema/bounded.py), and one that is not a regular UTF-8 file of
shallow JSON is that instance's error; the other instances are imported.

A disk's format comes from disk.info, else from the Nova config given (`images_type`,
`use_cow_images`): never from its bytes, which its guest wrote (that is the point: a raw
disk whose guest wrote a qcow2 header stays raw). A qcow2 disk's backing file must be in
`_base/`; it becomes a cache entry of the pool (linked or copied, checked as raw by the
format inspector first), and the overlay's header is pointed at it with backing format raw.

Order, so a crash at any point loses nothing and a second run finishes: cache entries are
placed and recorded first; then each disk is moved (one rename on one file system, else a
synced copy linked into place, then the source removed) and then recorded; the manifest is
written last. A disk found in the pool under its name without a record, whose Nova file is
gone, is one an interrupted import moved: it is recorded now. The instance's libvirt
domain still names Nova's paths: stop it before the import, and redefine it after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.drivers.api import ManagingDriver, overlays_of
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import CACHE_PREFIX, volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.bounded import UnsafeInput, load_json, read_regular
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.write import write_atomic
from reconciler.util import faults

# Nova's disk names (nova/virt/libvirt/driver.py): what this import takes, in this order.
DISK_RE = re.compile(r"^disk(\.local|\.swap|\.config|\.eph[0-9]+)?$")
# The images_type values whose disks are files under instances_path.
FILE_IMAGES_TYPES = ("raw", "flat", "qcow2", "default", "ploop")
NOVA_FORMATS = {"raw": DiskFormat.RAW, "qcow2": DiskFormat.QCOW2, "ploop": DiskFormat.PLOOP}
# The most of disk.info (and of the import's own intent file) read: a few disks' paths.
MAX_INFO = 1 << 16


def nova_base_entry(name: str) -> str:
    """The cache entry a Nova `_base` file becomes in a pool."""
    return f"{CACHE_PREFIX}nova-{name}"


def configured_format(images_type: str, use_cow_images: bool) -> DiskFormat:
    """The format Nova gives an instance disk under this config (imagebackend.Backend):
    `default` is qcow2 with use_cow_images, else raw (flat)."""
    if images_type in ("raw", "flat"):
        return DiskFormat.RAW
    if images_type == "qcow2":
        return DiskFormat.QCOW2
    if images_type == "ploop":
        return DiskFormat.PLOOP
    if images_type == "default":
        return DiskFormat.QCOW2 if use_cow_images else DiskFormat.RAW
    raise ReconcileError(
        f"--images-type {images_type}: its disks are not files under the instances path "
        f"(import-nova takes {', '.join(FILE_IMAGES_TYPES)})"
    )


@dataclass
class NovaDisk:
    name: str
    path: Path
    format: DiskFormat
    format_from: str  # "disk.info" or "config"
    virtual_size: int = 0
    base: str | None = None  # the `_base` file a qcow2 overlay is backed by
    header: str = "raw"
    rebased: bool = False  # already pointed at its cache entry (an interrupted import)


@dataclass
class NovaInstance:
    uuid: str
    path: Path
    disks: list[NovaDisk] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # in the pool: an interrupted import


INTENT = ".reconcile-import.json"  # in the instance's directory while it is imported


def _intent(inst: Path) -> list[str]:
    """The disks an interrupted import of this instance was moving (written before the
    first one moves: a moved disk is then found in the pool, not in Nova's directory)."""
    path = inst / INTENT
    try:
        doc = load_json(read_regular(str(path), what=str(path), max_bytes=MAX_INFO), what=str(path))
    except (FileNotFoundError, UnsafeInput):
        return []
    return [str(n) for n in doc] if isinstance(doc, list) else []


def _read_disk_info(inst: Path) -> dict[str, str]:
    """Nova's disk.info, read as input: a regular file (never a symbolic link, a FIFO or a
    device), opened without blocking, UTF-8 JSON within MAX_INFO bytes and shallow."""
    path = inst / "disk.info"
    try:
        raw = read_regular(str(path), what=str(path), max_bytes=MAX_INFO)
    except FileNotFoundError:
        return {}
    if not raw.strip():
        return {}
    try:
        doc = load_json(raw, what=str(path), max_depth=2, max_bytes=MAX_INFO)
    except UnsafeInput as e:
        raise ReconcileError(f"{e} (Nova writes one line of JSON)") from None
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise ReconcileError(f"{path}: expected an object of disk path -> format")
    return doc


def _info(path: Path, fmt: DiskFormat) -> dict[str, Any]:
    from reconciler.drivers.flows.qemuimg import QEMU_FORMAT, fd_path, info_argv, open_volume
    from reconciler.drivers.ingest.images import run_limited

    with open_volume(str(path), write=False) as fd:
        out = run_limited(
            info_argv(QEMU_FORMAT[fmt], fd_path(fd)),
            fds=(fd,),
            what=f"qemu-img info -f {QEMU_FORMAT[fmt]} {path}",
        )
    doc: dict[str, Any] = json.loads(out)
    return doc


def scan(
    instances_path: Path,
    images_type: str,
    use_cow_images: bool,
    driver: ManagingDriver,
    store: RecordStore,
    pool: str,
) -> list[NovaInstance]:
    """Read the layout: every instance directory's disks and their formats, checked.
    A disk whose Nova file is gone but which is in the pool under its name without a
    record was moved by an interrupted import: it is checked where it is now."""
    from reconciler.drivers.ingest.headers import file_header_format

    default = configured_format(images_type, use_cow_images)
    base_dir = instances_path / "_base"
    found = []
    for entry in sorted(instances_path.iterdir()):
        try:
            inst_id = str(uuid.UUID(entry.name))
        except ValueError:
            continue  # _base, locks, compute_nodes, snapshots
        if inst_id != entry.name or not entry.is_dir():
            continue
        inst = NovaInstance(inst_id, entry)
        found.append(inst)
        try:
            info = _read_disk_info(entry)
        except ReconcileError as e:
            inst.errors.append(str(e))
            continue
        names = {p.name for p in entry.iterdir() if DISK_RE.match(p.name)}
        names |= {n for n in _intent(entry) if DISK_RE.match(n)}
        names |= {
            Path(k).name for k in info if Path(k).parent == entry and DISK_RE.match(Path(k).name)
        }
        for name in sorted(names):
            path = entry / name
            vol = volume_name(inst_id, name)
            fmt_text = info.get(str(path))
            if fmt_text is None:
                fmt, origin = (DiskFormat.RAW if name == "disk.config" else default), "config"
            elif fmt_text in NOVA_FORMATS:
                fmt, origin = NOVA_FORMATS[fmt_text], "disk.info"
            else:
                inst.errors.append(f"{path}: disk.info says format {fmt_text!r}; not imported")
                continue
            d = NovaDisk(name, path, fmt, origin)
            if not path.exists():
                if store.get(pool, vol) is not None or not driver.volume_exists(vol):
                    continue  # imported already, or gone (then disk.info is stale)
                inst.resumed.append(name)
            try:
                if name in inst.resumed:
                    _check_moved(d, vol, driver)
                else:
                    _check(d, base_dir, file_header_format, driver, store)
            except (ReconcileError, OSError) as e:
                inst.errors.append(f"{path}: {e}")
                continue
            inst.disks.append(d)
        for p in sorted(entry.iterdir()):
            if p.name.startswith("disk") and not DISK_RE.match(p.name) and p.name != "disk.info":
                inst.skipped.append(p.name)
    return found


def _check_moved(d: NovaDisk, volume: str, driver: ManagingDriver) -> None:
    """A disk an interrupted import moved (its header already names its cache entry: it
    is pointed there before it moves), checked in the pool as its format."""
    found = driver.inspect_unmanaged(volume, d.format)
    d.virtual_size, d.header = found.virtual_size, found.header
    prefix = nova_base_entry("")
    if found.backing is not None:
        if not found.backing.startswith(prefix):
            raise ReconcileError(f"it is backed by {found.backing}, not a Nova base entry")
        d.base = found.backing[len(prefix) :]
        d.rebased = True


def _check(
    d: NovaDisk, base_dir: Path, header_of: Any, driver: ManagingDriver, store: RecordStore
) -> None:
    from reconciler.drivers.flows.qemuimg import NotAFile

    st = os.lstat(d.path)
    if not os.path.isfile(d.path) or os.path.islink(d.path):
        raise NotAFile("not a regular file")
    d.header = header_of(str(d.path))
    if d.format is DiskFormat.RAW:
        d.virtual_size = st.st_size
        return
    info = _info(d.path, d.format)
    d.virtual_size = int(info["virtual-size"])
    data = info.get("format-specific", {}).get("data", {})
    if isinstance(data, dict) and data.get("data-file"):
        raise ReconcileError("it names an external data file; not imported")
    backing = info.get("backing-filename")
    if backing is None:
        return
    where = os.path.normpath(os.path.join(d.path.parent, str(backing)))
    prefix = nova_base_entry("")
    entry = driver.volume_at(where)
    if entry is not None and entry.startswith(prefix):
        # An interrupted import pointed it at the pool's copy of its base: that copy must
        # be the recorded cache entry, named raw.
        cached = store.get(driver.name, entry)
        if cached is None or cached.kind is not RecordKind.CACHE:
            raise ReconcileError(f"its backing file {backing} is not a recorded cache entry")
        if info.get("backing-filename-format") != "raw":
            raise ReconcileError(f"its backing file {backing} is not named raw")
        d.base = entry[len(prefix) :]
        d.rebased = True
        return
    if os.path.dirname(where) != os.path.normpath(base_dir):
        raise ReconcileError(
            f"its backing file {backing} is not in {base_dir}; not imported (a backing file "
            "outside the image cache is how a guest reads host files)"
        )
    fmt = info.get("backing-filename-format")
    if fmt not in (None, "raw"):
        raise ReconcileError(f"its backing file {backing} is {fmt}, not raw; not imported")
    d.base = os.path.basename(where)


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
    verb = "would " if dry_run else ""
    if not dry_run:
        store.check_writable()
        driver.claim()
    for inst in found:
        if inst.errors:
            rep.errors += [f"{inst.uuid}: {e}" for e in inst.errors]
            rep.errors.append(f"{inst.uuid}: not imported (nothing of it is moved)")
            continue
        rep.warnings += [
            f"{inst.uuid}: {s} is not one of Nova's instance disks; left where it is"
            for s in inst.skipped
        ]
        specs = [
            r.spec for r in store.for_instance(inst.uuid) if r.kind is RecordKind.DISK
        ]  # imported by an earlier run
        if inst.disks and not dry_run:
            names = sorted({d.name for d in inst.disks} | set(_intent(inst.path)))
            write_atomic(str(inst.path / INTENT), json.dumps(names) + "\n")
        for d in inst.disks:
            if d.header != d.format.value:
                rep.warnings.append(
                    f"{inst.uuid}/{d.name}: its first bytes look like {d.header}, but "
                    f"{d.format_from} says {d.format.value}: recorded as {d.format.value} "
                    "(a guest may have written that header)"
                )
            spec = _spec(d, pool, images)
            specs.append(spec)
            vol = volume_name(inst.uuid, d.name)
            entry = nova_base_entry(d.base) if d.base else None
            how = f", backed by cache entry {entry}" if entry else ""
            what = "record" if d.name in inst.resumed else "move"
            rep.lines.append(
                f"{verb}{what} {d.path} -> {pool}/{vol} ({d.format.value} from "
                f"{d.format_from}, {format_size(d.virtual_size)}{how})"
            )
            if not dry_run:
                _import_disk(driver, store, pool, instances_path, inst, d, spec)
        if not specs:
            continue
        manifest = out / f"{inst.uuid}.yaml"
        rep.lines.append(f"{verb}write {manifest} ({len(specs)} disk(s))")
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
            specs.sort(key=lambda sp: _ORDER.get(sp["name"], 9))
            write_atomic(str(manifest), _manifest_text(inst.uuid, specs, instances_path))
            faults.point("nova.manifest.written")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(inst.path / INTENT)
    if not dry_run:
        store.sync()
    return rep


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
    from reconciler.drivers.ingest.images import check_local_raw

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
