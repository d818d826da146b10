"""LVM pools (a volume group on the host) serving the `lvm` backend.

Disks are logical volumes of the pool's VG, made, grown and removed with LVM2's own tools
(drivers/lvm.py runs them, confined to the VG), as libvirt's `logical` pool cannot resize.
The libvirt pool of the config is a `logical` pool over the same VG: it is what domains
name, and the "in use by a domain" check matches the domains' disks against it by
`<source pool= volume=>` and by the paths /dev/VG/LV and /dev/mapper/VG-LV. libvirt cannot
start a logical pool on a kernel without device-mapper (its pool start runs
`vgchange -aly VG`, which fails on /dev/mapper/control), so the driver needs it defined,
not active, and never asks libvirt for its volumes: they are LVM's (`lvs`, names only).

Records stay in the host's store (SQLite). Each LV carries, as LVM tags (written by the
host into the VG's metadata, never by a guest, which writes only an LV's bytes):
- `reconciler.record:STORE/POOL`, the back-pointer to its record, set by the `lvcreate`
  that makes it, so every LV the reconciler made names the store that recorded it;
- `reconciler.copy.I.N:CHUNK`, a copy of its record (zlib-compressed JSON, base64, split
  in N tags of at most COPY_CHUNK characters: tags allow only [A-Za-z0-9_+.-/=!:&#], which
  base64 fits), for `records rebuild`; written after the record is, in one `lvchange`.
Who can write them: only root on this host (the VG's metadata; a guest writes only an
LV's bytes, and a VG here is local to its host). So the copies are trusted by where they
are, not sealed; each is still checked as input (schema/recordcheck.py) before rebuild
restores it, and rebuild refuses any that would make the next plan destroy something.

The VG carries `reconciler.owner:OWNER` (base64 JSON, as drivers/ownership.py's file): the
store that manages the pool, added once, under a host lock, and replaced only by
`records rebuild`. A VG is local to its host (no lvmlockd here), so the locks are the
usual byte-range locks, in /run/lock/reconciler/lvm-VG/locks, shared by every reconciler
on the host whatever its store.

The image cache is LVs of the same VG: an image is fetched and checked into a temporary
file beside the records database, converted to raw with explicit formats, and copied into
a raw cache entry LV; templates are made by mkfs on a temporary file once per
(kind, size, label) and copied in likewise. A disk is a new LV with the entry's bytes
copied in (raw to raw, through drivers/lvm.py's LvData: /dev/VG/LV in production, the
segment map in the test mode), zeros beyond them; grown with `lvextend` alone (raw).
Delete clears the LV's extents first (volumeClear: zero, or none; volumeClearSize bytes,
0 = all), since LVM hands freed extents to the next LV, then `lvremove`.

Migrations (apply/steps/migrate.py) in and out: the one layout is lvm/raw. A copy is a new
LV (zeroed past its size); a raw file or LV is copied in through LvData, anything else by
qemu-img, which reaches an LV as its raw driver with `offset` and `size` over a
host_device (/dev/VG/LV; without activation, the LV's one segment of its PV: an LV of
several segments cannot be addressed so, and is refused). Free space is the VG's, and a
copy takes its whole size in extents (`thick_unit`), whatever its data. Adopting takes an
existing LV as raw at LVM's size; importing a file fills a temporary LV, renamed when whole.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import os
import threading
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from reconciler.drivers.api import (
    Access,
    Inspected,
    ManagingDriver,
    MigrationFacts,
    NoCopy,
    QemuImage,
    RecordCopies,
    VolumeExists,
)
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import convert_argv, fd_path, mkfs_argv
from reconciler.drivers.flows.takein import take_in
from reconciler.drivers.host import ownership
from reconciler.drivers.host.domains import Attachments, attachments
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.locks import LockDir
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.ingest.headers import HEADER_BYTES, header_format
from reconciler.drivers.lvm.tools import (
    LvData,
    Lvm,
    LvmError,
    Piece,
    PiecesSink,
    PiecesSource,
    message,
    pieces_reader,
    zero,
)
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord, Migration
from reconciler.schema.bounded import check_json, inflate, load_json
from reconciler.schema.common import Backend, DiskFormat, lv_name_refusal
from reconciler.schema.config import ImageConfig, LvmConfig, PoolConfig
from reconciler.schema.manifest import TemplateKind, TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked

log = get_logger(__name__)

LOCK_ROOT = Path("/run/lock/reconciler")
DM_CONTROL = "/dev/mapper/control"
BACKPOINTER = "reconciler.record:"
COPY_PREFIX = "reconciler.copy."
OWNER_TAG = "reconciler.owner:"
COPY_CHUNK = 960  # characters of a record copy per tag (LVM tags: up to 1024)
MAX_COPY_BYTES = 1 << 20  # a record copy inflated (a record is about 1 KiB)
LAYOUTS = frozenset({"lvm/raw"})  # what a migration copies out of and into an lvm pool
# An LV being filled before it takes its name (take_file); swept by sweep_temp.
LV_TEMP_PREFIX = "_tmp_"


def device_mapper_present() -> bool:
    """Whether the kernel has device-mapper: its control node opens (LVM2 makes the node
    even where the kernel lacks the driver, and opening it then fails with ENODEV)."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENXIO)
    os.close(fd)
    return True


def check_lv_name(name: str) -> None:
    """Refuse, before anything is made, a volume name LVM would refuse as an LV name
    (manifest validation refuses such disks already; cache entry names are checked here)."""
    why = lv_name_refusal(name)
    if why:
        raise ReconcileError(why)


def encode_copy(rec: DiskRecord) -> list[str]:
    """A record as LV tags: compressed JSON in base64, in numbered chunks."""
    data = base64.b64encode(zlib.compress(rec.model_dump_json().encode(), 9)).decode()
    chunks = [data[i : i + COPY_CHUNK] for i in range(0, len(data), COPY_CHUNK)]
    return [f"{COPY_PREFIX}{i}.{len(chunks)}:{c}" for i, c in enumerate(chunks)]


def decode_copy(tags: Sequence[str]) -> DiskRecord | None:
    """The record the tags carry (None: no copy); ValueError if it is damaged."""
    parts: dict[int, str] = {}
    counts: set[int] = set()
    for t in tags:
        if not t.startswith(COPY_PREFIX):
            continue
        head, _, chunk = t[len(COPY_PREFIX) :].partition(":")
        i, _, n = head.partition(".")
        if not (i.isdigit() and n.isdigit()):
            raise ValueError(f"tag {t[:40]!r} is not a record copy chunk")
        parts[int(i)] = chunk
        counts.add(int(n))
    if not parts:
        return None
    if len(counts) != 1 or sorted(parts) != list(range(counts.pop())):
        raise ValueError("its chunks are incomplete or from two copies")
    packed = base64.b64decode("".join(parts[i] for i in sorted(parts)))
    raw = inflate(packed, what="the copy", max_bytes=MAX_COPY_BYTES)
    return DiskRecord.model_validate_json(check_json(raw, what="the copy"))


class LvmPoolDriver:
    access = Access.DEVICE

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
    ) -> None:
        assert config.lvm is not None  # PoolConfig requires it for the lvm backend
        self.name = name
        self.config = config
        self.lvm_config: LvmConfig = config.lvm
        self.conns = conns
        self.store = store
        self.images = dict(images or {})
        self.lvm = Lvm(name, config.lvm)
        self.data = LvData(self.lvm)
        self.vg = config.lvm.vg
        self._locks: LockDir | None = None
        # What this process knows of an LV while one of its threads holds the LV's lock
        # (only a holder changes it): existence, and the tags it wrote. Dropped when the
        # lock is taken and when it is released.
        self._mu = threading.Lock()
        self._held: Counter[str] = Counter()
        self._known: dict[str, bool] = {}
        self._tags: dict[str, list[str]] = {}
        self._libvirt_checked = False
        self.cache = entries.Cache(
            self,
            Backend.LVM,
            store=self._store,
            remove=self.delete_volume,
            scratch=self._tmp_file,
        )

    # -- the pool ---------------------------------------------------------------------

    def _call(self, what: str, fn: Any) -> Any:
        return self.conns.call(self.config.uri, f"{what} (pool {self.name})", fn)

    def check_libvirt_pool(self) -> None:
        """The config's libvirt pool must be a `logical` pool over this VG (defined; it
        need not be active, which it cannot be without device-mapper). And the test mode
        (activation off) is refused where device-mapper exists: LVs may be active there,
        and their bytes must not be written behind them through the PV."""
        if self._libvirt_checked:
            return
        if not self.lvm_config.activate and device_mapper_present():
            raise PoolError(
                f"pool {self.name}: `activate: false` is for hosts without device-mapper, "
                f"and this one has it ({DM_CONTROL}); set `activate: true`"
            )

        def get(conn: Any) -> tuple[str, str]:
            try:
                pool = conn.storagePoolLookupByName(self.config.libvirt_pool)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise PoolError(
                        f"libvirt pool {self.config.libvirt_pool!r} is not defined at "
                        f"{self.config.uri}; define a logical pool over VG {self.vg}"
                    ) from None
                raise
            root = ET.fromstring(pool.XMLDesc(0))
            return root.get("type", ""), root.findtext("source/name") or ""

        kind, vg = self._call("look up pool", get)
        if (kind, vg) != ("logical", self.vg):
            raise PoolError(
                f"libvirt pool {self.config.libvirt_pool!r} is a {kind or '?'} pool of "
                f"{vg or 'no VG'}; the lvm backend needs a logical pool over VG {self.vg}"
            )
        self._libvirt_checked = True

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

    def _note(self, lv: str, exists: bool, tags: list[str] | None = None) -> None:
        with self._mu:
            if lv in self._held:
                self._known[lv] = exists
                if tags is not None:
                    self._tags[lv] = tags
                else:
                    self._tags.pop(lv, None)

    # -- observing --------------------------------------------------------------------

    def list_volumes(self) -> frozenset[str]:
        return self.lvm.lv_names()

    def attachments(self) -> Attachments:
        def get(conn: Any) -> Attachments:
            by_pool = attachments(conn, self.config.libvirt_pool, f"/dev/{self.vg}")
            if not by_pool.known:
                return by_pool
            mapped = attachments(conn, self.config.libvirt_pool, "/dev/mapper")
            prefix = self.vg.replace("-", "--") + "-"

            def merge(a: dict[str, tuple[str, ...]], b: dict[str, tuple[str, ...]]) -> Any:
                out = {k: set(v) for k, v in a.items()}
                for name, doms in b.items():
                    lv = name[len(prefix) :].replace("--", "-")
                    if name.startswith(prefix):
                        out.setdefault(lv, set()).update(doms)
                    elif name in a:  # a `<source pool= volume=>` match
                        out[name].update(doms)
                return {k: tuple(sorted(v)) for k, v in out.items()}

            return Attachments(
                True, merge(by_pool.defined, mapped.defined), merge(by_pool.running, mapped.running)
            )

        att: Attachments = self._call("list domains", get)
        return att

    def as_managing(self) -> LvmPoolDriver:
        return self

    def close(self) -> None:
        pass  # an lvm pool holds nothing open

    def record_store(self) -> RecordStore | None:
        return None  # an lvm pool's records are in the host's database, as a file pool's

    def observe(self) -> ObservedPool:
        """The VG's LVs by name and which domains use them; never raises."""
        try:
            self.check_libvirt_pool()
            vg = self.lvm.check_vg()
            if self.store is not None:
                self._check(self._owner_from(vg))
            volumes = self.list_volumes()
            att = self.attachments()
        except ownership.ManagedElsewhere as e:
            return ObservedPool(self.name, None, str(e), managed_elsewhere=True)
        except (PoolError, LvmError) as e:
            return ObservedPool(self.name, None, str(e))
        return ObservedPool(
            self.name, volumes, None, {}, att.defined, att.running, att.known, att.why_unknown
        )

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Note managed LVs whose first bytes announce another format than recorded."""
        if pool.volumes is None:
            return pool
        managed = {r.volume: r for r in records if r.volume in pool.volumes}
        if not managed:
            return pool
        headers: dict[str, str] = {}
        try:
            with self.data.open_many({v: HEADER_BYTES for v in managed}, write=False) as maps:
                for v, pieces in maps.items():
                    fmt = header_format(pieces_reader(pieces)(0, HEADER_BYTES))
                    if fmt != managed[v].format.value:
                        headers[v] = fmt
        except (OSError, ReconcileError) as e:
            # Warnings only: an LV removed meanwhile, or not active, costs this look.
            log.warning("headers.unreadable", pool=self.name, error=str(e))
            return pool
        return dataclasses.replace(pool, header_formats=headers)

    def volume_exists(self, volume: str) -> bool:
        with self._mu:
            if volume in self._known:
                return self._known[volume]
        exists = self.lvm.lv_exists(volume)
        with self._mu:
            if volume in self._held:
                self._known[volume] = exists
        return exists

    # -- ownership: a VG tag ----------------------------------------------------------

    def _owner_from(self, vg: Mapping[str, str]) -> ownership.Owner | None:
        tags = [t for t in vg.get("vg_tags", "").split(",") if t.startswith(OWNER_TAG)]
        if not tags:
            return None
        try:
            if len(tags) > 1:
                raise ValueError("it has more than one owner tag")
            doc = load_json(base64.b64decode(tags[0][len(OWNER_TAG) :]), what="the tag")
            return ownership.Owner(
                str(doc["store"]), str(doc["location"]), str(doc["host"]), str(doc["since"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise PoolError(
                f"pool {self.name}: the owner tag of VG {self.vg} is damaged ({e}); it names "
                "the record store that manages the pool. Run 'reconcile records rebuild "
                f"{self.name}' to have this store manage it"
            ) from None

    def _owner_tag(self) -> str:
        owner = ownership.Owner.of(self._store().identity())
        return OWNER_TAG + base64.b64encode(owner.to_json().encode()).decode()

    def _check(self, owner: ownership.Owner | None) -> ownership.Owner | None:
        if owner is not None:
            why = ownership.refusal(self.name, owner, self._store().identity())
            if why is not None:
                raise ownership.ManagedElsewhere(why)
        return owner

    def owner(self) -> ownership.Owner | None:
        return self._owner_from(self.lvm.check_vg())

    def check_owner(self) -> None:
        self._check(self.owner())

    def claim(self) -> None:
        """Tag the VG with this store unless it is tagged; under the host's lock, so of
        two reconcilers claiming together exactly one wins."""
        self.check_libvirt_pool()
        with self.lock(".owner"):
            if self._check(self.owner()) is None:
                self.lvm.run("vgchange", "--addtag", self._owner_tag(), self.vg)

    def take_over(self) -> None:
        with self.lock(".owner"):
            vg = self.lvm.check_vg()
            old = [t for t in vg.get("vg_tags", "").split(",") if t.startswith(OWNER_TAG)]
            args = [a for t in old for a in ("--deltag", t)]
            self.lvm.run("vgchange", *args, "--addtag", self._owner_tag(), self.vg)

    # -- copies of records, as LV tags ------------------------------------------------

    def _backpointer(self) -> str:
        return f"{BACKPOINTER}{self._store().identity().id}/{self.name}"

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """Replace the LV's record copy (tags) in one `lvchange`. The store stays the
        truth: a copy that cannot be written only costs `records rebuild` that LV."""
        try:
            with self._mu:
                old = self._tags.get(rec.volume)
            if old is None:
                old = self.lvm.lv_tags(rec.volume).get(rec.volume, [])
            new = encode_copy(rec)
            args = [
                a
                for t in old
                if t.startswith(COPY_PREFIX) and t not in new
                for a in ("--deltag", t)
            ]
            args += [a for t in new if t not in old for a in ("--addtag", t)]
            if args:
                self.lvm.run("lvchange", *args, f"{self.vg}/{rec.volume}", lv=rec.volume)
            keep = [t for t in old if not t.startswith(COPY_PREFIX)]
            self._note(rec.volume, True, keep + new)
        except (OSError, ReconcileError) as e:
            log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))

    def record_copies(self) -> RecordCopies:
        tags = self.lvm.lv_tags()
        return RecordCopies.read(self.name, sorted(tags), lambda lv: _copy_in(tags[lv]))

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Nothing to renew: an LV's tags are in the VG's metadata, which only root on
        this host writes, so every copy there is already in a trusted place."""
        return 0

    # -- making volumes ---------------------------------------------------------------

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        return entries.entry_for(self.images, spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        return None  # a disk is a copy of its entry: it depends on none once made

    def _lvcreate(self, name: str, size: int, *, contiguous: bool = False) -> None:
        check_lv_name(name)
        act = ["-ay"] if self.lvm_config.activate else ["-an"]
        if contiguous:
            act += ["--alloc", "contiguous"]
        tag = self._backpointer()
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
        self._note(name, True, [tag])

    def _tmp_dir(self) -> Path:
        """Beside the records database: temporary files of fetches and templates."""
        d = Path(self._store().identity().location).parent / "lvm-tmp" / self.name
        private_dir(d)  # and lvm-tmp: 0700 whatever the umask (reconciler/util/statedir.py)
        return d

    @contextmanager
    def _tmp_file(self, name: str, size: int = 0) -> Iterator[int]:
        """A fresh temporary file, made exclusively (the caller holds `name`'s lock)."""
        path = self._tmp_dir() / (TEMP_PREFIX + name)
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

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        """A disk with an image's content: fetched and checked once into a cache entry LV,
        then copied into a new LV."""
        check_lv_name(rec.volume)
        self.cache.from_image(rec, image_id, self._from_entry)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        """A blank disk (its extents zeroed), or swap or an empty filesystem made once per
        (kind, size, label) as a cache entry and copied like an image."""
        if template.template is TemplateKind.BLANK:
            self._lvcreate(rec.volume, rec.virtual_size)
            faults.point("volume.created")
            with self.data.open(rec.volume, None, write=True) as pieces:
                zero(pieces)  # never a previous tenant's bytes, whatever volumeClear says
            faults.point("volume.filled")
            return
        check_lv_name(rec.volume)
        self.cache.from_template(rec, template, self._from_entry)

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """A new LV for disk `rec` holding ready cache entry `entry`'s bytes (the caller
        holds the entry shared)."""
        check_lv_name(entry)
        self._lvcreate(rec.volume, rec.virtual_size)
        faults.point("volume.created")
        # All of the new LV (LVM rounds its size up to whole extents): the entry's bytes,
        # then zeros, so no earlier tenant's byte is left in it. Opening the entry is what
        # finds it missing (its record is ready, so it almost never is: one LVM call fewer
        # per disk than asking first).
        sizes = {entry: cached.virtual_size, rec.volume: None}
        try:
            with self.data.open_many(sizes, write=True) as maps:
                raw_copy(
                    PiecesSource(maps[entry], f"{self.name}/{entry}", cached.virtual_size),
                    PiecesSink(maps[rec.volume], f"{self.name}/{rec.volume}"),
                )
        except LvmError:
            if self.volume_exists(entry):
                raise
            self.delete_volume(rec.volume)  # made just now, from nothing yet
            raise entries.EntryGone from None
        faults.point("volume.filled")

    # -- cache entries (the flows are entries.Cache's) --------------------------------

    def _fill_entry(self, entry: str, src_fd: int, size: int) -> None:
        """Make the entry's LV and copy a checked raw file's bytes into it."""
        self._lvcreate(entry, size)
        faults.point("cache.volume.created")
        with self.data.open(entry, None, write=True) as pieces:
            raw_copy(FileSource(src_fd, entry, size), PiecesSink(pieces, f"{self.name}/{entry}"))
        faults.point("cache.volume.filled")

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry LV, unless a ready one
        exists. The checks are those of every pool (reconciler/drivers/ingest/images.py)."""
        check_lv_name(entry)  # before its record is written

        def store(fd: int, checked: Checked) -> None:
            fmt = self.images[image_id].format.value
            size = checked.virtual_size
            if fmt == "raw":
                self._fill_entry(entry, fd, size)
                return
            from reconciler.drivers.ingest.check import run_limited

            with self._tmp_file(entry + ".raw", size) as raw_fd:
                run_limited(
                    convert_argv(fmt, "raw", fd_path(fd), fd_path(raw_fd)),
                    fds=(fd, raw_fd),
                    what=f"convert {image_id} to raw",
                )
                self._fill_entry(entry, raw_fd, size)

        self.cache.make_image(entry, image_id, disk_size, store)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        """Make the template cache entry unless a ready one exists: mkfs on a temporary
        file of the template's size, copied into the entry's LV."""
        check_lv_name(entry)  # before its record is written

        def fill() -> None:
            with self._tmp_file(entry, size) as fd:
                run(
                    mkfs_argv(kind, label, fd_path(fd)),
                    fds=(fd,),
                    what=f"make {kind} template {entry}",
                )
                self._fill_entry(entry, fd, size)

        self.cache.make_template(entry, kind, size, label, fill)

    def _store(self) -> RecordStore:
        if self.store is None:
            raise AssertionError("this driver was made without a record store")
        return self.store

    # -- changing and removing volumes ------------------------------------------------

    def _lv_size(self, lv: str) -> int:
        rows = self.lvm.report("lvs", "lv_name,lv_size", f"{self.vg}/{lv}", lv=lv)
        return int(rows[0]["lv_size"])

    def resize(self, rec: DiskRecord, size: int) -> None:
        """Grow an LV (`lvextend`; a raw disk needs nothing else). Its format is the
        record's, never read from the LV; an LV already that large (LVM rounds sizes up
        to whole extents, or an interrupted run grew it) is left as it is."""
        if rec.format is not DiskFormat.RAW:
            raise ReconcileError(f"{rec.volume}: an lvm disk is raw, not {rec.format}")
        if self._lv_size(rec.volume) < size:
            self.lvm.run("lvextend", "-L", f"{size}b", f"{self.vg}/{rec.volume}", lv=rec.volume)
        faults.point("volume.resized")

    def delete_volume(self, volume: str) -> None:
        """Clear the LV's extents (volumeClear), then remove it; a missing one is fine."""
        if not self.volume_exists(volume):
            return
        cfg = self.lvm_config
        if cfg.volume_clear == "zero":
            with self.data.open(volume, None, write=True) as pieces:
                zero(pieces, cfg.volume_clear_size or None)
            faults.point("volume.cleared")
        self.lvm.run("lvremove", "-y", f"{self.vg}/{volume}", lv=volume)
        self._note(volume, False)
        faults.point("volume.deleted")

    def sweep_temp(self) -> list[str]:
        """Remove temporary files an interrupted run left, unless their lock is held."""
        removed: list[str] = []
        root = self._tmp_dir()
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
        mine = self._backpointer()
        for lv, tags in sorted(self.lvm.lv_tags().items()):
            if not lv.startswith(LV_TEMP_PREFIX) or mine not in tags:
                continue
            with self.locks().attempt(lv[len(LV_TEMP_PREFIX) :]) as taken:
                if taken:
                    self.delete_volume(lv)
                    removed.append(lv)
        return removed

    # -- adoption and importing files ---------------------------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        """An existing LV is adopted as raw, its size the LV's (LVM's metadata, never its
        bytes); its first bytes are read through LvData only to report a header that
        announces another format (a guest may have written it; it is never followed)."""
        if fmt is not DiskFormat.RAW:
            raise ReconcileError(
                f"pool {self.name} is an lvm pool: its disks are raw LVs, so "
                f"{volume} cannot be adopted as {fmt}"
            )
        size = self._lv_size(volume)
        with self.data.open(volume, min(HEADER_BYTES, size), write=False) as pieces:
            header = header_format(pieces_reader(pieces)(0, min(HEADER_BYTES, size)))
        return Inspected(size, None, header)

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """A host file's bytes, unchanged, into a new LV (flows/takein.py: filled under the
        temporary name `_tmp_VOLUME`, zeros past the file's end to the LV's, which LVM
        rounds up to whole extents, synced, then renamed). The caller holds the volume's
        lock (temporary LVs are swept under it)."""
        take_in(self, path, volume, keep_source=keep_source)

    def temp_name(self, volume: str) -> str:
        return LV_TEMP_PREFIX + volume

    def remove_temp(self, temp: str) -> None:
        self.delete_volume(temp)  # cleared first, as any LV (volumeClear)

    def volume_at(self, path: str) -> str | None:
        """The LV at /dev/VG/LV of this pool's VG; None for any other path."""
        where = os.path.normpath(path)
        if os.path.dirname(where) != f"/dev/{self.vg}":
            return None
        return os.path.basename(where) or None

    def point_overlay_at(self, path: str, entry: str) -> None:
        raise ReconcileError(
            f"pool {self.name} is an lvm pool: its disks are raw LVs, so a qcow2 overlay "
            f"({path}) cannot be taken into it"
        )

    # -- migrations ---------------------------------------------------------------------

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        """The VG's free bytes, each managed LV's size as what it occupies (an LV holds all
        its extents), and raw LVs as the one layout. A copy into the VG takes its whole
        size in extents whatever its data, which `thick_unit` tells the planner."""
        try:
            (vg,) = self.lvm.report("vgs", "vg_free,vg_extent_size", self.vg)
            sizes = {
                r["lv_name"]: int(r["lv_size"])
                for r in self.lvm.report("lvs", "lv_name,lv_size", self.vg)
            }
            free, extent = int(vg["vg_free"]), int(vg["vg_extent_size"])
        except (LvmError, ValueError, KeyError) as e:
            raise PoolError(f"{self.lvm.where()}: its free space is unknown ({e})") from None
        allocated = {v: sizes[v] for v in volumes if v in sizes}
        return MigrationFacts(free, allocated, LAYOUTS, thick_unit=extent)

    def _check_layout(self, volume: str, backend: Backend, fmt: DiskFormat) -> None:
        if (backend, fmt) != (Backend.LVM, DiskFormat.RAW):
            raise ReconcileError(
                f"pool {self.name} holds raw lvm disks only; {volume} cannot be {backend}/{fmt}"
            )

    def prepare_copy(self, volume: str, backend: Backend, fmt: DiskFormat, size: int) -> None:
        """A new LV (the pool's usual flags and back-pointer tag) for a copy: what lies past
        `size` (LVM rounds up to whole extents) is zeroed, so no earlier tenant's byte is
        in it; the first `size` bytes are the copy's to write, zeros included."""
        self._check_layout(volume, backend, fmt)
        # Without activation qemu-img reaches an LV only as one range of its PV: the copy
        # is allocated in one (LVM refuses if the VG has no such run of free extents).
        self._lvcreate(volume, size, contiguous=not self.lvm_config.activate)
        faults.point("volume.created")
        with self.data.open(volume, None, write=True) as pieces:
            tail = _beyond(pieces, size)
            if tail:
                zero(tail)

    def _recorded_size(self, volume: str) -> int | None:
        rec = self._store().get(self.name, volume) if self.store is not None else None
        return None if rec is None else rec.virtual_size

    @contextmanager
    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> Iterator[QemuImage]:
        """The LV as qemu-img's raw driver over a host_device, with `offset` and `size`: the
        recorded size of a disk (the LV may be larger, whole extents), else the whole LV.
        With activation that is /dev/VG/LV (offset 0); without it, the LV's one segment on
        its PV (the test mode). An LV of several segments has no single range qemu can
        address without device-mapper: refused (raw to raw copies do not need qemu-img)."""
        if fmt is not DiskFormat.RAW or backing is not None:
            raise ReconcileError(f"{self.name}/{volume}: an lvm disk is raw with no backing")
        with self.data.open(volume, self._recorded_size(volume), write=write) as pieces:
            if len(pieces) != 1:
                raise ReconcileError(
                    f"{self.name}/{volume} lies in {len(pieces)} segments of its PVs and this "
                    "host cannot activate it (no device-mapper), so qemu-img cannot address it "
                    "as one device; it is not copied by qemu-img"
                )
            (p,) = pieces
            node: dict[str, Any] = {"driver": "host_device", "filename": fd_path(p.fd)}
            if not self.lvm_config.activate:
                # The file node is the whole PV, which every LV of the VG shares: a qemu
                # lock on it would be a lock on the VG's other disks.
                node["locking"] = "off"
            raw = {"driver": "raw", "offset": p.offset, "size": p.length, "file": node}
            yield QemuImage("raw", "json:" + json.dumps(raw, sort_keys=True), (p.fd,))

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        """Raw to raw (flows.copy) from a pool whose bytes are on this host (a raw file
        without backing, or an LV of another or this pool), then zeros to the LV's end;
        nothing is read as a format. A qcow2 or ploop source (a format to read) and an
        image over the network are qemu-img's."""
        self._check_layout(to.volume, to.backend, to.format)
        if not source.raw_readable(rec):
            return False
        if rec.virtual_size > to.virtual_size:
            raise ReconcileError(f"{rec.volume} is larger than its copy; not copied")
        if source.access is Access.REMOTE:
            return False
        if source is self:  # both LVs in one pair of reports
            n = rec.virtual_size
            with self.data.open_many({rec.volume: n, to.volume: None}, write=True) as m:
                raw_copy(
                    PiecesSource(m[rec.volume], f"{self.name}/{rec.volume}", n),
                    PiecesSink(m[to.volume], f"{self.name}/{to.volume}"),
                )
            return True
        with source.reader(rec.volume, rec.virtual_size) as src, self.writer(to.volume) as dst:
            raw_copy(src, dst, room=to.virtual_size)
        return True

    # -- raw bytes (drivers/api.py's Volumes) -------------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        self._lvcreate(volume, max(size, 512))  # LVM makes no empty LV

    def raw_readable(self, rec: DiskRecord) -> bool:
        return rec.format is DiskFormat.RAW and rec.backing is None  # always, in an lvm pool

    @contextmanager
    def reader(self, volume: str, size: int | None = None) -> Iterator[PiecesSource]:
        with self.data.open(volume, size, write=False) as pieces:
            yield PiecesSource(pieces, f"{self.name}/{volume}", size)

    @contextmanager
    def writer(self, volume: str) -> Iterator[PiecesSink]:
        """All of the LV (whole extents), to be written whole."""
        with self.data.open(volume, None, write=True) as pieces:
            yield PiecesSink(pieces, f"{self.name}/{volume}")

    def finish_copy(self, volume: str) -> None:
        """fsync the device(s) the LV's bytes are on: /dev/VG/LV, or its PV(s)."""
        with self.data.open(volume, None, write=True) as pieces:
            for fd in {p.fd for p in pieces}:
                os.fsync(fd)

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        """`lvrename` in the VG (one metadata commit). It never takes an existing name
        (VolumeExists); with `replace`, an existing `new` is cleared and removed first
        (LVM has no rename over an LV): a crash between the two leaves `old` holding the
        data under its name, and the caller (a `switched` migration) renames it next run."""
        check_lv_name(new)
        if replace and self.volume_exists(new):
            self.delete_volume(new)
        rc, out, err = self.lvm.execute("lvrename", self.vg, old, new, lv=old)
        if rc != 0:
            msg = message(err, out)
            if "already exists" in msg:
                raise VolumeExists(
                    f"volume {new} exists in pool {self.name}; {old} is not renamed over it"
                )
            raise LvmError(f"lvrename failed in {self.lvm.where(old)}: {msg}")
        self._note(old, False)
        self._note(new, True)


def _copy_in(tags: Sequence[str]) -> DiskRecord:
    """The record copy an LV's tags carry; NoCopy if none, or a damaged one."""
    try:
        rec = decode_copy(tags)
    except (ValueError, zlib.error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoCopy(f"its record copy is unreadable ({why})") from None
    if rec is None:
        raise NoCopy("no record copy")
    return rec


def _beyond(pieces: Sequence[Piece], size: int) -> list[Piece]:
    """The parts of the pieces past their first `size` bytes."""
    out: list[Piece] = []
    base = 0
    for p in pieces:
        skip = max(0, min(p.length, size - base))
        if skip < p.length:
            out.append(Piece(p.fd, p.offset + skip, p.length - skip))
        base += p.length
    return out
