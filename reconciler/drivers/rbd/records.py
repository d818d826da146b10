"""Disk records kept in RADOS, in a namespace of the Ceph pool that holds the disks.

Many hosts share one Ceph pool, so the records live beside the images (DESIGN: records
belong to the driver's backend) and every change is one version-checked write that a host
acting on a stale read cannot get past (invariant 6).

Objects (all in namespace `reconciler` of the pool unless configured otherwise):

- `store`: omap `format`, `id` (a UUID: the store's identity) and `shards` (how many index
  shards each host has). Created exclusively by the first host that opens the namespace;
  every later host reads it, so all hosts agree on the shard count.
- `hosts`: omap, one key per host that has ever created a record (value: when it first
  did). Only `references()` reads it, to find every host's index.
- `rec.<sha256 of [pool, volume], 32 hex>`: one per disk (or cache entry). Data: the
  stored format, `{"format": 1, "host": H, "record": {DiskRecord}}` (`encode`/`decode` are
  the only code that knows it). Omap: `generation`, `host` and `instance`, copies of the
  record's fields that the compare-and-swap compares. The name is derived from the key, so
  a host reads its records by name and never lists the pool; a record whose contents name
  another key is a RecordError (a copied or misplaced object is never taken for this disk).
- `host.<host>.<shard>`: omap, the index of what one host owns; shard = sha256(instance)
  mod `shards` (16 by default: 200,000 keys, Ceph's large-omap warning, is then 3 million
  disks per host). Key: the record's object name; value: JSON with the instance, pool,
  volume, when the entry was written and a random nonce. `load_all` reads this host's
  shards, `for_instance` one shard, and then the records by name (batched aio reads).

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
  without a record: `load_all`/`for_instance` ignore it and remove it once it is older
  than `stale_after` (an entry younger than that may belong to a create still in flight);
  the removal is guarded by `omap_cmp` on the exact value read, so a create that rewrote
  the entry meanwhile keeps it. A loser of the race removes its own index entry at once
  (guarded the same way) when the winner is another host; when the winner is this same
  host the entry is the winner's and stays.
- Update (`put(rec, g)`): one op on the record; nothing to leave behind.
- Delete: 1. read the record (its instance names the index shard) and its index entry;
  2. remove the record, CAS-guarded; 3. remove the index entry, guarded by its value. A
  crash after 2 leaves an index entry without a record: found and removed as above.
- So a record never exists unlisted by its host's index (the index entry always comes
  first and goes last), and an index entry without a record is harmless and cleaned. The
  one exception: a creator paused between steps 2 and 3 for longer than `stale_after`
  could see its entry cleaned before its record lands; `stale_after` defaults to an hour,
  far above the op timeout that bounds each step.

Every RADOS write is durable when the OSD acknowledges it, so `durable` and `sync()` have
nothing to do here. Every wait is bounded: the client made by `connect` sets
`rados_osd_op_timeout` and `client_mount_timeout`, and every rados exception becomes a
StoreError (the cluster or the namespace cannot be used: the run stops) or a
ConflictError (another host or run changed the record), naming the pool and namespace.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from reconciler.drivers.host.store import (
    RELEASED,
    ConflictError,
    StoreError,
    StoreIdentity,
    invalid,
)
from reconciler.drivers.rbd.outage import CephUnreachable, Outage
from reconciler.model.errors import RecordError
from reconciler.model.record import BadRecord, DiskRecord, RecordKind
from reconciler.schema.bounded import load_json
from reconciler.schema.recordcheck import check_record

FORMAT = 1
DEFAULT_NAMESPACE = "reconciler"
DEFAULT_SHARDS = 16
DEFAULT_OP_TIMEOUT = 30.0  # seconds; rados_osd_op_timeout and client_mount_timeout
DEFAULT_HEARTBEAT_EXPIRY = 300.0  # ownership.heartbeatExpiry's default
DEFAULT_STALE_AFTER = 3600.0  # seconds before an index entry without a record is removed
IN_FLIGHT = 64  # aio reads at once: enough to hide the round trip, bounded memory
MAX_RECORD = 64 << 10  # bytes read per record; `put` refuses anything larger
STORE_OBJECT = "store"
HOSTS_OBJECT = "hosts"
HEARTBEATS_OBJECT = "heartbeats"
# An owner name no host identity can take (RELEASED, in store.py, is the other): cache
# entries are every host's, each clones from and references them (generation CAS only).
SHARED = "@shared"
BEAT_KEEP = 86400.0  # seconds a process's heartbeat key outlives its last beat
FENCE_FOR = (
    30 * 86400.0
)  # seconds a fenced client stays blocklisted (`ceph osd blocklist rm` ends it)
_OMAP_PAGE = 1000
_CAS_KEYS = ("generation", "host", "instance")
REF_PREFIX = "ref."  # a cache entry's references: omap keys of its record object


def _rados() -> Any:
    import rados  # Debian's python3-rados: a system dependency, imported only when used

    return rados


# -- names ------------------------------------------------------------------------------


def record_object(pool: str, volume: str) -> str:
    """The record's object name, derived from its key (a JSON list: unambiguous)."""
    digest = hashlib.sha256(json.dumps([pool, volume]).encode()).hexdigest()
    return f"rec.{digest[:32]}"


def claim_object(instance: str) -> str:
    """The instance's claim: which host owns all of its disks."""
    return f"inst.{hashlib.sha256(instance.encode()).hexdigest()[:32]}"


def shard_of(instance: str, shards: int) -> int:
    """The index shard of an instance: stable across hosts, runs and Python versions."""
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:8], "big") % shards


def index_object(host: str, shard: int) -> str:
    return f"host.{host}.{shard}"


# -- the stored format (the only code that knows it) ------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    host: str
    record: DiskRecord


def encode(record: DiskRecord, host: str) -> bytes:
    doc = {"format": FORMAT, "host": host, "record": record.model_dump(mode="json")}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(oid: str, data: bytes, where: str) -> Stored:
    """The record in object `oid`; RecordError if unreadable or if it names another key."""
    try:
        doc = load_json(data, what="its JSON")
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise RecordError(f"record object {oid} in {where} is not JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise RecordError(
            f"record object {oid} in {where} has stored format {doc.get('format')!r}, this "
            f"reconciler knows {FORMAT}: use a reconciler that knows it"
        )
    host = doc.get("host")
    if not isinstance(host, str) or not host:
        raise RecordError(f"record object {oid} in {where} names no owner host")
    try:
        rec = DiskRecord.model_validate(doc.get("record"))
    except ValidationError as e:
        raise RecordError(f"record object {oid} in {where} is unreadable ({invalid(e)})") from None
    if record_object(rec.pool, rec.volume) != oid:
        raise RecordError(
            f"record object {oid} in {where} describes {rec.pool}/{rec.volume}, whose record "
            f"is {record_object(rec.pool, rec.volume)}: it was copied or misplaced"
        )
    # Any client with the pool's caps can write this object: it is input (recordcheck).
    check_record(rec, rec.pool, rec.volume)
    return Stored(host, rec)


@dataclass(frozen=True, slots=True)
class Beat:
    host: str
    at: float
    addr: str


@dataclass(frozen=True, slots=True)
class IndexEntry:
    instance: str
    pool: str
    volume: str
    at: float  # time.time() when written, for the stale-entry grace
    raw: str  # the stored value, for omap_cmp when removing it

    @classmethod
    def new(cls, record: DiskRecord) -> IndexEntry:
        at = time.time()
        doc = {
            "instance": record.instance,
            "pool": record.pool,
            "volume": record.volume,
            "at": at,
            "nonce": secrets.token_hex(8),  # a rewrite of the entry always changes it
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return cls(record.instance, record.pool, record.volume, at, raw)

    @classmethod
    def parse(cls, raw: bytes) -> IndexEntry | None:
        try:
            text = raw.decode()
            doc = load_json(text, what="the entry")
            return cls(
                str(doc["instance"]), str(doc["pool"]), str(doc["volume"]), float(doc["at"]), text
            )
        except (ValueError, KeyError, TypeError):
            return None


# -- the client ---------------------------------------------------------------------------


def client_conf(op_timeout: float = DEFAULT_OP_TIMEOUT) -> dict[str, str]:
    """Options every client of the store gets: without them an op on a down OSD blocks
    forever and connect() to a down mon for 300 s (notes, section 6)."""
    if not (0 < op_timeout < math.inf):
        raise ValueError(f"op_timeout must be a finite number of seconds > 0, not {op_timeout}")
    t = f"{op_timeout:g}"
    return {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t}


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
        self.stale_after = stale_after
        self.op_timeout = op_timeout
        # Shared with the client's other users (the rbd driver): after a timeout, calls
        # fail at once naming it, for op_timeout seconds (drivers/ceph_outage.py).
        self.outage = outage
        self.heartbeat_expiry = heartbeat_expiry  # ownership.heartbeatExpiry
        self._on_close = on_close
        # The client (connect()'s own, or the caller's): for fencing and this client's
        # address; None: the store cannot fence (and its heartbeats name no address).
        self.cluster: Any = cluster
        self._registered = False
        self._registered_lock = threading.Lock()
        self.last_beat: float | None = None  # when this store last renewed the heartbeat
        self.where = f"Ceph pool {pool} namespace {namespace}"
        with self._errors("opening the pool"):
            self._io = open_ioctx()
        try:
            self._io.set_namespace(namespace)
            self._id, self.shards = self._open_store(shards)
        except BaseException:
            self._io.close()
            raise

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
        rados = _rados()
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

    # -- faults ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        rados = _rados()
        if self.outage is not None:
            try:
                self.outage.check()
            except CephUnreachable as e:
                raise StoreError(str(e)) from None
        try:
            yield
        except rados.Error as e:
            fault = self._fault(doing, e)
            if self.outage is not None and self._timed_out(e):
                self.outage.note(str(fault))
            raise fault from e

    @staticmethod
    def _timed_out(e: Exception) -> bool:
        code = getattr(e, "errno", None)
        return isinstance(e, _rados().TimedOut) or code in (errno.ETIMEDOUT, -errno.ETIMEDOUT)

    def _fault(self, doing: str, e: Exception) -> StoreError:
        rados = _rados()
        code = getattr(e, "errno", None)
        if isinstance(e, rados.TimedOut) or code in (errno.ETIMEDOUT, -errno.ETIMEDOUT):
            why = (
                f"timed out after {self.op_timeout:g} s (rados_osd_op_timeout); check the "
                "cluster's OSDs (`ceph -s`, `ceph osd stat`), then run again"
            )
        elif code in (errno.ESHUTDOWN, -errno.ESHUTDOWN):
            why = (
                f"refused: this client was fenced ({e}); another host took this host's "
                "instances over after its heartbeat expired (`ceph osd blocklist ls`). A new "
                "run is a new client and sees who owns each disk now"
            )
        elif isinstance(e, rados.PermissionError) or code in (errno.EPERM, errno.EACCES):
            why = f"permission denied ({e}); give the client rw caps on the pool and namespace"
        elif isinstance(e, rados.ObjectNotFound) and doing == "opening the pool":
            why = f"the pool does not exist ({e}); create it or fix the config"
        else:
            why = f"failed ({e}); run again, and check `ceph -s` if it fails again"
        return StoreError(f"{self.where}: {doing} {why}")

    # -- the store object -----------------------------------------------------------------

    def _open_store(self, shards: int) -> tuple[str, int]:
        rados = _rados()
        for _ in range(2):
            meta = self._omap(STORE_OBJECT, "format", "id", "shards")
            if meta is not None:
                break
            # Another host may create it first; then we read theirs.
            with self._errors("creating the store"), contextlib.suppress(rados.ObjectExists):
                self._create_exclusive(
                    STORE_OBJECT,
                    b"",
                    {"format": str(FORMAT), "id": str(uuid.uuid4()), "shards": str(shards)},
                )
        else:
            raise StoreError(f"{self.where}: object {STORE_OBJECT} vanished while opened")
        if meta.get("format") != str(FORMAT).encode():
            raise StoreError(
                f"{self.where}: object {STORE_OBJECT} has stored format "
                f"{meta.get('format')!r}, this reconciler knows {FORMAT}; use a reconciler "
                "that knows it"
            )
        try:
            return meta["id"].decode(), int(meta["shards"])
        except (KeyError, ValueError) as e:
            raise StoreError(f"{self.where}: object {STORE_OBJECT} is damaged ({e!r})") from None

    def identity(self) -> StoreIdentity:
        return StoreIdentity(self._id, self.where, self.host)

    # -- primitives -------------------------------------------------------------------------

    def _omap(self, oid: str, *keys: str) -> dict[str, bytes] | None:
        """Values of `keys` in `oid`'s omap; None if the object does not exist."""
        rados = _rados()
        with self._errors(f"reading {oid}"):
            try:
                with rados.ReadOpCtx() as rop:
                    it, _ = self._io.get_omap_vals_by_keys(rop, keys)
                    self._io.operate_read_op(rop, oid)
                    return dict(it)
            except rados.ObjectNotFound:
                return None

    def _omap_all(self, oid: str) -> dict[str, bytes]:
        """All of `oid`'s omap, page by page ({} if the object does not exist)."""
        return self._omap_pages(oid, f"reading index {oid}") or {}

    def _omap_pages(self, oid: str, doing: str) -> dict[str, bytes] | None:
        """All of `oid`'s omap, page by page; None if the object does not exist."""
        rados = _rados()
        out: dict[str, bytes] = {}
        after = ""
        while True:
            with self._errors(doing):
                try:
                    with rados.ReadOpCtx() as rop:
                        it, _ = self._io.get_omap_vals(rop, after, "", _OMAP_PAGE)
                        self._io.operate_read_op(rop, oid)
                        page = dict(it)
                except rados.ObjectNotFound:
                    return None
            out.update(page)
            if len(page) < _OMAP_PAGE:
                return out
            after = max(page)

    def _create_exclusive(self, oid: str, data: bytes, omap: dict[str, str]) -> None:
        rados = _rados()
        with rados.WriteOpCtx() as op:  # outside `with` the op is unallocated: segfault
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            self._io.set_omap(op, tuple(omap), tuple(v.encode() for v in omap.values()))
            self._io.operate_write_op(op, oid)

    def _read(self, oid: str) -> bytes | None:
        rados = _rados()
        with self._errors(f"reading record {oid}"):
            try:
                data: bytes = self._io.read(oid, MAX_RECORD, 0)
            except rados.ObjectNotFound:
                return None
        self._check_size(oid, data)
        return data

    def _check_size(self, oid: str, data: bytes) -> None:
        if len(data) >= MAX_RECORD:
            raise RecordError(
                f"record object {oid} in {self.where} is {MAX_RECORD} bytes or more, more than "
                "any record this reconciler writes: it was not written by this reconciler"
            )

    def _read_many(self, oids: list[str]) -> dict[str, bytes | None]:
        """Each object's data (None: missing), IN_FLIGHT aio reads at a time."""
        got: dict[int, bytes] = {}
        lock = threading.Lock()

        def done(completion: Any, data: bytes) -> None:  # runs in a librados thread
            with lock:
                got[id(completion)] = data

        out: dict[str, bytes | None] = {}
        pending: deque[tuple[str, Any]] = deque()
        failed: tuple[str, int] | None = None

        def finish() -> None:
            nonlocal failed
            oid, comp = pending.popleft()
            comp.wait_for_complete_and_cb()  # the callback has run, too
            ret = comp.get_return_value()
            with lock:
                data = got.pop(id(comp), b"")
            if ret == -errno.ENOENT:
                out[oid] = None
            elif ret < 0:
                failed = failed or (oid, ret)
            else:
                out[oid] = data

        try:
            for oid in oids:
                if len(pending) >= IN_FLIGHT:
                    finish()
                with self._errors(f"reading record {oid}"):
                    pending.append((oid, self._io.aio_read(oid, MAX_RECORD, 0, done)))
        finally:
            while pending:  # never leave a read in flight behind us
                finish()
        if failed is not None:
            oid, ret = failed
            err = OSError(-ret, f"{errno.errorcode.get(-ret, ret)} reading {oid}")
            raise self._fault(f"reading record {oid}", err)
        for oid, data in out.items():
            if data is not None:
                self._check_size(oid, data)
        return out

    # -- reads ------------------------------------------------------------------------------

    def _stored(self, pool: str, volume: str) -> Stored | None:
        oid = record_object(pool, volume)
        data = self._read(oid)
        return None if data is None else decode(oid, data, self.where)

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        stored = self._stored(pool, volume)
        return None if stored is None else stored.record

    def owner(self, pool: str, volume: str) -> str | None:
        """The host that owns the record of pool/volume (None: there is no record)."""
        stored = self._stored(pool, volume)
        return None if stored is None else stored.host

    def _index(self, host: str, shard: int) -> dict[str, IndexEntry | None]:
        """One index shard: record object name -> entry (None: unreadable entry)."""
        return {
            k: IndexEntry.parse(v) for k, v in self._omap_all(index_object(host, shard)).items()
        }

    def _load(
        self, host: str, shards: list[int], instance: str | None, clean: bool
    ) -> tuple[list[DiskRecord], list[BadRecord]]:
        """The records `host`'s index lists in `shards` (of `instance`, if given)."""
        listed: dict[str, tuple[int, IndexEntry | None]] = {}
        for shard in shards:
            for oid, entry in self._index(host, shard).items():
                if instance is None or (entry is not None and entry.instance == instance):
                    listed[oid] = (shard, entry)
        datas = self._read_many(sorted(listed))
        good: list[DiskRecord] = []
        bad: list[BadRecord] = []
        for oid, (shard, entry) in listed.items():
            data = datas.get(oid)
            if data is None:
                if clean and entry is not None and time.time() - entry.at >= self.stale_after:
                    self._unlist(shard, oid, entry, host)  # a crash after the index entry
                continue
            try:
                stored = decode(oid, data, self.where)
            except RecordError as e:
                where = (entry.pool, entry.volume) if entry else ("?", oid)
                bad.append(BadRecord(*where, str(e)))
                continue
            rec = stored.record
            if stored.host != host or (entry is not None and rec.instance != entry.instance):
                # Another host owns it (we lost a create race, or it was deleted and made
                # there since): not ours to report. Remove our entry, guarded by its value.
                if clean and entry is not None:
                    self._unlist(shard, oid, entry, host)
                continue
            good.append(rec)
        return good, bad

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]:
        """This host's records and the pool's cache entries, through their indexes (never
        by listing the pool)."""
        every = list(range(self.shards))
        good, bad = self._load(self.host, every, None, clean=True)
        cache_good, cache_bad = self._load(SHARED, [0], None, clean=True)
        return good + cache_good, bad + cache_bad

    def for_instance(self, instance: str) -> list[DiskRecord]:
        good, bad = self._load(self.host, [shard_of(instance, self.shards)], instance, True)
        if bad:
            raise RecordError(bad[0].error)
        return good

    def references(self, pool: str, volume: str) -> int:
        """Records of every host naming pool/volume as their cache entry. Reads every
        host's index and record: its cost grows with the namespace (a per-cache-entry
        reference index is the image cache's to keep)."""
        hosts = [*sorted(self._omap_all(HOSTS_OBJECT)), RELEASED]
        n = 0
        for host in hosts:
            good, _ = self._load(host, list(range(self.shards)), None, clean=False)
            n += sum(1 for r in good if r.pool == pool and r.backing == volume)
        return n

    # -- writes -----------------------------------------------------------------------------

    def _register(self) -> None:
        """Name this host in `hosts` (once per store object), so others find its index."""
        with self._registered_lock:
            if self._registered:
                return
            rados = _rados()
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
            with self._errors(f"registering host {self.host}"), rados.WriteOpCtx() as op:
                # Keep the first registration's time: only set the key where it is missing.
                op.omap_cmp(self.host, "", rados.LIBRADOS_CMPXATTR_OP_EQ)
                self._io.set_omap(op, (self.host,), (since,))
                try:
                    self._io.operate_write_op(op, HOSTS_OBJECT)
                except rados.ObjectNotFound:
                    self._create_idempotent_hosts(since)
                except rados.OSError as e:
                    if e.errno != errno.ECANCELED:  # already registered
                        raise
            self._registered = True

    def _create_idempotent_hosts(self, since: bytes) -> None:
        rados = _rados()
        with rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            self._io.set_omap(op, (self.host,), (since,))
            self._io.operate_write_op(op, HOSTS_OBJECT)

    def _unlist(self, shard: int, oid: str, entry: IndexEntry, holder: str | None = None) -> None:
        """Remove `oid` from `holder`'s index (default this host's) if its entry is still
        `entry`."""
        rados = _rados()
        ioid = index_object(holder or self.host, shard)
        with self._errors(f"cleaning index {ioid}"):
            try:
                with rados.WriteOpCtx() as op:
                    op.omap_cmp(oid, entry.raw, rados.LIBRADOS_CMPXATTR_OP_EQ)
                    self._io.remove_omap_keys(op, (oid,))
                    self._io.operate_write_op(op, ioid)
            except rados.ObjectNotFound:
                pass
            except rados.OSError as e:
                if e.errno != errno.ECANCELED:  # rewritten meanwhile: it is not stale
                    raise

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
        if expect_generation is None:
            self._create(record, oid, data)
        else:
            self._update(record, oid, data, expect_generation)

    def _create(self, record: DiskRecord, oid: str, data: bytes) -> None:
        rados = _rados()
        self._register()
        holder = self._holder(record)
        if holder == self.host:
            self._claim_instance(record.instance)
        shard = self._shard(holder, record.instance)
        entry = IndexEntry.new(record)
        # The index entry first: a record never exists unlisted by its host.
        self._list(holder, shard, oid, entry)
        try:
            with self._errors(f"creating record {oid}"):
                self._create_exclusive(oid, data, self._cas_fields(record))
        except StoreError as e:
            if not isinstance(e.__cause__, rados.ObjectExists):
                raise
            try:
                current = self._stored(record.pool, record.volume)
            except RecordError:
                current = None  # unreadable: our entry makes load_all report it
            if current is not None and current.host != holder:
                self._unlist(shard, oid, entry, holder)
            what = (
                "exists"
                if current is None
                else (f"exists (generation {current.record.generation}, host {current.host})")
            )
            raise ConflictError(
                f"record {record.pool}/{record.volume} in {self.where} already {what}, "
                "expected none: another reconciler created it"
            ) from None

    def _list(self, holder: str, shard: int, oid: str, entry: IndexEntry) -> None:
        rados = _rados()
        with self._errors(f"indexing {oid}"), rados.WriteOpCtx() as op:
            self._io.set_omap(op, (oid,), (entry.raw.encode(),))
            self._io.operate_write_op(op, index_object(holder, shard))

    def _shard(self, holder: str, instance: str) -> int:
        """The index shard of a record: cache entries, a few per image and template, all
        in one shard of SHARED's index; disks by a hash of their instance."""
        return 0 if holder == SHARED else shard_of(instance, self.shards)

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
        rados = _rados()
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
        rados = _rados()
        fields = self._cas_fields(record)
        try:
            with self._errors(f"updating record {oid}"), rados.WriteOpCtx() as op:
                self._guard(op, expect, record.instance, self._holder(record))
                op.write_full(data)
                self._io.set_omap(op, tuple(fields), tuple(v.encode() for v in fields.values()))
                self._io.operate_write_op(op, oid)
        except StoreError as e:
            if _refused(e):
                raise self._conflict(record.pool, record.volume, expect) from None
            raise

    def delete(
        self, pool: str, volume: str, expect_generation: int, *, durable: bool = True
    ) -> None:
        rados = _rados()
        oid = record_object(pool, volume)
        stored = self._stored(pool, volume)  # its instance names the index shard
        if stored is None or stored.host != self._holder(stored.record):
            raise self._conflict(pool, volume, expect_generation)
        shard = self._shard(stored.host, stored.record.instance)
        entry = self._index_entry(shard, oid, stored.host)
        try:
            with self._errors(f"deleting record {oid}"), rados.WriteOpCtx() as op:
                self._guard(op, expect_generation, None, stored.host)
                op.remove()
                self._io.operate_write_op(op, oid)
        except StoreError as e:
            if _refused(e):
                raise self._conflict(pool, volume, expect_generation) from None
            raise
        # The index entry last; a crash before this leaves an entry load_all cleans.
        if entry is not None:
            self._unlist(shard, oid, entry, stored.host)

    def _index_entry(self, shard: int, oid: str, holder: str) -> IndexEntry | None:
        values = self._omap(index_object(holder, shard), oid) or {}
        raw = values.get(oid)
        return None if raw is None else IndexEntry.parse(raw)

    # -- ownership: hosts hand instances to one another ---------------------------------

    def read_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Stored | BadRecord]:
        """The records of `keys` by name, whoever owns them (batched reads; a missing
        record is left out). How a host finds the records of instances its manifests
        name that another host made or owns: never by listing the pool."""
        oids = {record_object(p, v): (p, v) for p, v in keys}
        datas = self._read_many(sorted(oids))
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

    def beat(self, if_older_than: float | None = None) -> None:
        """Renew this process's heartbeat: other hosts take this host's instances only
        once its newest heartbeat is older than their `ownership.heartbeatExpiry`. Each
        process that writes beats under its own key (host and client address), so a host
        that is taken over can be fenced process by process (`fence`); this host's keys a
        day stale are removed as it beats. With `if_older_than`, nothing is written while
        this host's newest heartbeat is younger than that (a run that changes nothing)."""
        rados = _rados()
        at = time.time()
        beats = self._beats()
        if if_older_than is not None:
            newest = max((b.at for b in beats.values() if b.host == self.host), default=None)
            if newest is not None and at - newest < if_older_than:
                return
        addr = self._addr()
        value = json.dumps({"at": at, "pid": os.getpid(), "boot": _boot_id(), "addr": addr})
        stale = [
            key
            for key, beat in beats.items()
            if beat.host == self.host and key != self._beat_key(addr) and at - beat.at > BEAT_KEEP
        ]
        with self._errors(f"renewing the heartbeat of host {self.host}"), rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            self._io.set_omap(op, (self._beat_key(addr),), (value.encode(),))
            if stale:
                self._io.remove_omap_keys(op, tuple(stale))
            self._io.operate_write_op(op, HEARTBEATS_OBJECT)
        self.last_beat = at

    def _beat_key(self, addr: str) -> str:
        return f"{self.host} {addr}"

    def _addr(self) -> str:
        """This client's address (what `ceph osd blocklist` names); "" if unknown."""
        if self.cluster is None:
            return ""
        try:
            return str(self.cluster.get_addrs())
        except Exception:  # the binding's errors are not typed: an address is optional
            return ""

    def _beats(self) -> dict[str, Beat]:
        out: dict[str, Beat] = {}
        for key, raw in self._omap_all(HEARTBEATS_OBJECT).items():
            try:
                doc = load_json(raw, what="the heartbeat")
                out[key] = Beat(key.split(" ", 1)[0], float(doc["at"]), str(doc.get("addr", "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # unreadable: counts as no heartbeat (expired)
        return out

    def heartbeats(self) -> dict[str, float]:
        """Each host's newest heartbeat (time.time() of the host that wrote it). Hosts
        sharing a pool are expected to keep their clocks in step (NTP); the expiry,
        minutes by default, dwarfs the skew NTP leaves."""
        out: dict[str, float] = {}
        for beat in self._beats().values():
            out[beat.host] = max(out.get(beat.host, 0.0), beat.at)
        return out

    def fence(self, host: str) -> list[str]:
        """Make the cluster refuse every operation of `host`'s reconcilers (each address
        its heartbeats name) with `ceph osd blocklist add`, before its instances are taken:
        a process that was only paused then fails its next image or record operation
        instead of changing a disk it no longer owns. The addresses blocklisted."""
        if self.cluster is None:
            raise StoreError(
                f"{self.where}: cannot fence host {host}: this store has no cluster handle"
            )
        addrs = sorted({b.addr for b in self._beats().values() if b.host == host and b.addr})
        for addr in addrs:
            cmd = {
                "prefix": "osd blocklist",
                "blocklistop": "add",
                "addr": addr,
                "expire": FENCE_FOR,
            }
            ret, _, err = self.cluster.mon_command(json.dumps(cmd), b"")
            if ret != 0:
                raise StoreError(
                    f"{self.where}: cannot fence host {host} ({addr}): `ceph osd blocklist "
                    f"add` failed ({ret}: {err}); the client needs the mon cap `profile rbd`. "
                    "Its instances are not taken"
                )
        return addrs

    def release(self, pool: str, volume: str, expect_generation: int) -> None:
        """Let another host take this host's record of pool/volume (its manifest is gone
        here, and may have appeared there): a compare-and-swap from this host to RELEASED.
        The image is untouched."""
        self._move(pool, volume, expect_generation, self.host, RELEASED)

    def take(self, pool: str, volume: str, expect_generation: int, from_host: str) -> None:
        """Make this host the owner of a record that `from_host` released, or whose
        heartbeat expired: a compare-and-swap from `from_host` to this host. A host whose
        heartbeat expired is fenced first (`fence`), so if it was only paused its next
        operation fails; and its next record write would fail its guard anyway."""
        self._move(pool, volume, expect_generation, from_host, self.host)

    def _move(self, pool: str, volume: str, expect: int, old: str, new: str) -> None:
        """Change a record's owner from `old` to `new`, its generation + 1. Order, so no
        record is ever unlisted by its owner: 1. list it in `new`'s index; 2. the record,
        guarded by generation, owner and instance; 3. unlist it from `old`'s index. A crash
        after 1 or 2 leaves an entry whose record another host owns: `_load` ignores it and
        the index's own host removes it."""
        rados = _rados()
        oid = record_object(pool, volume)
        stored = self._stored(pool, volume)
        if stored is None or stored.host != old or stored.record.generation != expect:
            raise self._conflict(pool, volume, expect, old)
        if old not in (RELEASED, self.host) and new == self.host:
            self.fence(old)  # taken from a host that is gone (its heartbeat expired)
        rec = stored.record.model_copy(update={"generation": expect + 1})
        shard = shard_of(rec.instance, self.shards)
        old_entry = self._index_entry(shard, oid, old)
        if new != RELEASED:
            self._register()
            # The claim before the record: this host owns the instance before any disk of
            # it, so a crash in between leaves a record the next run takes again.
            self._move_claim(rec.instance, new, only_from=None)
        self._list(new, shard, oid, IndexEntry.new(rec))
        fields = self._cas_fields(rec, new)
        try:
            with self._errors(f"handing record {oid} to {new}"), rados.WriteOpCtx() as op:
                self._guard(op, expect, rec.instance, old)
                op.write_full(encode(rec, new))
                self._io.set_omap(op, tuple(fields), tuple(v.encode() for v in fields.values()))
                self._io.operate_write_op(op, oid)
        except StoreError as e:
            if _refused(e):
                raise self._conflict(pool, volume, expect, old) from None
            raise
        if old_entry is not None:
            self._unlist(shard, oid, old_entry, old)
        if new == RELEASED:
            # The claim after the record: a crash in between leaves the claim this host's,
            # and the host that takes the record takes the claim with it.
            self._move_claim(rec.instance, RELEASED, only_from=self.host)

    # -- instance claims: all of an instance's disks have one owner ------------------------
    #
    # Object `inst.<sha256 of instance>` (omap `host`, `instance`), created exclusively
    # before a host's first record of the instance. Two hosts racing on one instance each
    # race per disk record too; without the claim each could win some of its disks. A host
    # takes the claim with a record (take), releases it after its records (release), or
    # takes it from a host that made it and then was gone (its heartbeat expired: fenced
    # first). Claims of deleted instances stay (a few bytes each).

    def _claim_owner(self, oid: str) -> str | None:
        got = self._omap(oid, "host")
        if got is None:
            return None
        return got.get("host", b"").decode(errors="replace")

    def _claim_instance(self, instance: str) -> None:
        rados = _rados()
        oid = claim_object(instance)
        for _ in range(5):
            owner = self._claim_owner(oid)
            if owner == self.host:
                return
            if owner is None:
                with self._errors(f"claiming instance {instance}"):
                    try:
                        self._create_exclusive(oid, b"", {"host": self.host, "instance": instance})
                        return
                    except rados.ObjectExists:
                        continue  # another host claimed it first: read whose it is
            if owner == RELEASED or self._gone(owner or ""):
                if owner != RELEASED:
                    self.fence(owner or "")
                if self._cas_claim(oid, owner or "", self.host):
                    return
                continue
            raise ConflictError(
                f"instance {instance} in {self.where} is owned by host {owner}: host "
                f"{self.host} makes none of its disks until that host releases it"
            )
        raise ConflictError(f"instance {instance} in {self.where}: its claim keeps changing")

    def claimants(self, instances: list[str]) -> dict[str, str]:
        """Who has claimed each of `instances` (left out: no claim yet). How a plan knows
        that a disk without a record yet belongs to an instance another host owns: its
        create would be refused (`_claim_instance`), so it is planned as owned elsewhere."""
        out: dict[str, str] = {}
        for instance in instances:
            owner = self._claim_owner(claim_object(instance))
            if owner is not None:
                out[instance] = owner
        return out

    def _gone(self, host: str) -> bool:
        beat = self.heartbeats().get(host)
        return beat is None or time.time() - beat >= self.heartbeat_expiry

    def _cas_claim(self, oid: str, expect: str, new: str) -> bool:
        rados = _rados()
        try:
            with self._errors(f"handing claim {oid} to {new}"), rados.WriteOpCtx() as op:
                op.omap_cmp("host", expect, rados.LIBRADOS_CMPXATTR_OP_EQ)
                self._io.set_omap(op, ("host",), (new.encode(),))
                self._io.operate_write_op(op, oid)
        except StoreError as e:
            if _refused(e):
                return False
            raise
        return True

    def _move_claim(self, instance: str, new: str, *, only_from: str | None) -> None:
        """Make `new` the instance's claimant (from whoever has it, or only from
        `only_from`); a missing claim is made."""
        rados = _rados()
        oid = claim_object(instance)
        for _ in range(5):
            owner = self._claim_owner(oid)
            if owner == new or (only_from is not None and owner not in (None, only_from)):
                return
            if owner is None:
                with self._errors(f"claiming instance {instance}"):
                    try:
                        self._create_exclusive(oid, b"", {"host": new, "instance": instance})
                        return
                    except rados.ObjectExists:
                        continue
            if self._cas_claim(oid, owner or "", new):
                return
        raise ConflictError(f"instance {instance} in {self.where}: its claim keeps changing")

    # -- a cache entry's references (the rbd driver's image cache) -----------------------
    #
    # Omap keys `ref.<volume>` of the entry's record object, one per disk made from it, so
    # hosts add theirs without a compare-and-swap on the generation (which parallel clones
    # of one entry would keep failing). Adding them and collecting the entry exclude each
    # other by the entry's lease (drivers/rados_locks.py: shared to add, exclusive to
    # collect). The generation CAS of put/delete does not touch these keys; deleting the
    # record removes them with it.

    def add_reference(self, pool: str, volume: str, ref: str) -> None:
        """Add `ref` to the references of the record pool/volume (a cache entry); raises
        ConflictError if the record is missing (never creates it)."""
        rados = _rados()
        oid = record_object(pool, volume)
        try:
            with self._errors(f"adding reference {ref} to {oid}"), rados.WriteOpCtx() as op:
                # The record must exist (omap_cmp on a missing object fails with ENOENT;
                # a record's generation is never the empty string).
                op.omap_cmp("generation", "", rados.LIBRADOS_CMPXATTR_OP_GT)
                self._io.set_omap(op, (REF_PREFIX + ref,), (self.host.encode(),))
                self._io.operate_write_op(op, oid)
        except StoreError as e:
            if _refused(e):
                raise ConflictError(
                    f"cache entry {pool}/{volume} in {self.where} is missing; it is made "
                    "again on the next try"
                ) from None
            raise

    def drop_reference(self, pool: str, volume: str, ref: str) -> None:
        """Remove `ref` from the references of pool/volume (gone already: fine)."""
        rados = _rados()
        oid = record_object(pool, volume)
        with self._errors(f"dropping reference {ref} from {oid}"), rados.WriteOpCtx() as op:
            self._io.remove_omap_keys(op, (REF_PREFIX + ref,))
            with contextlib.suppress(rados.ObjectNotFound):
                self._io.operate_write_op(op, oid)

    def reference_names(self, pool: str, volume: str) -> dict[str, str] | None:
        """The references of pool/volume (volume -> host that added it); None if there is
        no record."""
        oid = record_object(pool, volume)
        omap = self._omap_pages(oid, f"reading references of {oid}")
        if omap is None:
            return None
        return {
            k[len(REF_PREFIX) :]: v.decode(errors="replace")
            for k, v in omap.items()
            if k.startswith(REF_PREFIX)
        }

    def check_writable(self) -> None:
        """A real, harmless write (this host's registration), so a read-only client or a
        full cluster stops a run before its first change."""
        self._registered = False
        self._register()

    def sync(self) -> None:
        """Nothing to do: every acknowledged RADOS write is already durable."""

    def close(self) -> None:
        try:
            self._io.close()
        finally:
            if self._on_close is not None:
                self._on_close()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _refused(e: StoreError) -> bool:
    """Whether a guarded write failed its guard (omap_cmp: ECANCELED; or no object)."""
    rados = _rados()
    cause = e.__cause__
    if isinstance(cause, rados.ObjectNotFound):
        return True
    return isinstance(cause, rados.OSError) and cause.errno == errno.ECANCELED
