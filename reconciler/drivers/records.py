"""The records of a session's pools, each read and written where its pool's driver keeps it.

DESIGN: a driver owns its record store. File pools keep their records in the host's
SQLite database; an rbd pool keeps them in RADOS, beside its images, shared by every host
that uses the pool. `Records` is the one object above drivers/ that reads and writes
records: it asks each pool's driver for its store (`PoolDriver.record_store()`; None means
the host's database) and routes every call by pool, so the planner, the executor and the
CLI never know where a record lives.

A store a driver opens (a connection to a cluster) is opened on first use, not when the
session starts, so a dry run over file pools never waits on an unreachable cluster; a
pool whose store cannot be opened or read is reported as that pool's error by `load`,
and the other pools go on (`PoolStoreError`). The host's database failing stops the run,
as before (StoreError).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.drivers.host.store import (
    RELEASED,
    RecordStore,
    SharedRecordStore,
    SqliteRecordStore,
    StoreError,
    StoreIdentity,
)
from reconciler.model.errors import RecordError
from reconciler.model.observed import Holder
from reconciler.model.record import BadRecord, DiskRecord


class PoolStoreError(StoreError):
    """The record store of one pool (not the host's database) cannot be used."""

    def __init__(self, pool: str, message: str) -> None:
        super().__init__(message)
        self.pool = pool


@dataclass
class Loaded:
    """Every readable record, the unreadable ones, and the pools whose store failed."""

    records: list[DiskRecord]
    bad: list[BadRecord]
    failed: dict[str, str]  # pool -> why its records could not be read


class Records:
    """RecordStore methods over the stores of all pools, routed by pool."""

    def __init__(
        self,
        local: SqliteRecordStore,
        openers: Mapping[str, Callable[[], RecordStore | None]],
    ) -> None:
        """`openers` gives, per pool, a callable returning the pool's own store (opened
        on first call) or None for the host's database."""
        self.local = local
        self._openers = dict(openers)
        self._open: dict[str, RecordStore] = {}
        self._lock = threading.Lock()

    # -- routing ----------------------------------------------------------------------

    def store_for(self, pool: str) -> RecordStore:
        """The store that keeps `pool`'s records; PoolStoreError if it cannot be opened."""
        opener = self._openers.get(pool)
        if opener is None:
            return self.local
        with self._lock:
            if pool in self._open:
                return self._open[pool]
            try:
                store = opener()
            except RecordError as e:
                raise PoolStoreError(pool, f"pool {pool}: {e}") from e
            if store is None:
                self._openers.pop(pool)
                return self.local
            self._open[pool] = store
            return store

    def own_pools(self) -> list[str]:
        """Pools whose records a store of their own may keep (not the host's database)."""
        return sorted(self._openers)

    def _stores(self, pools: Iterable[str]) -> list[tuple[RecordStore, list[str]]]:
        """Distinct stores of `pools`, each with the pools it serves; the local store is
        always first (it may hold records of pools no longer in the config)."""
        out: list[tuple[RecordStore, list[str]]] = [(self.local, [])]
        for pool in pools:
            store = self.store_for(pool)
            for s, served in out:
                if s is store:
                    served.append(pool)
                    break
            else:
                out.append((store, [pool]))
        return out

    def _is_local(self, pool: str) -> bool:
        """Whether `pool`'s records live in the host's database (after `_resolve`)."""
        return pool not in self._openers

    def _resolve(self) -> dict[str, str]:
        """Ask every pool's driver for its store; the pools whose store failed, and why.
        Afterwards `_openers` names only pools with a store of their own."""
        failed: dict[str, str] = {}
        for pool in self.own_pools():
            try:
                self.store_for(pool)
            except StoreError as e:
                failed[pool] = _pool_message(pool, e)
        return failed

    # -- reads ------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Every record of every pool: the host's database (StoreError stops the run),
        then each pool's own store (a failure marks that pool, the rest go on)."""
        failed = self._resolve()
        records, bad = self.local.load_all()
        kept: list[DiskRecord] = []
        for r in records:
            if self._is_local(r.pool):
                kept.append(r)
            else:
                bad.append(_misplaced(r))
        for store, pools in self._stores(p for p in self.own_pools() if p not in failed)[1:]:
            try:
                got, got_bad = store.load_all()
            except StoreError as e:
                failed.update({p: _pool_message(p, e) for p in pools})
                continue
            kept.extend(r for r in got if r.pool in pools)
            bad.extend(b for b in got_bad if b.pool in pools)
        return Loaded(kept, bad, failed)

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]:
        """Every record; any store's failure raises (for callers that need them all)."""
        loaded = self.load()
        if loaded.failed:
            pool, why = sorted(loaded.failed.items())[0]
            raise PoolStoreError(pool, why)
        return loaded.records, loaded.bad

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        return self.store_for(pool).get(pool, volume)

    def references(self, pool: str, volume: str) -> int:
        return self.store_for(pool).references(pool, volume)

    def for_instance_by_pool(self, instance: str) -> tuple[list[DiskRecord], dict[str, str]]:
        """An instance's records in every store, and the pools whose store failed."""
        failed = self._resolve()
        out = [r for r in self.local.for_instance(instance) if self._is_local(r.pool)]
        own = self._stores(p for p in self.own_pools() if p not in failed)[1:]
        out.extend(self._own_records(instance, own, failed))
        return out, failed

    @staticmethod
    def _own_records(
        instance: str, own: list[tuple[RecordStore, list[str]]], failed: dict[str, str]
    ) -> list[DiskRecord]:
        """An instance's records in the pools' own stores `own`; a store that fails adds
        its pools to `failed` (a RecordError passes)."""
        out: list[DiskRecord] = []
        for store, pools in own:
            try:
                got = store.for_instance(instance)
            except StoreError as e:
                failed.update({p: _pool_message(p, e) for p in pools})
                continue
            out.extend(r for r in got if r.pool in pools)
        return out

    def for_instances_by_pool(
        self, instances: Sequence[str]
    ) -> dict[str, tuple[list[DiskRecord], dict[str, str]] | RecordError]:
        """for_instance_by_pool() of each of `instances`: the host's database read once
        for them all (one transaction, not a query per instance), each pool's own store
        asked per instance as before. An instance one of whose records cannot be parsed
        gets that RecordError, as for_instance_by_pool raises it."""
        failed = self._resolve()
        own = self._stores(p for p in self.own_pools() if p not in failed)[1:]
        out: dict[str, tuple[list[DiskRecord], dict[str, str]] | RecordError] = {}
        for instance, got in self.local.for_instances(instances).items():
            if isinstance(got, RecordError):
                out[instance] = got
                continue
            records = [r for r in got if self._is_local(r.pool)]
            why = dict(failed)
            try:
                records.extend(self._own_records(instance, own, why))
            except RecordError as e:
                out[instance] = e
                continue
            out[instance] = (records, why)
        return out

    def for_instance(self, instance: str) -> list[DiskRecord]:
        records, failed = self.for_instance_by_pool(instance)
        if failed:
            pool, why = sorted(failed.items())[0]
            raise PoolStoreError(pool, why)
        return records

    # -- hosts sharing a pool -----------------------------------------------------------

    def shared(self, pool: str) -> SharedRecordStore | None:
        """`pool`'s store if many hosts share it, else None."""
        if pool not in self._openers:
            return None
        store = self.store_for(pool)
        return store if isinstance(store, SharedRecordStore) else None

    def holds(
        self,
        wanted: Mapping[str, Mapping[str, str]],
        known: Iterable[tuple[str, str]],
        expiry: float,
    ) -> Holds:
        """For the volumes of shared pools a manifest here names (`wanted`: pool ->
        volume -> instance) that are not among this host's records (`known`), read their
        records by name: another host's hold on them (free once released, or once that
        host's heartbeat is `expiry` seconds old), or this host's own record that its index
        lost (a crash while a record was handed over). A volume with no record at all is
        held too when a live host has claimed its instance: that host owns all of the
        instance's disks, so a create here would be refused. Pools whose store fails are
        named."""
        out = Holds()
        have = set(known)
        for pool, volumes in sorted(wanted.items()):
            keys = sorted({(pool, v) for v in volumes} - have)
            if not keys:
                continue
            try:
                store = self.shared(pool)
                if store is None:
                    continue
                found = store.read_many(keys)
                unmade = [v for p, v in keys if (p, v) not in found]
                claims = {
                    i: h
                    for i, h in store.claimants(sorted({volumes[v] for v in unmade})).items()
                    if h not in (store.host, RELEASED)
                }
                beats = store.heartbeats() if found or claims else {}
            except StoreError as e:
                out.failed[pool] = _pool_message(pool, e)
                continue
            now = time.time()
            for volume in unmade:
                claimant = claims.get(volumes[volume])
                if claimant is None:
                    continue
                held = _claim_holder(claimant, volumes[volume], beats, now, expiry)
                if held is not None:
                    out.held.setdefault(pool, {})[volume] = held
            for (p, volume), got in found.items():
                if isinstance(got, BadRecord):
                    out.bad.append(got)
                    continue
                if got.host == store.host:
                    out.records.append(got.record)
                    continue
                if got.host.startswith("@") and got.host != RELEASED:
                    continue  # a cache entry: every host's, among the loaded records
                out.held.setdefault(p, {})[volume] = _holder(got, beats, now, expiry)
        return out

    def beat(self, *, if_older_than: float | None = None) -> None:
        """Renew this host's heartbeat in every shared store (once per store); a store
        that fails is left for its pool's error. `if_older_than`: see
        RadosRecordStore.beat (for runs that write nothing)."""
        done: list[SharedRecordStore] = []
        for pool in self.own_pools():
            with contextlib.suppress(StoreError):
                store = self.shared(pool)
                if store is not None and not any(store is d for d in done):
                    done.append(store)
                    store.beat(if_older_than)

    def take(self, pool: str, volume: str, expect_generation: int, from_host: str) -> None:
        self._must_share(pool).take(pool, volume, expect_generation, from_host)

    def release(self, pool: str, volume: str, expect_generation: int) -> None:
        self._must_share(pool).release(pool, volume, expect_generation)

    def released_for_instance(self, pool: str, instance: str) -> list[DiskRecord]:
        """A shared pool's records of `instance` that no host holds."""
        return [r for r in self._must_share(pool).released_for_instance(instance) if r.pool == pool]

    def _must_share(self, pool: str) -> SharedRecordStore:
        store = self.shared(pool)
        if store is None:
            raise StoreError(f"pool {pool}: its records are not shared by hosts")
        return store

    def identity(self) -> StoreIdentity:
        """The host's database's identity (file pools' ownership names it)."""
        return self.local.identity()

    # -- writes -----------------------------------------------------------------------

    def put(
        self, record: DiskRecord, expect_generation: int | None, *, durable: bool = True
    ) -> None:
        self.store_for(record.pool).put(record, expect_generation, durable=durable)

    def delete(
        self, pool: str, volume: str, expect_generation: int, *, durable: bool = True
    ) -> None:
        self.store_for(pool).delete(pool, volume, expect_generation, durable=durable)

    def check_writable(self, pools: Iterable[str] | None = None) -> None:
        """Raise StoreError now if a write to the stores of `pools` (default: the host's
        database only) would fail."""
        for store, _ in self._stores(pools or ()):
            store.check_writable()

    def sync(self) -> None:
        """Make every write durable in every store opened so far."""
        first: StoreError | None = None
        for store in [self.local, *self._distinct_open()]:
            try:
                store.sync()
            except StoreError as e:
                first = first or e
        if first is not None:
            raise first

    def _distinct_open(self) -> list[RecordStore]:
        out: list[RecordStore] = []
        for s in self._open.values():
            if not any(s is o for o in out):
                out.append(s)
        return out

    def close(self) -> None:
        """Close the stores the drivers opened (the session closes the host's database)."""
        with self._lock:
            stores = self._distinct_open()
            self._open.clear()
        for s in stores:
            # Closing: nothing left to lose, and the run's own error comes first.
            with contextlib.suppress(StoreError):
                s.close()


@dataclass
class Holds:
    """What `Records.holds` found."""

    held: dict[str, dict[str, Holder]] = field(default_factory=dict)  # pool -> volume ->
    records: list[DiskRecord] = field(default_factory=list)  # this host's, found by name
    bad: list[BadRecord] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _holder(got: Any, beats: Mapping[str, float], now: float, expiry: float) -> Holder:
    gen = got.record.generation
    if got.host == RELEASED:
        return Holder(got.host, gen, True, "no host: its owner released it")
    beat = beats.get(got.host)
    if beat is None:
        return Holder(got.host, gen, True, f"host {got.host}, which has no heartbeat")
    age = now - beat
    if age >= expiry:
        why = f"host {got.host}, whose heartbeat expired {age:.0f} s ago (limit {expiry:g} s)"
        return Holder(got.host, gen, True, why)
    return Holder(got.host, gen, False, f"host {got.host} (heartbeat {max(age, 0):.0f} s ago)")


def _claim_holder(
    host: str, instance: str, beats: Mapping[str, float], now: float, expiry: float
) -> Holder | None:
    """The hold of a live host's claim on a disk of `instance` that has no record yet;
    None when that host is gone (apply's create fences it and takes the claim, as a
    take-over of its records does)."""
    beat = beats.get(host)
    if beat is None or now - beat >= expiry:
        return None
    age = max(now - beat, 0)
    why = f"host {host} (heartbeat {age:.0f} s ago), which has claimed instance {instance}"
    # No record to take over: generation 0 names none (never used, the hold is not free).
    return Holder(host, 0, False, why)


def _misplaced(r: DiskRecord) -> BadRecord:
    pool = r.pool
    return BadRecord(
        pool,
        r.volume,
        f"this record is in the host's records database, but pool {pool} keeps its records "
        "in a store of its own (the pool's backend changed in the config?); it is not used",
    )


def _pool_message(pool: str, e: StoreError) -> str:
    text = str(e)
    return text if text.startswith(f"pool {pool}:") else f"pool {pool}: {text}"
