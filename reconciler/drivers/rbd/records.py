"""Disk records kept in RADOS, in a namespace of the Ceph pool that holds the disks: the
store's public face (RecordStore and SharedRecordStore of drivers/host/store.py).

Many hosts share one Ceph pool, so the records live beside the images (DESIGN: records
belong to the driver's backend) and every change is one version-checked write that a host
acting on a stale read cannot get past (invariant 6). The objects and their stored formats
are drivers/rbd/layout.py's; the RADOS calls, their bounds and faults
drivers/rbd/namespace.py's; each host's index drivers/rbd/index.py's; hosts, heartbeats and
fencing drivers/rbd/hosts.py's; instance claims drivers/rbd/claims.py's.

Compare-and-swap: a write asserts, in the same compound op, `omap_cmp` of the record's
`generation`, `host` and `instance` (all EQ). We compare the generation rather than the
object version (`assert_version`) because the caller's precondition *is* a generation (the
plan saw it, maybe in another process or an earlier run, where no object version was
kept), and because batched aio reads in the Pacific bindings do not report the version
(`Ioctx.get_last_version` is per ioctx and racy across threads). Comparing `host` fences a
host from changing a disk another host owns; comparing `instance` keeps the index shard
right (a record never moves between instances). The executor always writes generation
expect + 1, and `put` refuses a generation that does not grow, so a value cannot come back
(ABA) except by a delete and re-create of the same disk by the same host between another
of its processes' read and write; the per-disk lock the rbd driver will take around each
step (not yet built) serialises those.

Order of writes, and what a crash between them leaves behind:

- Create (`put(rec, None)`): 1. add this host to `hosts` (once per store object);
  2. the index entry; 3. the record, exclusively, contents and CAS fields in one op, so of
  hosts racing exactly one wins and the others get ConflictError. This is the record that
  invariant 2 writes before the image exists. A crash after 2 leaves an index entry
  without a record, which the index cleans (drivers/rbd/index.py). A loser of the race
  removes its own index entry at once (guarded by its value) when the winner is another
  host; when the winner is this same host the entry is the winner's and stays.
- Update (`put(rec, g)`): one op on the record; nothing to leave behind.
- Delete: 1. read the record (its instance names the index shard) and its index entry;
  2. remove the record, CAS-guarded; 3. remove the index entry, guarded by its value. A
  crash after 2 leaves an index entry without a record: cleaned as above.
- Hand over (`release`, `take`): 1. list the record in the new owner's index; 2. the
  record, guarded by generation, owner and instance; 3. unlist it from the old owner's.
  The instance's claim moves before the record on a take, after it on a release
  (drivers/rbd/claims.py).
- So a record never exists unlisted by its host's index (the index entry always comes
  first and goes last), and an index entry without a record is harmless and cleaned.

Every RADOS write is durable when the OSD acknowledges it, so `durable` and `sync()` have
nothing to do here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from reconciler.drivers.host.store import RELEASED, ConflictError, StoreError, StoreIdentity
from reconciler.drivers.rbd.changes import FULL_EVERY, ChangeMark
from reconciler.drivers.rbd.claims import Claims
from reconciler.drivers.rbd.hosts import DEFAULT_HEARTBEAT_EXPIRY, Hosts
from reconciler.drivers.rbd.index import DEFAULT_STALE_AFTER, Index
from reconciler.drivers.rbd.layout import (
    DEFAULT_SHARDS,
    MAX_RECORD,
    SHARED,
    IndexEntry,
    Stored,
    decode,
    encode,
    record_object,
    shard_of,
)
from reconciler.drivers.rbd.namespace import (
    DEFAULT_OP_TIMEOUT,
    Namespace,
    client_conf,
    rados_module,
    refused,
)
from reconciler.drivers.rbd.outage import Outage
from reconciler.drivers.rbd.refs import References
from reconciler.model.errors import RecordError
from reconciler.model.record import BadRecord, DiskRecord, RecordKind

DEFAULT_NAMESPACE = "reconciler"


class RadosRecordStore:
    """Records of one host in a RADOS namespace shared by many hosts."""

    def __init__(
        self,
        open_ioctx: Callable[[], Any],
        pool: str,
        *,
        cluster: Any = None,
        host: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        shards: int = DEFAULT_SHARDS,
        stale_after: float = DEFAULT_STALE_AFTER,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        heartbeat_expiry: float = DEFAULT_HEARTBEAT_EXPIRY,
        on_close: Callable[[], None] | None = None,
        outage: Outage | None = None,
        changes: ChangeMark | None = None,
    ) -> None:
        """`open_ioctx` gives an Ioctx of `pool` (the store sets its namespace); `shards`
        applies only when this store creates the namespace; `op_timeout` is for messages
        (the client's rados_osd_op_timeout bounds the waits)."""
        self.pool = pool
        self.namespace = namespace
        self.host = host or socket.gethostname()
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"host identity {self.host!r} must be non-empty, without spaces")
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.where = f"Ceph pool {pool} namespace {namespace}"
        self.ns = Namespace(self.where, op_timeout, outage)
        self._on_close = on_close
        # The client (connect()'s own, or the caller's): for fencing and this client's
        # address; None: the store cannot fence (and its heartbeats name no address).
        self.cluster: Any = cluster
        self.last_beat: float | None = None  # when this store last renewed the heartbeat
        # This host's record writes (drivers/rbd/changes.py): while none is seen, a load
        # reads again only the records whose index entries changed.
        self.changes = changes or ChangeMark(None)
        self._kept: dict[str, tuple[str, Stored]] = {}
        self._kept_token: bytes | None = None
        self._kept_since = 0.0
        self._kept_lock = threading.Lock()
        self.ns.open(open_ioctx, namespace)
        try:
            self._id, self.shards = self.ns.open_store(shards)
        except BaseException:
            self.ns.io.close()
            raise
        self.hosts = Hosts(self.ns, self.host, cluster, heartbeat_expiry)
        self.claims = Claims(self.ns, self.hosts)
        self.index = Index(self.ns, self.host, self.shards, stale_after)
        self.refs = References(self.ns, self.host)

    @classmethod
    def connect(
        cls,
        conffile: str,
        pool: str,
        *,
        name: str = "client.admin",
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        **kwargs: Any,
    ) -> RadosRecordStore:
        """A store with its own client, every wait bounded by `op_timeout`; `close()`
        shuts the client down. kwargs are the constructor's (host, namespace, ...)."""
        rados = rados_module()
        where = f"Ceph pool {pool} (conf {conffile})"
        try:
            cluster = rados.Rados(conffile=conffile, name=name, conf=client_conf(op_timeout))
            cluster.connect()
        except rados.Error as e:
            raise StoreError(
                f"cannot connect to {where} as {name}: {e}; check the monitors are up "
                f"(`ceph -s`) and the conf and keyring are right, then run again"
            ) from e
        try:
            return cls(
                lambda: cluster.open_ioctx(pool),
                pool,
                cluster=cluster,
                op_timeout=op_timeout,
                on_close=cluster.shutdown,
                **kwargs,
            )
        except BaseException:
            cluster.shutdown()
            raise

    def identity(self) -> StoreIdentity:
        return StoreIdentity(self._id, self.where, self.host)

    # -- reads ------------------------------------------------------------------------------

    def _stored(self, pool: str, volume: str) -> Stored | None:
        oid = record_object(pool, volume)
        data = self.ns.read(oid)
        return None if data is None else decode(oid, data, self.where)

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        stored = self._stored(pool, volume)
        return None if stored is None else stored.record

    def owner(self, pool: str, volume: str) -> str | None:
        """The host that owns the record of pool/volume (None: there is no record)."""
        stored = self._stored(pool, volume)
        return None if stored is None else stored.host

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]:
        """This host's records and the pool's cache entries, through their indexes (never
        by listing the pool)."""
        every = [(self.host, s) for s in range(self.shards)]
        token = self.changes.read()  # before any read: a write after it changes it
        now = time.monotonic()
        with self._kept_lock:
            fresh = token is not None and token == self._kept_token
            kept = self._kept if fresh and now - self._kept_since < FULL_EVERY else {}
        seen: dict[str, tuple[str, Stored]] = {}
        good, bad = self.index.load_from(
            [*every, (SHARED, 0)], None, clean=True, kept=kept, seen=seen
        )
        with self._kept_lock:
            # Only this host's records: every host changes the cache entries' (SHARED).
            self._kept = {k: v for k, v in seen.items() if v[1].host == self.host}
            self._kept_token = token
            if not kept:
                self._kept_since = now
        return good, bad

    def for_instance(self, instance: str) -> list[DiskRecord]:
        good, bad = self.index.load(self.host, [shard_of(instance, self.shards)], instance, True)
        if bad:
            raise RecordError(bad[0].error)
        return good

    def released_for_instance(self, instance: str) -> list[DiskRecord]:
        """The instance's records no host holds: a hand-over released them (its disks'
        snapshots go with the disk, apply/steps/ownership.py)."""
        good, bad = self.index.load(RELEASED, [shard_of(instance, self.shards)], instance, False)
        if bad:
            raise RecordError(bad[0].error)
        return good

    def references(self, pool: str, volume: str) -> int:
        """Records of every host naming pool/volume as their cache entry. Reads every
        host's index and record: its cost grows with the namespace (a per-cache-entry
        reference index is the image cache's to keep)."""
        hosts = [*self.hosts.known(), RELEASED]
        n = 0
        for host in hosts:
            good, _ = self.index.load(host, list(range(self.shards)), None, clean=False)
            n += sum(1 for r in good if r.pool == pool and r.backing == volume)
        return n

    def read_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Stored | BadRecord]:
        """The records of `keys` by name, whoever owns them (batched reads; a missing
        record is left out). How a host finds the records of instances its manifests
        name that another host made or owns: never by listing the pool."""
        oids = {record_object(p, v): (p, v) for p, v in keys}
        datas = self.ns.read_many(sorted(oids))
        out: dict[tuple[str, str], Stored | BadRecord] = {}
        for oid, data in datas.items():
            if data is None:
                continue
            key = oids[oid]
            try:
                out[key] = decode(oid, data, self.where)
            except RecordError as e:
                out[key] = BadRecord(*key, str(e))
        return out

    # -- writes -----------------------------------------------------------------------------

    def put(
        self, record: DiskRecord, expect_generation: int | None, *, durable: bool = True
    ) -> None:
        """Write `record`; `expect_generation` None means it must not exist yet. Every
        acknowledged RADOS write is durable, so `durable` changes nothing here."""
        if record.generation <= (expect_generation or 0):
            raise ValueError(
                f"record {record.pool}/{record.volume}: generation {record.generation} must "
                f"be above the expected {expect_generation}"
            )
        data = encode(record, self._holder(record))
        oid = record_object(record.pool, record.volume)
        if len(data) >= MAX_RECORD:
            raise RecordError(f"record {record.pool}/{record.volume} is too large to store")
        try:
            if expect_generation is None:
                self._create(record, oid, data)
            else:
                self._update(record, oid, data, expect_generation)
        finally:
            self.changes.bump()  # after the write (or its failure: it may have landed)

    def _create(self, record: DiskRecord, oid: str, data: bytes) -> None:
        rados = rados_module()
        self.hosts.register()
        holder = self._holder(record)
        if holder == self.host:
            self.claims.claim(record.instance)
        shard = self.index.shard(holder, record.instance)
        entry = IndexEntry.new(record)
        # The index entry first: a record never exists unlisted by its host.
        self.index.add(holder, shard, oid, entry)
        try:
            with self.ns.errors(f"creating record {oid}"):
                self.ns.create_exclusive(oid, data, self._cas_fields(record))
        except StoreError as e:
            if not isinstance(e.__cause__, rados.ObjectExists):
                raise
            try:
                current = self._stored(record.pool, record.volume)
            except RecordError:
                current = None  # unreadable: our entry makes load_all report it
            if current is not None and current.host != holder:
                self.index.remove(shard, oid, entry, holder)
            what = (
                "exists"
                if current is None
                else (f"exists (generation {current.record.generation}, host {current.host})")
            )
            raise ConflictError(
                f"record {record.pool}/{record.volume} in {self.where} already {what}, "
                "expected none: another reconciler created it"
            ) from None

    def _holder(self, record: DiskRecord) -> str:
        """Who a record of this host's belongs to: this host, or every host (a cache
        entry: hosts clone from one another's entries and each adds its references)."""
        return SHARED if record.kind is RecordKind.CACHE else self.host

    def _cas_fields(self, record: DiskRecord, host: str | None = None) -> dict[str, str]:
        return {
            "generation": str(record.generation),
            "host": host or self._holder(record),
            "instance": record.instance,
        }

    def _guard(self, op: Any, generation: int, instance: str | None, host: str) -> None:
        rados = rados_module()
        op.omap_cmp("generation", str(generation), rados.LIBRADOS_CMPXATTR_OP_EQ)
        op.omap_cmp("host", host, rados.LIBRADOS_CMPXATTR_OP_EQ)
        if instance is not None:
            op.omap_cmp("instance", instance, rados.LIBRADOS_CMPXATTR_OP_EQ)

    def _conflict(
        self, pool: str, volume: str, expect: int, owner: str | None = None
    ) -> ConflictError:
        """Why a guarded write failed, from a fresh read (for the message only)."""
        try:
            current = self._stored(pool, volume)
        except RecordError as e:
            return ConflictError(f"record {pool}/{volume} changed and is now unreadable: {e}")
        if current is None:
            now = "does not exist"
        else:
            now = f"is at generation {current.record.generation}, owned by host {current.host}"
        whose = "its own record" if owner in (None, self.host) else f"a record of {owner}"
        return ConflictError(
            f"record {pool}/{volume} in {self.where} {now}; host {self.host} expected "
            f"generation {expect} of {whose}: another reconciler changed it"
        )

    def _update(self, record: DiskRecord, oid: str, data: bytes, expect: int) -> None:
        rados = rados_module()
        fields = self._cas_fields(record)
        try:
            with self.ns.errors(f"updating record {oid}"), rados.WriteOpCtx() as op:
                self._guard(op, expect, record.instance, self._holder(record))
                op.write_full(data)
                self.ns.io.set_omap(op, tuple(fields), tuple(v.encode() for v in fields.values()))
                self.ns.io.operate_write_op(op, oid)
        except StoreError as e:
            if refused(e):
                raise self._conflict(record.pool, record.volume, expect) from None
            raise

    def delete(
        self, pool: str, volume: str, expect_generation: int, *, durable: bool = True
    ) -> None:
        try:
            self._delete(pool, volume, expect_generation)
        finally:
            self.changes.bump()

    def _delete(self, pool: str, volume: str, expect_generation: int) -> None:
        rados = rados_module()
        oid = record_object(pool, volume)
        stored = self._stored(pool, volume)  # its instance names the index shard
        if stored is None or stored.host != self._holder(stored.record):
            raise self._conflict(pool, volume, expect_generation)
        shard = self.index.shard(stored.host, stored.record.instance)
        entry = self.index.entry(shard, oid, stored.host)
        try:
            with self.ns.errors(f"deleting record {oid}"), rados.WriteOpCtx() as op:
                self._guard(op, expect_generation, None, stored.host)
                op.remove()
                self.ns.io.operate_write_op(op, oid)
        except StoreError as e:
            if refused(e):
                raise self._conflict(pool, volume, expect_generation) from None
            raise
        # The index entry last; a crash before this leaves an entry load_all cleans.
        if entry is not None:
            self.index.remove(shard, oid, entry, stored.host)

    # -- ownership: hosts hand records and instances to one another ----------------------

    def beat(self, if_older_than: float | None = None) -> None:
        """Renew this process's heartbeat (drivers/rbd/hosts.py, Hosts.beat)."""
        at = self.hosts.beat(if_older_than)
        if at is not None:
            self.last_beat = at

    def heartbeats(self) -> dict[str, float]:
        """Each host's newest heartbeat (Hosts.heartbeats)."""
        return self.hosts.heartbeats()

    def fence(self, host: str) -> list[str]:
        """Blocklist `host`'s reconcilers before its instances are taken (Hosts.fence)."""
        return self.hosts.fence(host)

    def claimants(self, instances: list[str]) -> dict[str, str]:
        """Who has claimed each of `instances` (Claims.claimants)."""
        return self.claims.claimants(instances)

    def release(self, pool: str, volume: str, expect_generation: int) -> None:
        """Let another host take this host's record of pool/volume (its manifest is gone
        here, and may have appeared there): a compare-and-swap from this host to RELEASED.
        The image is untouched."""
        try:
            self._move(pool, volume, expect_generation, self.host, RELEASED)
        finally:
            self.changes.bump()

    def take(self, pool: str, volume: str, expect_generation: int, from_host: str) -> None:
        """Make this host the owner of a record that `from_host` released, or whose
        heartbeat expired: a compare-and-swap from `from_host` to this host. A host whose
        heartbeat expired is fenced first (`fence`), so if it was only paused its next
        operation fails; and its next record write would fail its guard anyway."""
        try:
            self._move(pool, volume, expect_generation, from_host, self.host)
        finally:
            self.changes.bump()

    def _move(self, pool: str, volume: str, expect: int, old: str, new: str) -> None:
        """Change a record's owner from `old` to `new`, its generation + 1. Order, so no
        record is ever unlisted by its owner: 1. list it in `new`'s index; 2. the record,
        guarded by generation, owner and instance; 3. unlist it from `old`'s index. A crash
        after 1 or 2 leaves an entry whose record another host owns: `Index.load` ignores
        it and the index's own host removes it."""
        rados = rados_module()
        oid = record_object(pool, volume)
        stored = self._stored(pool, volume)
        if stored is None or stored.host != old or stored.record.generation != expect:
            raise self._conflict(pool, volume, expect, old)
        if old not in (RELEASED, self.host) and new == self.host:
            self.hosts.fence(old)  # taken from a host that is gone (its heartbeat expired)
        rec = stored.record.model_copy(update={"generation": expect + 1})
        shard = shard_of(rec.instance, self.shards)
        old_entry = self.index.entry(shard, oid, old)
        if new != RELEASED:
            self.hosts.register()
            # The claim before the record: this host owns the instance before any disk of
            # it, so a crash in between leaves a record the next run takes again.
            self.claims.move(rec.instance, new, only_from=None)
        self.index.add(new, shard, oid, IndexEntry.new(rec))
        fields = self._cas_fields(rec, new)
        try:
            with self.ns.errors(f"handing record {oid} to {new}"), rados.WriteOpCtx() as op:
                self._guard(op, expect, rec.instance, old)
                op.write_full(encode(rec, new))
                self.ns.io.set_omap(op, tuple(fields), tuple(v.encode() for v in fields.values()))
                self.ns.io.operate_write_op(op, oid)
        except StoreError as e:
            if refused(e):
                raise self._conflict(pool, volume, expect, old) from None
            raise
        if old_entry is not None:
            self.index.remove(shard, oid, old_entry, old)
        if new == RELEASED:
            # The claim after the record: a crash in between leaves the claim this host's,
            # and the host that takes the record takes the claim with it.
            self.claims.move(rec.instance, RELEASED, only_from=self.host)

    # -- a cache entry's references (drivers/rbd/refs.py) --------------------------------

    def add_reference(self, pool: str, volume: str, ref: str) -> None:
        self.refs.add(pool, volume, ref)

    def drop_reference(self, pool: str, volume: str, ref: str) -> None:
        self.refs.drop(pool, volume, ref)

    def reference_names(self, pool: str, volume: str) -> dict[str, str] | None:
        return self.refs.names(pool, volume)

    def check_writable(self) -> None:
        """A real, harmless write (this host's registration), so a read-only client or a
        full cluster stops a run before its first change."""
        self.hosts.register(again=True)

    def sync(self) -> None:
        """Nothing to do: every acknowledged RADOS write is already durable."""

    def close(self) -> None:
        self.changes.close()
        try:
            self.ns.io.close()
        finally:
            if self._on_close is not None:
                self._on_close()
