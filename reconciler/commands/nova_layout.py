"""What `reconcile import-nova` reads: a Nova compute host's instance disks, where they
are and which format each one is (the import itself is commands/nova.py).

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
`_base/`: anywhere else is how a guest reads host files. Reading changes nothing; a disk
found in the pool under its name without a record, whose Nova file is gone, is one an
interrupted import moved, and is checked where it is now.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.drivers.api import ManagingDriver
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import CACHE_PREFIX, volume_name
from reconciler.model.record import RecordKind
from reconciler.schema.bounded import UnsafeInput, load_json, read_regular
from reconciler.schema.common import DiskFormat

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


def intent(inst: Path) -> list[str]:
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
    from reconciler.drivers.ingest.check import run_limited

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
    default = configured_format(images_type, use_cow_images)
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
        _scan_instance(inst, default, instances_path / "_base", driver, store, pool)
    return found


def _scan_instance(
    inst: NovaInstance,
    default: DiskFormat,
    base_dir: Path,
    driver: ManagingDriver,
    store: RecordStore,
    pool: str,
) -> None:
    """One instance directory's disks (those disk.info, the directory or an interrupted
    import's intent name), each checked; what is wrong is the instance's error."""
    entry = inst.path
    try:
        info = _read_disk_info(entry)
    except ReconcileError as e:
        inst.errors.append(str(e))
        return
    names = {p.name for p in entry.iterdir() if DISK_RE.match(p.name)}
    names |= {n for n in intent(entry) if DISK_RE.match(n)}
    names |= {Path(k).name for k in info if Path(k).parent == entry and DISK_RE.match(Path(k).name)}
    for name in sorted(names):
        d = _scan_disk(inst, name, info.get(str(entry / name)), default, base_dir)
        if d is None:
            continue
        vol = volume_name(inst.uuid, name)
        if not d.path.exists():
            if store.get(pool, vol) is not None or not driver.volume_exists(vol):
                continue  # imported already, or gone (then disk.info is stale)
            inst.resumed.append(name)
        try:
            if name in inst.resumed:
                _check_moved(d, vol, driver)
            else:
                _check(d, base_dir, driver, store)
        except (ReconcileError, OSError) as e:
            inst.errors.append(f"{d.path}: {e}")
            continue
        inst.disks.append(d)
    for p in sorted(entry.iterdir()):
        if p.name.startswith("disk") and not DISK_RE.match(p.name) and p.name != "disk.info":
            inst.skipped.append(p.name)


def _scan_disk(
    inst: NovaInstance, name: str, fmt_text: str | None, default: DiskFormat, base_dir: Path
) -> NovaDisk | None:
    """The disk `name` with its format: disk.info's (`fmt_text`), else the config's;
    None (and the instance's error) for a format disk.info names that is not Nova's."""
    path = inst.path / name
    if fmt_text is None:
        fmt, origin = (DiskFormat.RAW if name == "disk.config" else default), "config"
    elif fmt_text in NOVA_FORMATS:
        fmt, origin = NOVA_FORMATS[fmt_text], "disk.info"
    else:
        inst.errors.append(f"{path}: disk.info says format {fmt_text!r}; not imported")
        return None
    return NovaDisk(name, path, fmt, origin)


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


def _check(d: NovaDisk, base_dir: Path, driver: ManagingDriver, store: RecordStore) -> None:
    from reconciler.drivers.flows.qemuimg import NotAFile
    from reconciler.drivers.ingest.headers import file_header_format

    st = os.lstat(d.path)
    if not os.path.isfile(d.path) or os.path.islink(d.path):
        raise NotAFile("not a regular file")
    d.header = file_header_format(str(d.path))
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
