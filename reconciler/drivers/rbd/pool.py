"""Ceph RBD pools serving the `rbd` backend: disks, their records and the image cache all
live in one Ceph pool that many hosts share (DESIGN invariants 2, 5 and 6).

Where things are (Ceph pool P of the config's `ceph` section; N its `namespace`):

- Disks: RBD images `<instance>_<disk>` in P's default namespace, where libvirt's rbd pool
  (the config's `libvirtPool`, on the same Ceph pool) and domains see them. Every disk is a
  copy-on-write clone (clone v2: `rbd_default_clone_format = 2`, no protected snapshot) of
  a cache entry, grown to its size, or a plain image (blank). A disk's format is raw, as
  recorded; nothing is ever read from a disk's bytes.
- Cache entries: RBD images `_cache_image-…` and `_cache_template-…` (names as for file
  pools), each with one snapshot `base` that the disks are cloned from. An entry is never
  a clone, so every disk has clone depth 1 by construction and nothing ever needs
  flattening. The one source that could break that, a catalog `rbd://` location in this
  cluster whose image is itself a clone, is refused (its data would be two parents away;
  the operator flattens it or serves it another way), never flattened by us.
- Records: in RADOS namespace N (reconciler/drivers/rbd/records.py). A disk's record is
  kept by its host; a cache entry's record is shared by every host (each change a
  compare-and-swap on its generation). An entry's record holds its references (one omap
  key per disk, added before the clone is made, dropped after the disk's image is
  removed), which `references()` counts (RbdRecordStore).
- Locks: leases on RADOS objects in N (drivers/rados_locks.py), so two hosts never import
  one image twice and never remove an entry a clone is being made from.
- Each image carries a copy of its record in its RBD metadata (`reconciler.record`: the
  host writes it; a guest writes only the image's data), the back-pointer to its record.
  Where it names another record than the one acting on it, delete and resize refuse and
  say so: a disagreement is reported, never repaired by deleting. Who can write it: any
  client with the Ceph pool's caps (a guest cannot: librbd gives it the image's data
  only). Those are the very clients that can write the RADOS records, which are the
  truth here, so the copy is not sealed (a MAC under a key shared by the hosts would
  stop no one the store itself does not); it is checked as input like every record
  (schema/recordcheck.py), and rebuild restores only what cannot make the next plan
  destroy something (reconciler/commands/rebuild.py).
- Temporary images `.reconciler-tmp-<entry>` (an import in progress) are written under the
  entry's lock and removed by `sweep_temp` when nobody holds it; no disk is named so.

Import: the image is fetched into an unnamed local file (O_TMPFILE: a crash leaves
nothing) and checked exactly as for file pools (sha256, oslo's format inspector, `qemu-img
info -f` under limits), converted to raw with `qemu-img convert -f FMT -O raw` into another
unnamed file if it is not raw, then written into the temporary image with python-rbd
(skipping zero runs, so the entry stays sparse), snapshotted and renamed to the entry's
name. python-rbd rather than qemu-img's rbd driver: the bytes written are exactly the
checked raw bytes, with no second client, conf or key on a command line.

Order of steps and what a crash between them leaves (each found and finished or removed by
the next run): entry record `creating` -> temporary image (swept) -> snapshot -> renamed to
the entry (a `creating` entry with an image: removed and made again) -> record `ready`.
Disk: record `creating` (executor) -> reference added (an unused reference is pruned by
`cache gc` when its disk has no record and no image) -> clone -> grow -> record `ready`.
Delete: record `deleting` -> image removed -> reference dropped -> record removed.

Migrations (apply/steps/migrate.py) in and out, adopt and import: the one layout is rbd/raw.
Debian's qemu-img here has no rbd block driver (it is the qemu-block-extra package, which
is not installed; it would also take the conf and client on its command line and bound
nothing by opTimeout), so qemu-img never opens an image. Into this pool, native_copy
always does the work, with python-rbd into a plain new image (prepare_copy), zero chunks
skipped: from another rbd pool image to image, from a file pool's raw file its data
extents, from anything else (a qcow2, an overlay to flatten, an LV) the raw bytes
`qemu-img convert -f FMT -O raw` makes of it in an unnamed local file (O_TMPFILE). Out of
this pool, qemu_image() gives qemu-img a raw export of the image (its parent's data
included, so a clone's copy is flat) in an unnamed local file; migrate.py's compare reads
the copy the same way, so the verification reads both sides back from where they are.
The cost is local scratch space (TMPDIR, default /var/tmp) for the data of one image (two
while a copy out of the pool is compared), never a named file: a crash leaves nothing to
sweep. Free space is `ceph df`'s MAX AVAIL where a ceph-mgr makes it real; without one
every figure is zero, so it is unknown and the plan makes no space check. Adopting takes
an existing image that is not a clone as raw at RBD's size; importing a file fills a
temporary image, renamed when whole.

Pool ownership: many hosts share the pool by design, so the pool is claimed by the RADOS
store (the `store` object's id, one per namespace), not by a host: an object
`reconciler.owner` in P's default namespace names the store that manages the images.
Every host using that namespace passes; a second namespace (another store) pointed at the
same Ceph pool, or a namespace recreated empty, is refused as ManagedElsewhere until an
operator runs `records rebuild`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import convert_argv, fd_path, mkfs_argv
from reconciler.drivers.flows.takein import take_in
from reconciler.drivers.host import ownership
from reconciler.drivers.host.domains import NO_DOMAIN_DRIVER, Attachments, all_domains
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import ConflictError, RecordStore, StoreError, StoreIdentity
from reconciler.drivers.ingest.headers import HEADER_BYTES, header_format
from reconciler.drivers.rbd.leases import LeaseLocks, LockBusy
from reconciler.drivers.rbd.namespace import client_conf
from reconciler.drivers.rbd.outage import Outage
from reconciler.drivers.rbd.records import RadosRecordStore
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.naming import CACHE_PREFIX, TEMP_PREFIX
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord, Migration, RecordKind
from reconciler.schema.bounded import check_json, load_json
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.config import ImageConfig, PoolConfig
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked

log = get_logger(__name__)

SNAP = "base"  # the snapshot of a cache entry that disks are cloned from
RECORD_KEY = "reconciler.record"  # RBD metadata: the image's copy of its record
OWNER_OBJECT = "reconciler.owner"  # in the pool's default namespace, beside the images
WATCH_WAIT = 45.0  # seconds to wait for a dead client's watch on an image to expire
LAYOUTS = frozenset({"rbd/raw"})  # what a migration copies out of and into an rbd pool
RBD_LOCATION = re.compile(r"^rbd://([0-9a-fA-F-]{36})/([^/@]+)/([^/@]+)/([^/@]+)$")


def _mods() -> tuple[Any, Any]:
    """Debian's rados and rbd modules (untyped, a system dependency): imported only here
    and only when an rbd pool is used. Missing (a venv that does not see the system's
    packages): the pool's error, as for an unreachable pool; the other pools go on."""
    try:
        import rados
        import rbd
    except ImportError as e:
        from reconciler.drivers.ingest.fetch import MISSING_BINDINGS

        raise PoolError(MISSING_BINDINGS.format(e=e)) from None
    return rados, rbd


def parse_rbd_location(location: str) -> tuple[str, str, str, str] | None:
    """(fsid, pool, image, snapshot) of an rbd:// catalog location, else None."""
    m = RBD_LOCATION.match(location)
    if m is None:
        return None
    return (m[1].lower(), m[2], m[3], m[4])


def conf_fsid(conffile: str) -> str | None:
    """The fsid a ceph.conf names in its [global] section (read without connecting)."""
    section = ""
    try:
        with open(conffile) as f:
            for line in f:
                s = line.strip()
                if s.startswith("["):
                    section = s.strip("[]").strip()
                elif section == "global" and "=" in s:
                    k, v = s.split("=", 1)
                    if k.strip().replace("_", " ") == "fsid":
                        return v.strip().lower()
    except OSError:
        return None
    return None


class RbdRecordStore(RadosRecordStore):
    """The RADOS store of an rbd pool, whose cache entries count their references in
    their own records (ref keys, drivers/rados_records.py) rather than by reading every
    host's records."""

    exists: Callable[[str], bool] = staticmethod(lambda volume: True)

    def references(self, pool: str, volume: str) -> int:
        """The disks of every host that reference cache entry pool/volume. A reference
        whose disk has neither a record nor an image (a crash between adding it and the
        clone, or between removing the image and dropping it) is dropped here: a create
        writes its disk's record before it adds the reference, so none in flight is."""
        refs = self.reference_names(pool, volume) or {}
        n = 0
        for ref in refs:
            if self.get(pool, ref) is None and not self.exists(ref):
                self.drop_reference(pool, volume, ref)
                continue
            n += 1
        return n


class _Client:
    """The driver's one rados.Rados client and its ioctxs, connected on first use."""

    def __init__(self, driver: RbdPoolDriver) -> None:
        rados, _ = _mods()
        ceph = driver.ceph
        self.where = f"Ceph pool {ceph.pool} (pool {driver.name})"
        conf = {**client_conf(ceph.op_timeout), "rbd_default_clone_format": "2"}
        try:
            self.cluster = rados.Rados(conffile=ceph.conf, name=ceph.client, conf=conf)
            self.cluster.connect()
        except rados.Error as e:
            msg = (
                f"pool {driver.name}: cannot connect to Ceph (conf {ceph.conf}) as "
                f"{ceph.client}: {e}; check the monitors are up (`ceph -s`) and the conf and "
                "keyring, then run again"
            )
            # Every later call would wait client_mount_timeout again for the same answer.
            driver.outage.note(msg)
            raise PoolError(msg) from None
        try:
            self.fsid: str = str(self.cluster.get_fsid()).lower()
            self.io = self.cluster.open_ioctx(ceph.pool)  # images: the default namespace
            self.ns = self.cluster.open_ioctx(ceph.pool)  # locks
            self.ns.set_namespace(ceph.namespace)
        except rados.Error as e:
            self.cluster.shutdown()
            raise PoolError(f"pool {driver.name}: cannot open Ceph pool {ceph.pool}: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.io.close()
            self.ns.close()
        self.cluster.shutdown()


class RbdPoolDriver:
    """A driver bound to one configured rbd pool (see the module docstring)."""

    access = Access.REMOTE

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
        host: str | None = None,
        heartbeat_expiry: float = 300.0,
    ) -> None:
        assert config.ceph is not None  # the config's validator requires it for rbd
        self.heartbeat_expiry = heartbeat_expiry  # ownership.heartbeatExpiry
        self.name = name
        self.config = config
        self.ceph = config.ceph
        self.conns = conns
        self.offline = store is None  # planning from a file: never connect
        self.host = host or (store.identity().host if store is not None else socket.gethostname())
        self.images = dict(images or {})
        self._client: _Client | None = None
        self._records: RbdRecordStore | None = None
        self._locks: LeaseLocks | None = None
        self._setup = threading.Lock()
        self._gone: set[str] = set()  # images removed under a lock still held
        # After a timeout, this client's calls fail at once for opTimeout seconds, naming
        # the first failure: one deadline per step (drivers/ceph_outage.py).
        self.outage = Outage(self.ceph.op_timeout)
        self.where = f"Ceph pool {self.ceph.pool}"
        self.cache = entries.Cache(
            self,
            Backend.RBD,
            store=self.record_store,
            remove=self._remove_entry,
            scratch=lambda entry: _scratch(),
        )

    # -- the cluster --------------------------------------------------------------------

    def client(self) -> _Client:
        with self._setup:
            if self._client is None:
                self.outage.check()
                self._client = _Client(self)
            return self._client

    def _io(self) -> Any:
        return self.client().io

    def record_store(self) -> RbdRecordStore:
        """This pool's records: in the Ceph pool's RADOS namespace, shared by its hosts."""
        try:
            c = self.client()
        except PoolError as e:
            raise StoreError(str(e)) from None
        with self._setup:
            if self._records is None:
                pool = self.ceph.pool
                # The same client as the images': a host fenced by `ceph osd blocklist`
                # (the store's heartbeats name this client's address) can change neither.
                store = RbdRecordStore(
                    lambda: c.cluster.open_ioctx(pool),
                    pool,
                    cluster=c.cluster,
                    host=self.host,
                    namespace=self.ceph.namespace,
                    op_timeout=self.ceph.op_timeout,
                    heartbeat_expiry=self.heartbeat_expiry,
                    outage=self.outage,
                )
                store.exists = self.volume_exists
                self._records = store
            return self._records

    def locks(self) -> LeaseLocks:
        c = self.client()
        with self._setup:
            if self._locks is None:
                self._locks = LeaseLocks(
                    c.ns,
                    f"{self.where} namespace {self.ceph.namespace}",
                    self.host,
                    outage=self.outage,
                )
            return self._locks

    def close(self) -> None:
        if self._locks is not None:
            self._locks.close()
        if self._records is not None:
            self._records.close()
        if self._client is not None:
            self._client.close()
        self._client = self._records = self._locks = None

    @contextmanager
    def _ceph(self, doing: str) -> Iterator[None]:
        """Turn the bindings' errors into ones naming the pool and what was being done."""
        rados, rbd = _mods()
        self.outage.check()
        try:
            yield
        except (rados.Error, rbd.Error) as e:
            code = getattr(e, "errno", None)
            if isinstance(e, rados.TimedOut | rbd.Timeout) or code in (
                errno.ETIMEDOUT,
                -errno.ETIMEDOUT,
            ):
                msg = (
                    f"pool {self.name}: {doing} timed out after {self.ceph.op_timeout:g} s "
                    f"(opTimeout) in {self.where}; check the OSDs (`ceph -s`), then run again"
                )
                self.outage.note(msg)
                raise PoolError(msg) from None
            raise ReconcileError(f"pool {self.name}: {doing} failed in {self.where}: {e}") from None

    @contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """A lease on `name`; its (empty) lock object goes with the lock when the image
        was removed while it was held exclusively, so deleted disks leave nothing behind."""
        with self.locks().hold(name, shared=shared) as h:
            yield
            with self._setup:
                if name in self._gone:
                    self._gone.discard(name)
                    h.remove = not shared

    # -- observing --------------------------------------------------------------------

    def as_managing(self) -> RbdPoolDriver:
        return self

    def list_volumes(self) -> frozenset[str]:
        _, rbd = _mods()
        with self._ceph("listing images"):
            return frozenset(str(n) for n in rbd.RBD().list(self._io()))

    def observe(self) -> ObservedPool:
        """The pool's images by name and which domains use them; never raises."""
        if self.offline:
            return ObservedPool(self.name, None, "not observed (planning from a file)")
        try:
            self.check_owner()
            volumes = self.list_volumes()
            att = self.attachments()
        except ownership.ManagedElsewhere as e:
            return ObservedPool(self.name, None, str(e), managed_elsewhere=True)
        except ReconcileError as e:
            return ObservedPool(self.name, None, str(e))
        return ObservedPool(
            self.name, volumes, None, {}, att.defined, att.running, att.known, att.why_unknown
        )

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        return pool  # reading a disk's first bytes from Ceph buys nothing: nothing is probed

    def volume_exists(self, volume: str) -> bool:
        """Whether anything of the image exists: its entry in `rbd_directory` (what listing
        reads) or its `rbd_id.` object, in one read each and no image open. Either alone is
        what an interrupted RBD.remove leaves, and it counts as existing until removed."""
        rados, _ = _mods()
        io = self._io()
        with self._ceph(f"looking up image {volume}"):
            try:
                with rados.ReadOpCtx() as rop:
                    it, _ = io.get_omap_vals_by_keys(rop, (f"name_{volume}",))
                    io.operate_read_op(rop, "rbd_directory")
                    if dict(it):
                        return True
            except rados.ObjectNotFound:
                pass
            try:
                io.stat(f"rbd_id.{volume}")
            except rados.ObjectNotFound:
                return False
        return True

    def attachments(self) -> Attachments:
        att: Attachments = self.conns.call(
            self.config.uri, f"list domains (pool {self.name})", self._attachments
        )
        return att

    def _attachments(self, conn: Any) -> Attachments:
        import libvirt

        domains = all_domains(conn)
        if domains is None:
            return NO_DOMAIN_DRIVER
        defined: dict[str, set[str]] = {}
        running: dict[str, set[str]] = {}
        for dom in domains:
            dname = dom.name()
            active = bool(dom.isActive())
            xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
            if active:
                xmls.append(dom.XMLDesc(0))
            for xml in xmls:
                for vol in self._domain_volumes(xml):
                    defined.setdefault(vol, set()).add(dname)
                    if active:
                        running.setdefault(vol, set()).add(dname)
        return Attachments(
            True,
            {k: tuple(sorted(v)) for k, v in defined.items()},
            {k: tuple(sorted(v)) for k, v in running.items()},
        )

    def _domain_volumes(self, xml: str) -> set[str]:
        """Images of this Ceph pool a domain's disks use: an rbd network disk naming
        `POOL/IMAGE` (or `POOL/NAMESPACE/IMAGE` in the default namespace only, which has
        no middle part), or a volume of the libvirt pool."""
        out: set[str] = set()
        for disk in ET.fromstring(xml).iter("disk"):
            for src in disk.iter("source"):
                if src.get("pool") == self.config.libvirt_pool and src.get("volume"):
                    out.add(src.get("volume", ""))
                if src.get("protocol") == "rbd":
                    name = src.get("name", "")
                    parts = name.split("/")
                    if len(parts) == 2 and parts[0] == self.ceph.pool:
                        out.add(parts[1].split("@", 1)[0])
        return out

    # -- ownership (per RADOS store, not per host) --------------------------------------

    def _identity(self) -> StoreIdentity:
        return self.record_store().identity()

    def owner(self) -> ownership.Owner | None:
        rados, _ = _mods()
        with self._ceph("reading the pool's owner"):
            try:
                raw = self._io().read(OWNER_OBJECT, 1 << 16, 0)
            except rados.ObjectNotFound:
                return None
        try:
            doc = load_json(raw, what=OWNER_OBJECT)
            return ownership.Owner(
                str(doc["store"]), str(doc["location"]), str(doc["host"]), str(doc["since"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise PoolError(
                f"pool {self.name}: object {OWNER_OBJECT} in {self.where} is damaged ({e}); "
                f"restore it, or run 'reconcile records rebuild {self.name}'"
            ) from None

    def _refusal(self, owner: ownership.Owner, ident: StoreIdentity) -> str | None:
        if owner.store == ident.id:
            return None  # any host of the same store
        return (
            f"pool {self.name}: {self.where} is managed by record store {owner.store} "
            f"({owner.location}, claimed by host {owner.host} since {owner.since}), not by "
            f"this config's store {ident.id} ({ident.location}); its images are left alone. "
            "Point this config at that namespace, or, if that store was lost, rebuild: "
            f"reconcile records rebuild {self.name}"
        )

    def check_owner(self) -> None:
        owner = self.owner()
        if owner is not None:
            why = self._refusal(owner, self._identity())
            if why is not None:
                raise ownership.ManagedElsewhere(why)

    def claim(self) -> None:
        rados, _ = _mods()
        ident = self._identity()
        if self.owner() is None:
            data = ownership.Owner.of(ident).to_json().encode()
            with self._ceph("claiming the pool"), rados.WriteOpCtx() as op:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                op.write_full(data)
                with contextlib.suppress(rados.ObjectExists):  # another host won: check it
                    self._io().operate_write_op(op, OWNER_OBJECT)
        self.check_owner()

    def take_over(self) -> None:
        data = ownership.Owner.of(self._identity()).to_json().encode()
        with self._ceph("taking over the pool"):
            self._io().write_full(OWNER_OBJECT, data)

    # -- record copies (RBD image metadata) ---------------------------------------------

    @contextmanager
    def _image(self, volume: str, *, read_only: bool = False) -> Iterator[Any]:
        _, rbd = _mods()
        with self._ceph(f"opening image {volume}"):
            img = rbd.Image(self._io(), volume, read_only=read_only)
        try:
            yield img
        finally:
            img.close()

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """The image's copy of its record, in its RBD metadata (the back-pointer)."""
        try:
            with self._image(rec.volume) as img, self._ceph(f"writing {rec.volume}'s record"):
                img.metadata_set(RECORD_KEY, rec.model_dump_json())
        except ReconcileError as e:
            log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))

    def _copy_of(self, img: Any, volume: str) -> DiskRecord | None:
        """The record copy an open image carries (None: none); a damaged one is an error."""
        try:
            raw = img.metadata_get(RECORD_KEY)
        except KeyError:
            return None
        try:
            return DiskRecord.model_validate_json(check_json(raw, what="the copy"))
        except ValueError as e:
            raise ReconcileError(
                f"pool {self.name}: image {volume}'s record copy is unreadable "
                f"({str(e).splitlines()[0]})"
            ) from None

    def _parent(self, img: Any, volume: str) -> str | None:
        """The image (in this pool's namespace) an open image is a clone of, if any."""
        _, rbd = _mods()
        with self._ceph(f"reading {volume}'s parent"):
            try:
                spec = img.get_parent_image_spec()
            except rbd.ImageNotFound:
                return None
        if spec["pool_name"] != self.ceph.pool or spec["pool_namespace"]:
            return None
        return str(spec["image_name"])

    def _own_copy(self, img: Any, volume: str) -> DiskRecord | None:
        """The image's own record copy: a clone starts with its parent's (the entry's), and
        until the clone's own is written that one says nothing about the clone."""
        with self._ceph(f"reading {volume}'s record copy"):
            copy = self._copy_of(img, volume)
        inherited = (
            copy is not None
            and copy.kind is RecordKind.CACHE
            and copy.volume != volume
            and copy.volume == self._parent(img, volume)
        )
        return None if inherited else copy

    def _check_copy(self, img: Any, volume: str, doing: str) -> None:
        """Refuse to act on an image whose record copy names another record."""
        copy = self._own_copy(img, volume)
        if copy is not None and (copy.pool, copy.volume) != (self.name, volume):
            raise ReconcileError(
                f"not {doing} {self.name}/{volume}: the image's record copy describes "
                f"{copy.pool}/{copy.volume} (instance {copy.instance or '-'}); record and image "
                "disagree, so it is reported and left as it is"
            )

    def record_copies(self) -> RecordCopies:
        names = sorted(n for n in self.list_volumes() if not n.startswith(TEMP_PREFIX))
        return RecordCopies.read(self.name, names, self._image_copy)

    def _image_copy(self, name: str) -> DiskRecord:
        try:
            with self._image(name, read_only=True) as img:
                copy = self._own_copy(img, name)
        except ReconcileError as e:
            raise NoCopy(str(e)) from None
        if copy is None:
            raise NoCopy("no record copy")
        return copy

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Nothing to renew: image metadata is as trusted as the RADOS store (see the
        module docstring), so a copy there is rewritten only as its record changes."""
        return 0

    # -- what a disk is made from -------------------------------------------------------

    def _same_cluster(self, fsid: str) -> bool:
        known = conf_fsid(self.ceph.conf)
        if known is None and not self.offline:
            known = self.client().fsid
        return known == fsid

    def _direct(self, image_id: str) -> tuple[str, str, str] | None:
        """(pool, image, snapshot) of a catalog image cloned from directly, else None."""
        image = self.images.get(image_id)
        if image is None:
            return None
        loc = parse_rbd_location(image.location)
        if loc is None or not self._same_cluster(loc[0]):
            return None
        return loc[1], loc[2], loc[3]

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        image = spec["source"].get("image")
        if image in self.images and self._direct(image) is not None:
            return None  # cloned from the catalog's own snapshot: no cache entry
        return entries.entry_for(self.images, spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """A clone depends on its entry for as long as it exists."""
        return self.entry_for(spec)

    # -- making disks -------------------------------------------------------------------

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        self._check_raw(rec)
        if template.template.value == "blank":
            self.create_empty(rec.volume, rec.virtual_size)
            faults.point("volume.created")
            return
        self.cache.from_template(rec, template, self._from_entry)

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        self._check_raw(rec)
        direct = self._direct(image_id)
        if direct is not None:
            self._clone_direct(rec, image_id, *direct)
            return
        self.cache.from_image(rec, image_id, self._from_entry)

    def _check_raw(self, rec: DiskRecord) -> None:
        if rec.format is not DiskFormat.RAW:
            raise ReconcileError(f"{rec.volume}: an rbd disk is raw, not {rec.format.value}")

    def _exists(self, volume: str) -> VolumeExists:
        return VolumeExists(
            f"image {volume} appeared in pool {self.name} from elsewhere; it is not ours and "
            "is left untouched"
        )

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """Clone disk `rec` of ready cache entry `entry`, its reference added first. The
        caller holds the entry's lock shared while the reference is added and the clone
        made, so an import or a removal (both exclusive) never runs under a clone."""
        records = self.record_store()
        try:
            records.add_reference(self.name, entry, rec.volume)
        except ConflictError:
            raise entries.EntryGone from None  # its record went meanwhile: made again
        faults.point("cache.reference.added")
        try:
            self._clone(self._io(), entry, SNAP, rec)
        except BaseException:
            with contextlib.suppress(ReconcileError):
                records.drop_reference(self.name, entry, rec.volume)
            raise

    def _clone(self, parent_io: Any, parent: str, snap: str, rec: DiskRecord) -> None:
        """Clone parent@snap (v2) as the disk and grow it to the disk's size."""
        _, rbd = _mods()
        with self._ceph(f"cloning {parent}@{snap} as {rec.volume}"):
            try:
                rbd.RBD().clone(parent_io, parent, snap, self._io(), rec.volume)
            except rbd.ImageExists:
                raise self._exists(rec.volume) from None
        faults.point("volume.cloned")
        with self._image(rec.volume) as img, self._ceph(f"growing {rec.volume}"):
            # A clone starts with its parent's metadata, so with the entry's record copy:
            # replace it by this disk's own (its intent) before anything else.
            img.metadata_set(RECORD_KEY, rec.model_dump_json())
            if img.size() < rec.virtual_size:
                img.resize(rec.virtual_size)
        faults.point("volume.created")

    def _clone_direct(
        self, rec: DiskRecord, image_id: str, pool: str, name: str, snap: str
    ) -> None:
        """Clone the catalog's own snapshot in this cluster: no download. Its image must
        be a raw image that is not itself a clone (depth 1), of at most the disk's size."""
        _, rbd = _mods()
        image = self.images[image_id]
        where = f"rbd://{pool}/{name}@{snap}"
        if image.format.value != "raw":
            raise ReconcileError(
                f"image {image_id}: an RBD snapshot is raw data; the catalog declares "
                f"{image.format.value}"
            )
        c = self.client()
        with self._ceph(f"opening {where}"):
            pio = c.cluster.open_ioctx(pool)
        try:
            with self._ceph(f"looking at {where}"):
                try:
                    src = rbd.Image(pio, name, snapshot=snap, read_only=True)
                except rbd.ImageNotFound:
                    raise ReconcileError(
                        f"image {image_id}: {where} does not exist in this cluster"
                    ) from None
                try:
                    size = src.size()
                    try:
                        src.get_parent_image_spec()
                        has_parent = True
                    except rbd.ImageNotFound:
                        has_parent = False
                finally:
                    src.close()
            if has_parent:
                raise ReconcileError(
                    f"image {image_id}: {where} is itself a clone; a disk cloned from it would "
                    "be two parents deep, and this reconciler keeps clone depth 1 and flattens "
                    "nothing it does not own. Flatten that image, or give the catalog a copy"
                )
            if size != image.size:
                raise ReconcileError(
                    f"image {image_id}: {where} holds {size} bytes, the catalog declares "
                    f"{image.size}"
                )
            if size > rec.virtual_size:
                raise ReconcileError(
                    f"image {image_id}: {where} ({size} bytes) is larger than the disk "
                    f"({rec.virtual_size})"
                )
            self._clone(pio, name, snap, rec)
        finally:
            pio.close()

    # -- cache entries ------------------------------------------------------------------

    def _remove_entry(self, entry: str) -> None:
        """Remove what a half-made or left-over entry consists of: its temporary image
        (an import cut short) and its image with its snapshot."""
        self.remove_temp(TEMP_PREFIX + entry)
        self._remove_entry_image(entry)

    def _new_temp(self, entry: str, size: int) -> str:
        """A fresh temporary image for an import into `entry` (under its lock)."""
        _, rbd = _mods()
        tmp = TEMP_PREFIX + entry
        self.remove_temp(tmp)  # left by an interrupted run
        with self._ceph(f"creating temporary image {tmp}"):
            rbd.RBD().create(self._io(), tmp, size, old_format=False)
        faults.point("cache.temp.created")
        return tmp

    def remove_temp(self, tmp: str) -> None:
        """Remove a temporary image (an import), its snapshots first; a missing one is fine."""
        _, rbd = _mods()
        with self._ceph(f"removing temporary image {tmp}"):
            try:
                with rbd.Image(self._io(), tmp) as img:
                    for s in list(img.list_snaps()):
                        img.remove_snap(s["name"])
            except rbd.ImageNotFound:
                pass  # gone, or half made by an interrupted create: removed below
        self._remove_image(tmp, "temporary image")

    def _remove_image(self, name: str, what: str) -> None:
        """RBD.remove, waiting while the image is busy: a client that died with the image
        open (a killed import or create) keeps its watch until the OSD times it out
        (osd_client_watch_timeout, 30 s by default). Still busy after WATCH_WAIT: an error
        naming the watchers (a running VM, on any host, watches its disk too)."""
        _, rbd = _mods()
        deadline = time.monotonic() + WATCH_WAIT
        while True:
            with self._ceph(f"removing {what} {name}"):
                try:
                    rbd.RBD().remove(self._io(), name)
                    return
                except rbd.ImageNotFound:
                    return
                except rbd.ImageHasSnapshots:
                    raise ReconcileError(
                        f"not removing {what} {self.name}/{name}: it still has a snapshot "
                        "(a clone in the trash holds it)"
                    ) from None
                except rbd.ImageBusy:
                    if time.monotonic() > deadline:
                        watchers = self._watchers(name)
                        raise ReconcileError(
                            f"pool {self.name}: {what} {name} is still open by client(s) "
                            f"{watchers or '?'} after {WATCH_WAIT:g} s: a VM using it, or a "
                            "reconciler that died with it open; it is removed on a later run"
                        ) from None
            log.info("image.busy", pool=self.name, image=name)
            time.sleep(0.5)  # the watch expires on the OSD: nothing here to wait on

    def _watchers(self, name: str) -> str:
        _, rbd = _mods()
        try:
            with rbd.Image(self._io(), name, read_only=True) as img:
                return ", ".join(str(w.get("addr")) for w in img.watchers_list())
        except (rbd.Error, AttributeError):
            return ""

    def _publish(self, tmp: str, entry: str) -> None:
        """Snapshot the filled temporary image and give it the entry's name."""
        _, rbd = _mods()
        with self._image(tmp) as img, self._ceph(f"snapshotting {tmp}"):
            img.create_snap(SNAP)
        faults.point("cache.snapshot.created")
        with self._ceph(f"renaming {tmp} to {entry}"):
            try:
                rbd.RBD().rename(self._io(), tmp, entry)
            except rbd.ImageExists:
                raise self._exists(entry) from None
        faults.point("cache.volume.filled")

    def _write_file(self, fd: int, tmp: str, length: int) -> None:
        """Copy `length` bytes of a local file into image `tmp`, skipping zero chunks."""
        with self.writer(tmp) as dst:
            raw_copy(FileSource(fd, tmp, length), dst)

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry, unless a ready one exists."""

        def store(fd: int, checked: Checked) -> None:
            fmt = self.images[image_id].format.value
            tmp = self._new_temp(entry, checked.virtual_size)
            if fmt == "raw":
                self._write_file(fd, tmp, checked.size)
            else:
                from reconciler.drivers.ingest.check import run_limited

                with _scratch() as raw_fd:
                    os.ftruncate(raw_fd, checked.virtual_size)
                    run_limited(
                        convert_argv(fmt, "raw", fd_path(fd), fd_path(raw_fd)),
                        fds=(fd, raw_fd),
                        what=f"convert {image_id} to raw",
                    )
                    self._write_file(raw_fd, tmp, checked.virtual_size)
            faults.point("cache.temp.filled")
            self._publish(tmp, entry)

        self.cache.make_image(entry, image_id, disk_size, store)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        """Make the template cache entry unless a ready one exists."""

        def fill() -> None:
            with _scratch() as fd:
                os.ftruncate(fd, size)
                run(
                    mkfs_argv(kind, label, fd_path(fd)),
                    fds=(fd,),
                    what=f"make {kind} template {entry}",
                )
                tmp = self._new_temp(entry, size)
                self._write_file(fd, tmp, size)
                faults.point("cache.temp.filled")
            self._publish(tmp, entry)

        self.cache.make_template(entry, kind, size, label, fill)

    # -- changing and removing ----------------------------------------------------------

    def resize(self, rec: DiskRecord, size: int) -> None:
        """Grow the image; never shrink it."""
        with self._image(rec.volume) as img:
            self._check_copy(img, rec.volume, "resizing")
            with self._ceph(f"growing {rec.volume}"):
                if img.size() > size:
                    raise ReconcileError(f"{rec.volume} is larger than {size} bytes; not shrunk")
                img.resize(size)
        faults.point("volume.resized")

    def _remove_entry_image(self, entry: str) -> None:
        """Remove an entry's image with its snapshot; refused while clones exist."""
        _, rbd = _mods()
        with self._ceph(f"removing cache entry image {entry}"):
            try:
                img = rbd.Image(self._io(), entry)
            except rbd.ImageNotFound:
                img = None  # gone, or half made: removed below
            try:
                if img is not None and list(img.list_children2()):
                    raise ReconcileError(
                        f"not removing cache entry {self.name}/{entry}: RBD reports clones of it"
                    )
                for s in list(img.list_snaps()) if img is not None else []:
                    img.remove_snap(s["name"])
            finally:
                if img is not None:
                    img.close()
        self._remove_image(entry, "cache entry")

    def delete_volume(self, volume: str) -> None:
        """Remove an image the caller has a record for (a missing one is fine), then drop
        the reference it held on its cache entry."""
        _, rbd = _mods()
        if volume.startswith(CACHE_PREFIX):
            self._remove_entry_image(volume)
            faults.point("volume.deleted")
            return
        parent: str | None = None
        with self._ceph(f"opening image {volume}"):
            try:
                img = rbd.Image(self._io(), volume)
            except rbd.ImageNotFound:
                img = None  # gone, or what an interrupted remove left: removed below
        if img is not None:
            try:
                self._check_copy(img, volume, "deleting")
                parent = self._parent(img, volume)
            finally:
                img.close()
        self._remove_image(volume, "image")
        with self._setup:
            self._gone.add(volume)
        faults.point("volume.deleted")
        if parent is not None and parent.startswith(CACHE_PREFIX):
            with contextlib.suppress(ReconcileError):  # else pruned by `cache gc`
                self.record_store().drop_reference(self.name, parent, volume)

    def sweep_temp(self) -> list[str]:
        """Remove temporary images an interrupted import left, unless their lock is held."""
        removed: list[str] = []
        locks = self.locks()
        for name in sorted(self.list_volumes()):
            if not name.startswith(TEMP_PREFIX):
                continue
            with locks.attempt(name[len(TEMP_PREFIX) :]) as taken:
                if taken is None:
                    continue  # another reconciler is importing it right now
                try:
                    self.remove_temp(name)
                except ReconcileError as e:  # the import that needs it removes it, or fails
                    log.warning("temp.sweep_failed", pool=self.name, image=name, error=str(e))
                    continue
                removed.append(name)
        return removed

    # -- image data: read out, written in (migrations, take_file, exports) --------------

    @contextmanager
    def _export(self, volume: str) -> Iterator[int]:
        """The image's bytes (its parent's data included) in an unnamed local file
        (O_TMPFILE: a crash leaves nothing), sparse: only data chunks are written."""
        with _scratch() as fd:
            with self.reader(volume) as src:
                os.ftruncate(fd, src.size)
                raw_copy(src, FileSink(fd, f"a local export of {self.name}/{volume}"))
            yield fd

    # -- raw bytes (drivers/api.py's Volumes) -------------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        """A plain image (never a clone), made as a blank disk is (RBD's default
        features), reading as zeros."""
        _, rbd = _mods()
        with self._ceph(f"creating image {volume}"):
            try:
                rbd.RBD().create(self._io(), volume, size, old_format=False)
            except rbd.ImageExists:
                raise self._exists(volume) from None

    def raw_readable(self, rec: DiskRecord) -> bool:
        return True  # a disk is raw, and a clone is read with its parent's data

    @contextmanager
    def reader(self, volume: str, size: int | None = None) -> Iterator[_ImageSource]:
        """The image as a disk reads it (a clone's parent data included), all of it."""
        with self._image(volume, read_only=True) as img:
            yield _ImageSource(self, img, volume)

    @contextmanager
    def writer(self, volume: str) -> Iterator[_ImageSink]:
        """A new image (reading as zeros), written with python-rbd, flushed at the end."""
        with self._image(volume) as img:
            yield _ImageSink(self, img, volume)

    # -- adoption and importing files ---------------------------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        """An existing image is adopted as raw, its size RBD's (never its bytes'); its first
        bytes are read only to report a header that announces another format (a guest may
        have written it; it is never followed). A clone is refused: no record would hold
        a reference on its parent, so `cache gc` (or its owner) could not see it."""
        _, rbd = _mods()
        if fmt is not DiskFormat.RAW:
            raise ReconcileError(
                f"pool {self.name} is an rbd pool: its disks are raw images, so {volume} "
                f"cannot be adopted as {fmt}"
            )
        with self._image(volume, read_only=True) as img:
            self._check_copy(img, volume, "adopting")
            with self._ceph(f"reading {volume}"):
                try:
                    parent = img.get_parent_image_spec()
                except rbd.ImageNotFound:
                    parent = None
                size = int(img.size())
                head = bytes(img.read(0, min(HEADER_BYTES, size))) if size else b""
        if parent is not None:
            raise ReconcileError(
                f"{self.name}/{volume} is a clone of {parent['pool_name']}/"
                f"{parent['image_name']}@{parent['snap_name']}; an adopted disk would depend "
                "on an image no record holds a reference to, so it is not adopted (flatten "
                "it first: rbd flatten)"
            )
        return Inspected(size, None, header_format(head))

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """A host file's bytes, unchanged, into a new image (flows/takein.py: its data
        extents, zero chunks skipped, into the temporary image `.reconciler-tmp-VOLUME`,
        flushed, then renamed). The caller holds the volume's lock, under which
        sweep_temp leaves that temporary image alone."""
        take_in(self, path, volume, keep_source=keep_source)

    def temp_name(self, volume: str) -> str:
        return TEMP_PREFIX + volume

    def volume_at(self, path: str) -> str | None:
        return None  # no image of this pool is a host path

    def point_overlay_at(self, path: str, entry: str) -> None:
        raise ReconcileError(
            f"pool {self.name} is an rbd pool: its disks are raw images (clones of cache "
            f"entries), so a qcow2 overlay ({path}) cannot be taken into it"
        )

    # -- migrations ---------------------------------------------------------------------

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        """The Ceph pool's free bytes where Ceph reports them, and rbd/raw as the one
        layout. No allocation is given per image: knowing it means opening every image
        (17 ms each) on every plan, and without it the planner counts each disk's whole
        size, which is also what a flattened copy of a clone may need."""
        return MigrationFacts(self._available(), {}, LAYOUTS)

    def _available(self) -> int | None:
        """`ceph df`'s MAX AVAIL for the pool (replication and the full ratio counted), or
        None (no space check) where Ceph has no real figure: without a ceph-mgr the
        monitors report every statistic, cluster and pool, as zero and list no pools."""
        rados, _ = _mods()
        try:
            ret, out, _ = self.client().cluster.mon_command(
                json.dumps({"prefix": "df", "format": "json"}), b""
            )
        except rados.Error:
            return None
        if ret != 0:
            return None
        try:
            doc = json.loads(out)
            if int(doc["stats"]["total_bytes"]) <= 0:
                return None
            for p in doc["pools"]:
                if p["name"] == self.ceph.pool:
                    return int(p["stats"]["max_avail"])
        except (ValueError, KeyError, TypeError):
            return None
        return None

    def _check_layout(self, volume: str, backend: Backend, fmt: DiskFormat) -> None:
        if (backend, fmt) != (Backend.RBD, DiskFormat.RAW):
            raise ReconcileError(
                f"pool {self.name} holds raw rbd disks only; {volume} cannot be {backend}/{fmt}"
            )

    def prepare_copy(self, volume: str, backend: Backend, fmt: DiskFormat, size: int) -> None:
        """A plain image (never a clone: a copy is standalone), made as a blank disk is
        (RBD's default features), reading as zeros; its record copy follows its record."""
        self._check_layout(volume, backend, fmt)
        self.create_empty(volume, size)
        faults.point("volume.created")

    @contextmanager
    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> Iterator[QemuImage]:
        """qemu-img here has no rbd driver (it is Debian's qemu-block-extra, not installed),
        so it reads an image as a raw local export of its bytes (see _export; a clone's
        parent data included, so `backing` needs no node of its own). Nothing writes an
        rbd image through qemu-img: native_copy always copies into one."""
        if fmt is not DiskFormat.RAW:
            raise ReconcileError(f"{self.name}/{volume}: an rbd disk is raw, not {fmt.value}")
        if write:
            raise ReconcileError(
                f"{self.name}/{volume}: an rbd image is written with python-rbd "
                "(native_copy), never through qemu-img"
            )
        with self._export(volume) as fd:
            node = {"driver": "raw", "file": {"driver": "file", "filename": fd_path(fd)}}
            yield QemuImage("raw", "json:" + json.dumps(node, sort_keys=True), (fd,))

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        """Always True: the copy's bytes are written with python-rbd, zero chunks skipped
        (flows.copy). From a source whose raw bytes are the disk's (an image, a clone read
        with its parent's data so the copy is flat; a raw file without backing: its data
        extents), through its reader(); from anything else, through a raw local file
        `qemu-img convert -f FMT -O raw` makes of what the source's qemu_image() reaches
        (a qcow2 overlay is flattened so; an LV is read so, as it always was)."""
        self._check_layout(to.volume, to.backend, to.format)
        if rec.virtual_size > to.virtual_size:
            raise ReconcileError(f"{rec.volume} is larger than its copy; not copied")
        if source.access is not Access.DEVICE and source.raw_readable(rec):
            with source.reader(rec.volume, rec.virtual_size) as src, self.writer(to.volume) as dst:
                raw_copy(src, dst, room=to.virtual_size)
            return True
        what = f"migrate {source.name}/{rec.volume} to {self.name}/{to.volume}"
        with (
            source.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s,
            _scratch() as raw,
        ):
            os.ftruncate(raw, to.virtual_size)
            run(
                convert_argv(s.format, "raw", s.filename, fd_path(raw), out_of_order=True),
                fds=(*s.fds, raw),
                what=what,
            )
            with self.writer(to.volume) as dst:
                raw_copy(FileSource(raw, f"{what}: its raw copy"), dst)
        return True

    def finish_copy(self, volume: str) -> None:
        """Flush the image: python-rbd's writes are acknowledged once the OSDs hold them,
        and each copy flushes as it ends; this covers any other writer's cache."""
        with self._image(volume) as img, self._ceph(f"flushing {volume}"):
            img.flush()

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        """RBD rename (one update of the pool's image directory). It never takes an existing
        name (VolumeExists); with `replace`, an existing `new` is removed first (RBD has no
        rename over an image): a crash between the two leaves `old` holding the data under
        its name, and the caller (a `switched` migration) renames it on its next run."""
        _, rbd = _mods()
        if replace and self.volume_exists(new):
            self.delete_volume(new)
        with self._ceph(f"renaming {old} to {new}"):
            try:
                rbd.RBD().rename(self._io(), old, new)
            except rbd.ImageExists:
                raise VolumeExists(
                    f"volume {new} exists in pool {self.name}; {old} is not renamed over it"
                ) from None


class _ImageSource:
    """An open image's bytes as a RawSource: its data is where RBD objects exist (its
    parent's included; whole objects, from the object map where the image has one)."""

    fd: int | None = None

    def __init__(self, pool: RbdPoolDriver, img: Any, volume: str) -> None:
        self.pool, self.img, self.volume = pool, img, volume
        self.what = f"{pool.name}/{volume}"
        with pool._ceph(f"reading {volume}'s size"):
            self.size = int(img.size())

    def extents(self) -> Iterator[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def note(offset: int, length: int, exists: bool) -> int:
            if exists:
                if out and out[-1][1] == offset:
                    out[-1] = (out[-1][0], offset + length)
                else:
                    out.append((offset, offset + length))
            return 0

        with self.pool._ceph(f"listing {self.volume}'s data"):
            self.img.diff_iterate(0, self.size, None, note, include_parent=True, whole_object=True)
        for start, end in out:
            if start < min(end, self.size):
                yield start, min(end, self.size)

    def read(self, at: int, n: int) -> bytes:
        with self.pool._ceph(f"reading {self.volume}"):
            return bytes(self.img.read(at, n))


class _ImageSink:
    """An open new image (reading as zeros) as a RawSink; flushed when finished."""

    fd: int | None = None
    zeroed = True

    def __init__(self, pool: RbdPoolDriver, img: Any, volume: str) -> None:
        self.pool, self.img, self.volume = pool, img, volume
        self.what = f"{pool.name}/{volume}"
        with pool._ceph(f"reading {volume}'s size"):
            self.size = int(img.size())

    def write(self, data: bytes, at: int) -> None:
        with self.pool._ceph(f"writing {self.volume}"):
            self.img.write(data, at)

    def finish(self) -> None:
        with self.pool._ceph(f"flushing {self.volume}"):
            self.img.flush()


@contextmanager
def _scratch() -> Iterator[int]:
    """An unnamed local file (O_TMPFILE) for a fetch or a template: a crash leaves nothing."""
    base = os.environ.get("TMPDIR", "/var/tmp")
    try:
        fd = os.open(base, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ReconcileError(f"cannot make a scratch file in {base}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


__all__ = ["LockBusy", "RbdPoolDriver", "RbdRecordStore", "parse_rbd_location"]
