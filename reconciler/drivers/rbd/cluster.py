"""The connection an rbd pool's driver works through, and the state every part of the driver
shares (`Cluster`): Debian's rados and rbd bindings, imported on first use; one rados client
with its two ioctxs (the images, in the Ceph pool's default namespace; the leases, in the
records' namespace N), connected on first use; the RADOS record store and the leases, both
on that same client (a host fenced by `ceph osd blocklist`, whose address the store's
heartbeats name, can change neither records nor images); and the one translation of the
bindings' errors into errors naming the pool and what was being done.

Invariants: after a timeout the client's calls fail at once for opTimeout seconds, naming
the first failure (drivers/rbd/outage.py): one deadline per step, never one per call. An
image removed under an exclusive lock still held takes its (empty) lock object with it
when the lock is released, so deleted disks leave nothing behind in N.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reconciler.drivers.api import VolumeExists
from reconciler.drivers.host.store import StoreError
from reconciler.drivers.rbd.changes import ChangeMark
from reconciler.drivers.rbd.leases import LeaseLocks
from reconciler.drivers.rbd.listing import KeptListing, versions
from reconciler.drivers.rbd.namespace import client_conf
from reconciler.drivers.rbd.outage import Outage
from reconciler.drivers.rbd.records import RadosRecordStore
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.schema.config import CephConfig


def mods() -> tuple[Any, Any]:
    """Debian's rados and rbd modules (untyped, a system dependency): imported only here
    and only when an rbd pool is used. Missing (a venv that does not see the system's
    packages): the pool's error, as for an unreachable pool; the other pools go on."""
    rados = rados_only()
    try:
        import rbd
    except ImportError as e:
        raise _missing(e) from None
    return rados, rbd


def rados_only() -> Any:
    """Debian's rados module alone, for what needs no librbd: loading librbd costs 6-12 ms
    of a run, which a plan that changes nothing does not need (listing.py)."""
    try:
        import rados
    except ImportError as e:
        raise _missing(e) from None
    return rados


def _missing(e: ImportError) -> PoolError:
    # Imported here: ingest's fetch brings urllib and http.client, which an rbd pool
    # whose bindings are present never needs.
    from reconciler.drivers.ingest.fetch import MISSING_BINDINGS

    return PoolError(MISSING_BINDINGS.format(e=e))


class RbdRecordStore(RadosRecordStore):
    """The RADOS store of an rbd pool, whose cache entries count their references in
    their own records (ref keys, drivers/rbd/records.py) rather than by reading every
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


class Client:
    """The driver's one rados.Rados client and its ioctxs, connected on first use."""

    def __init__(self, c: Cluster) -> None:
        rados = rados_only()
        ceph = c.ceph
        self.where = f"Ceph pool {ceph.pool} (pool {c.name})"
        conf = {**client_conf(ceph.op_timeout), "rbd_default_clone_format": "2"}
        try:
            self.cluster = rados.Rados(conffile=ceph.conf, name=ceph.client, conf=conf)
            self.cluster.connect()
        except rados.Error as e:
            msg = (
                f"pool {c.name}: cannot connect to Ceph (conf {ceph.conf}) as "
                f"{ceph.client}: {e}; check the monitors are up (`ceph -s`) and the conf and "
                "keyring, then run again"
            )
            # Every later call would wait client_mount_timeout again for the same answer.
            c.outage.note(msg)
            raise PoolError(msg) from None
        try:
            self.fsid: str = str(self.cluster.get_fsid()).lower()
            self.io = self.cluster.open_ioctx(ceph.pool)  # images: the default namespace
            self.ns = self.cluster.open_ioctx(ceph.pool)  # locks
            self.ns.set_namespace(ceph.namespace)
        except rados.Error as e:
            self.cluster.shutdown()
            raise PoolError(f"pool {c.name}: cannot open Ceph pool {ceph.pool}: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.io.close()
            self.ns.close()
        self.cluster.shutdown()


class Cluster:
    """One rbd pool's client, record store and leases (each made on first use), and what
    every part of its driver asks of Ceph: an operation's errors named (`op`), an image
    opened, the pool's images listed and looked up."""

    def __init__(
        self,
        name: str,
        ceph: CephConfig,
        host: str,
        *,
        offline: bool,
        heartbeat_expiry: float,
        changes: Path | None = None,
        listing: Path | None = None,
    ) -> None:
        self.name = name
        self.changes = changes  # this host's mark of record writes (drivers/rbd/changes.py)
        self.listing = KeptListing(listing)  # the pool's image names (drivers/rbd/listing.py)
        self.ceph = ceph
        self.host = host
        self.offline = offline  # planning from a file: never connect
        self.heartbeat_expiry = heartbeat_expiry  # ownership.heartbeatExpiry
        self.where = f"Ceph pool {ceph.pool}"
        self._client: Client | None = None
        self._records: RbdRecordStore | None = None
        self._locks: LeaseLocks | None = None
        self._setup = threading.Lock()
        self._gone: set[str] = set()  # images removed under a lock still held
        # After a timeout, this client's calls fail at once for opTimeout seconds, naming
        # the first failure: one deadline per step (drivers/rbd/outage.py).
        self.outage = Outage(ceph.op_timeout)

    def client(self) -> Client:
        with self._setup:
            if self._client is None:
                self.outage.check()
                self._client = Client(self)
            return self._client

    def io(self) -> Any:
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
                    changes=ChangeMark(self.changes),
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
    def op(self, doing: str) -> Iterator[None]:
        """Turn the bindings' errors into ones naming the pool and what was being done."""
        rados = rados_only()
        self.outage.check()
        try:
            yield
        except Exception as e:
            # rbd's errors only once something imported it: a call of it did (mods()).
            rbd = sys.modules.get("rbd")
            errors = (rados.Error,) if rbd is None else (rados.Error, rbd.Error)
            if not isinstance(e, errors):
                raise
            timeout = (rados.TimedOut,) if rbd is None else (rados.TimedOut, rbd.Timeout)
            code = getattr(e, "errno", None)
            if isinstance(e, timeout) or code in (
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

    def removed(self, volume: str) -> None:
        """Note that image `volume` was removed (its lock object goes with its lock)."""
        with self._setup:
            self._gone.add(volume)

    @contextmanager
    def image(
        self, volume: str, *, read_only: bool = False, snapshot: str | None = None
    ) -> Iterator[Any]:
        _, rbd = mods()
        with self.op(f"opening image {volume}"):
            img = rbd.Image(self.io(), volume, snapshot=snapshot, read_only=read_only)
        try:
            yield img
        finally:
            img.close()

    def list_volumes(self) -> frozenset[str]:
        """The pool's image names, as `rbd ls` lists them; the names kept from an earlier
        listing while the objects they are listed from are unchanged (listing.py)."""
        rados = rados_only()
        c = self.client()

        def now() -> list[int]:
            with self.op("listing images"):
                io = c.cluster.open_ioctx(self.ceph.pool)  # its own: versions are per ioctx
                try:
                    return versions(rados, io)
                finally:
                    io.close()

        def listing() -> frozenset[str]:
            _, rbd = mods()
            with self.op("listing images"):
                return frozenset(str(n) for n in rbd.RBD().list(c.io))

        key = {"fsid": c.fsid, "pool": self.ceph.pool, "id": int(c.io.get_pool_id())}
        return self.listing.names(key, now, listing)

    def volume_exists(self, volume: str) -> bool:
        """Whether anything of the image exists: its entry in `rbd_directory` (what listing
        reads) or its `rbd_id.` object, in one read each and no image open. Either alone is
        what an interrupted RBD.remove leaves, and it counts as existing until removed."""
        rados = rados_only()
        io = self.io()
        with self.op(f"looking up image {volume}"):
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

    def appeared(self, volume: str) -> VolumeExists:
        """The error for an image that exists where this driver was making one."""
        return VolumeExists(
            f"image {volume} appeared in pool {self.name} from elsewhere; it is not ours and "
            "is left untouched"
        )
