"""One reconcile: load, observe, plan; and the pieces apply needs (drivers, re-planning)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from reconciler.control import status
from reconciler.diff import PlanOptions, plan
from reconciler.diff.desired import build_desired
from reconciler.drivers.api import Encrypts, ManagingDriver, Snapshots, implements
from reconciler.drivers.host import freeze
from reconciler.drivers.host.domains import Attachments
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.ownership import ManagedElsewhere
from reconciler.drivers.host.store import SqliteRecordStore, StoreError, open_store
from reconciler.drivers.records import Records
from reconciler.drivers.registry import driver_for, managing
from reconciler.model import (
    Action,
    Desired,
    DesiredInstance,
    FailedInput,
    Observed,
    ObservedPool,
    Plan,
)
from reconciler.model.errors import PoolError, ReconcileError, RecordError
from reconciler.model.naming import snapshot_name, volume_name
from reconciler.model.record import BadRecord, DiskRecord, RecordKind
from reconciler.schema.common import Backend
from reconciler.schema.config import Config
from reconciler.schema.manifest import ImageSource, SnapshotSource
from reconciler.schema.manifestdir import ManifestLoad, load_manifests
from reconciler.schema.recordcheck import is_entry_name, validate
from reconciler.schema.speed.mcache import ManifestCache

if TYPE_CHECKING:
    from reconciler.apply.executor import Executor
    from reconciler.apply.preconditions import Replanner


@dataclass(frozen=True)
class InstanceRecords:
    """One instance's checked records (and its entries'), those refused, and the pools
    whose store could not be read (pool -> why)."""

    records: tuple[DiskRecord, ...]
    refused: tuple[BadRecord, ...]
    unreadable: dict[str, str]


@dataclass
class Session:
    config: Config
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        self.local_store: SqliteRecordStore = open_store(
            self.config.state_dir(), self.config.state.lock_timeout
        )
        status.tighten(self.config.state_dir())  # the status database beside the records
        self.conns = Connections(reconnect_timeout=self.config.libvirt.reconnect_timeout)
        self.drivers = {
            name: driver_for(name, pc, self.conns, self.local_store, self.config)
            for name, pc in sorted(self.config.pools.items())
        }
        # Every record is read and written through this: each pool's driver says where.
        self.store = Records(self.local_store, {n: d.record_store for n, d in self.drivers.items()})
        self.desired = Desired(())
        self._loading: ManifestLoad | None = None

    def close(self) -> None:
        self._end_loading()
        try:
            self.store.close()
            for d in self.drivers.values():
                d.close()  # a Ceph client and its leases' renewer: no thread outlives this
            self.conns.close()
        finally:
            self.local_store.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, paths: Sequence[str]) -> Desired:
        self._load(paths, observe=False)
        return self.desired

    def load_and_observe(self, paths: Sequence[str]) -> Observed:
        """load() and observe() together: while a forked worker parses manifests (a large
        run without the manifest cache, see ManifestLoad), this process observes the pools
        and reads the records, then parses what the worker has not taken. Manifests and
        pools are read at different moments in either order; apply checks every action's
        precondition again before it acts."""
        observed = self._load(paths, observe=True)
        assert observed is not None
        return observed

    def _load(self, paths: Sequence[str], *, observe: bool) -> Observed | None:
        self._end_loading()
        cache = ManifestCache(self.config.state_dir() / "manifest-cache.json")
        loading = ManifestLoad(paths, self.config, cache)
        try:
            observed = self._observe_pools() if observe else None
            loaded, failed = loading.finish()
        except BaseException:
            loading.close()
            raise
        # Kept until close() or the next load: its worker may still be writing the cache.
        self._loading = loading
        self.desired = self._with_entries(build_desired(loaded, failed, self.config.pools))
        return None if observed is None else self._with_holds(observed, self.desired)

    def _end_loading(self) -> None:
        if self._loading is not None:
            self._loading.close()
            self._loading = None

    def _with_entries(self, desired: Desired) -> Desired:
        return with_entries(desired, self.managing_drivers())

    def observe(self, desired: Desired | None = None) -> Observed:
        """The pools, the records, and, in pools many hosts share, the records of the
        disks `desired` (default: the loaded manifests) names that other hosts hold."""
        return self._with_holds(self._observe_pools(), self.desired if desired is None else desired)

    def _observe_pools(self) -> Observed:
        # Volumes before records: a record is written before its volume is made, so a volume
        # seen here always has its record below, even while another reconciler is creating.
        pools = {name: d.observe() for name, d in self.drivers.items()}
        loaded = self.store.load()
        # The stores checked each record as they read it (recordcheck.check_record).
        records, refused = validate(loaded.records, self.pool_backends(), checked=True)
        bad = loaded.bad + refused
        for name, why in loaded.failed.items():
            if pools[name].error is None:  # the pool's own error, if any, says more
                pools[name] = ObservedPool(name, None, why)
        by_pool: dict[str, list[DiskRecord]] = {}
        for r in records:
            by_pool.setdefault(r.pool, []).append(r)
        pools = {
            name: with_secrets(
                with_migration_facts(
                    self.drivers[name].check_headers(p, by_pool.get(name, [])),
                    self.drivers[name].as_managing(),
                    [r.volume for r in by_pool.get(name, [])],
                ),
                self.drivers[name].as_managing(),
                by_pool.get(name, []),
            )
            for name, p in pools.items()
        }
        for name in sorted(by_pool.keys() - pools.keys()):
            pools[name] = ObservedPool(
                name, None, "the pool is not in the config (records name it)"
            )
        return Observed(pools, tuple(records), tuple(bad))

    def _with_holds(self, observed: Observed, desired: Desired) -> Observed:
        wanted: dict[str, dict[str, str]] = {}
        for inst in desired.instances:
            for d in inst.disks:
                wanted.setdefault(d.spec.pool, {})[d.volume] = d.instance
        known = [r.key() for r in observed.records]
        known += [(b.pool, b.volume) for b in observed.bad_records]
        pools, records, bad = self._share(dict(observed.pools), wanted, known)
        return Observed(pools, observed.records + tuple(records), observed.bad_records + tuple(bad))

    def _share(
        self,
        pools: dict[str, ObservedPool],
        wanted: Mapping[str, Mapping[str, str]],
        known: Sequence[tuple[str, str]],
    ) -> tuple[dict[str, ObservedPool], list[DiskRecord], list[BadRecord]]:
        """Mark the pools many hosts share, with the holds other hosts have on the disks
        `wanted` names (pool -> volume -> instance, Records.holds); a pool whose store
        fails gets that error."""
        holds = self.store.holds(
            {p: v for p, v in wanted.items() if p in pools and pools[p].volumes is not None},
            known,
            self.config.ownership.heartbeat_expiry,
        )
        for name, p in pools.items():
            if p.volumes is None:
                continue
            if name in holds.failed:
                pools[name] = ObservedPool(name, None, holds.failed[name])
                continue
            try:
                shared = self.store.shared(name) is not None
            except StoreError as e:
                pools[name] = ObservedPool(name, None, str(e))
                continue
            if shared:
                pools[name] = dataclasses.replace(p, shared=True, held=holds.held.get(name, {}))
        return pools, holds.records, holds.bad

    def plan(self, observed: Observed | None = None) -> Plan:
        """Plan the loaded manifests against `observed`, or against the pools as they are."""
        seen = self.observe() if observed is None else observed
        return self._asking_agents(seen, lambda o: plan(self.desired, o, self.options))

    def _asking_agents(self, observed: Observed, make: Callable[[Observed], Plan]) -> Plan:
        """`make(observed)`, made again with the guest agents' answers where it takes a
        snapshot of disks a running domain uses (drivers/host/freeze.py): agents are asked
        only then, and the plan says whether each snapshot is frozen or crash-consistent."""
        first = make(observed)
        need: dict[str, set[str]] = {}
        for a in first.actions:
            if a.snapshot is not None and a.snapshot.domains:
                need.setdefault(a.pool, set()).update(a.snapshot.domains)
        if not need or observed.agents:
            return first
        agents: dict[str, bool] = {}
        for pool, domains in sorted(need.items()):
            pc = self.config.pools.get(pool)
            if pc is not None:
                agents.update(freeze.agents_answering(self.conns, pc.uri, domains))
        if not any(agents.values()):
            return first  # as planned: crash-consistent
        return make(dataclasses.replace(observed, agents=agents))

    def managing_drivers(self) -> dict[str, ManagingDriver]:
        return managing(self.drivers)

    def plan_instance(
        self,
        instance: str,
        wanted: Sequence[DesiredInstance],
        failed: Sequence[FailedInput] = (),
        options: PlanOptions | None = None,
        checked: InstanceRecords | None = None,
        attachments: dict[str, Attachments] | None = None,
    ) -> Plan:
        """Plan one instance against its fresh records (`checked`, else read now) and the
        volumes it names: what it costs grows with the instance, not with the pools (the
        loop, apply's re-plan, and `reconcile disks`). `attachments`, if given, keeps each
        pool's domains as first listed here, for the next instances planned with it: a
        command that looks at many instances at one moment lists them once, not once per
        instance (`reconcile disks` of 1,000 instances spent half its time listing), and
        checks who manages the pool once, when it lists them (a file read per instance
        was a tenth of the rest)."""
        got = checked if checked is not None else self.instance_records(instance, wanted)
        records, refused, unreadable = list(got.records), list(got.refused), got.unreadable
        names: dict[str, set[str]] = {p: set() for p in unreadable}
        for r in records:
            names.setdefault(r.pool, set()).add(r.volume)
        for inst in wanted:
            for d in inst.disks:
                names.setdefault(d.spec.pool, set()).add(d.volume)
                if d.entry is not None and d.spec.pool not in unreadable:
                    names[d.spec.pool].add(d.entry)
        drivers = self.managing_drivers()
        pools = {}
        for pool, vols in names.items():
            drv = drivers.get(pool)
            if pool in unreadable:
                pools[pool] = ObservedPool(pool, None, unreadable[pool])
                continue
            if drv is None:
                why = self.drivers[pool].observe().error if pool in self.drivers else None
                pools[pool] = ObservedPool(pool, None, why or "no driver")
                continue
            try:
                if attachments is None or pool not in attachments:
                    drv.check_owner()  # a pool in `attachments` was checked when listed
                pools[pool] = observe_managed(pool, drv, vols, records, seen=attachments)
            except PoolError as e:
                pools[pool] = ObservedPool(
                    pool, None, str(e), managed_elsewhere=isinstance(e, ManagedElsewhere)
                )
            except OSError as e:
                pools[pool] = ObservedPool(pool, None, f"{e.filename}: {e.strerror}")
        wanted_vols: dict[str, dict[str, str]] = {}
        for inst in wanted:
            for d in inst.disks:
                wanted_vols.setdefault(d.spec.pool, {})[d.volume] = d.instance
        known = [r.key() for r in records] + [(b.pool, b.volume) for b in refused]
        pools, found, bad = self._share(pools, wanted_vols, known)
        records.extend(found)
        bad = refused + bad
        opts = options or self.options
        # The share of all disks a plan may destroy is the caller's to judge, not this
        # one instance's: a per-instance plan would refuse any tombstone.
        opts = _forced(opts)
        return self._asking_agents(
            Observed(pools, tuple(records), tuple(bad)),
            lambda o: plan(Desired(tuple(wanted), tuple(failed)), o, opts),
        )

    def instance_records(self, instance: str, wanted: Sequence[DesiredInstance]) -> InstanceRecords:
        """An instance's records and those of the cache entries `wanted` names, read now
        and checked (recordcheck): what a plan of the instance is made against."""
        records, unreadable = self.store.for_instance_by_pool(instance)
        return self._checked(records, unreadable, wanted, self.store.get)

    def instances_records(
        self, wanted: Mapping[str, Sequence[DesiredInstance]]
    ) -> dict[str, InstanceRecords | RecordError]:
        """instance_records() of each instance of `wanted` (instance -> its manifests),
        read at one moment: the host's database once for them all, and each cache entry
        or snapshot they name once (1,000 instances from one image read and checked its
        entry's record 1,000 times). An instance whose records cannot be read gets the
        RecordError instance_records raises; StoreError (the host's database) is raised."""
        got = self.store.for_instances_by_pool(list(wanted))
        seen: dict[tuple[str, str], DiskRecord | RecordError | None] = {}

        def get(pool: str, volume: str) -> DiskRecord | None:
            key = (pool, volume)
            if key not in seen:
                try:
                    seen[key] = self.store.get(pool, volume)
                except StoreError:
                    raise
                except RecordError as e:
                    seen[key] = e
            rec = seen[key]
            if isinstance(rec, RecordError):
                raise rec
            return rec

        out: dict[str, InstanceRecords | RecordError] = {}
        for instance, these in wanted.items():
            mine = got[instance]
            if isinstance(mine, RecordError):
                out[instance] = mine
                continue
            try:
                out[instance] = self._checked(mine[0], mine[1], these, get)
            except StoreError:
                raise
            except RecordError as e:
                out[instance] = e
        return out

    def _checked(
        self,
        records: list[DiskRecord],
        unreadable: dict[str, str],
        wanted: Sequence[DesiredInstance],
        get: Callable[[str, str], DiskRecord | None],
    ) -> InstanceRecords:
        """An instance's `records` with those of the entries and snapshots `wanted` names
        (read by `get`), checked."""
        for inst in wanted:
            for d in inst.disks:
                if d.entry is not None and d.spec.pool not in unreadable:
                    rec = get(d.spec.pool, d.entry)
                    if rec is not None and not _listed(records, rec):
                        records.append(rec)
                src = d.spec.source
                if isinstance(src, SnapshotSource) and d.spec.pool not in unreadable:
                    # A restore: the snapshot it is made from (another disk's record).
                    inst_, disk_, name = src.parts()
                    key = snapshot_name(volume_name(inst_, disk_), name)
                    rec = get(d.spec.pool, key)
                    if rec is not None and not _listed(records, rec):
                        records.append(rec)
        valid, refused = self._validate(records, get)
        return InstanceRecords(tuple(valid), tuple(refused), dict(unreadable))

    def renew_record_copies(self, observed: Observed) -> int:
        """Give every valid record the run observed a trusted copy beside its volume where
        it lacks one (an apply on an intact store replaces untrusted copies, so a later
        `records rebuild` finds them); how many were written. The records are those the
        run read and checked already (drivers whose copies need no renewal, LVM's and
        rbd's, write none). Never fails a run: a copy is a convenience of rebuild, the
        database is the truth."""
        records = observed.records
        by_pool: dict[str, list[DiskRecord]] = {}
        for r in records:
            by_pool.setdefault(r.pool, []).append(r)
        renewed = 0
        for pool, drv in self.managing_drivers().items():
            if by_pool.get(pool):
                with contextlib.suppress(OSError, ReconcileError):
                    renewed += drv.renew_record_copies(by_pool[pool])
        return renewed

    def pool_backends(self) -> dict[str, list[Backend]]:
        """Each configured pool's backends, as record checks take them."""
        return {n: p.backends for n, p in self.config.pools.items()}

    def _validate(
        self,
        records: list[DiskRecord],
        get: Callable[[str, str], DiskRecord | None] | None = None,
    ) -> tuple[list[DiskRecord], list[BadRecord]]:
        """`validate` for one instance's records: the cache entries they are backed by are
        read by name (a plan of one instance loads only the entries its manifest names)."""
        have = {r.key() for r in records}
        entries: list[tuple[str, str]] = []
        for r in records:
            key = (r.pool, r.backing or "")
            if r.backing and key not in have and is_entry_name(r.backing):
                with contextlib.suppress(RecordError):
                    entry = (get or self.store.get)(*key)
                    if entry is not None and entry.kind is RecordKind.CACHE:
                        entries.append(key)
        return validate(records, self.pool_backends(), entries, checked=True)

    def replanner(self) -> Replanner:
        def replan(a: Action) -> Plan:
            """Plan one instance again against its fresh records and volumes."""
            wanted = tuple(i for i in self.desired.instances if i.instance == a.instance)
            return self.plan_instance(a.instance, wanted)

        return replan

    def executor(self, *, saved: bool, jobs: int = 1) -> Executor:
        from reconciler.apply.executor import Executor  # not needed (nor imported) by --dry-run

        # The actions' threads over enough libvirt connections that none waits in the
        # daemon for another's call (max_client_requests).
        self.conns.spread(jobs)
        return Executor(
            self.store,
            self.managing_drivers(),
            replan=None if saved else self.replanner(),
            jobs=jobs,
        )


@functools.lru_cache(maxsize=16)
def _forced(options: PlanOptions) -> PlanOptions:
    """`options` with force set: one copy per options, not one per instance planned
    (`reconcile disks` plans 1,000; issue 27)."""
    return dataclasses.replace(options, force=True)


def _listed(records: Sequence[DiskRecord], rec: DiskRecord) -> bool:
    """`rec in records`, comparing whole records (pydantic's __eq__, ~30 us) only where
    the keys match: equal records have equal keys (`reconcile disks` asked this 7,000
    times for 1,000 instances; issue 27)."""
    key = rec.key()
    return any(r is rec or (r.key() == key and r == rec) for r in records)


def observe_managed(
    pool: str,
    drv: ManagingDriver,
    volumes: Iterable[str],
    records: Iterable[DiskRecord],
    seen: dict[str, Attachments] | None = None,
    **facts: Any,
) -> ObservedPool:
    """A managed pool as a plan of `volumes` sees it: which of them exist (by name, never
    a listing), the domains that use them, and what a migration into or out of it needs
    (`records`: those whose volumes the pool's facts cover); `facts`, more ObservedPool
    fields; `seen`, the pools' domains already listed (by pool; filled here). PoolError
    and OSError are the caller's to report."""
    att = None if seen is None else seen.get(pool)
    if att is None:
        att = drv.attachments()
        if seen is not None:
            seen[pool] = att
    present = frozenset(v for v in volumes if drv.volume_exists(v))
    records = [r for r in records if r.pool == pool]
    # One ObservedPool with every fact (later ones win, as with_migration_facts and
    # with_secrets replace them), rather than copies of it: dataclasses.replace is ~20 us,
    # and `reconcile disks` observes once per instance (issue 27).
    fields = {
        **facts,
        **_migration_fields(present, drv, [r.volume for r in records]),
        **_secret_fields(drv, records),
    }
    return ObservedPool(
        pool, present, None, {}, att.defined, att.running, att.known, att.why_unknown, **fields
    )


def with_secrets(
    pool: ObservedPool, driver: ManagingDriver | None, records: Iterable[DiskRecord]
) -> ObservedPool:
    """Add which of the secrets its records name the pool's libvirt daemon holds, for a
    pool whose driver makes encrypted disks; left unknown (None: nothing is planned from
    it) where the daemon cannot be asked."""
    if pool.volumes is None:
        return pool
    fields = _secret_fields(driver, records)
    return dataclasses.replace(pool, **fields) if fields else pool


def _secret_fields(driver: ManagingDriver | None, records: Iterable[DiskRecord]) -> dict[str, Any]:
    """with_secrets' fields of a reachable pool ({}: none to set)."""
    if driver is None or not implements(driver, Encrypts):
        return {}
    uuids = [r.encryption.secret for r in records if r.encryption is not None]
    try:
        return {"secrets": cast(Encrypts, driver).secrets().held(uuids)}
    except ReconcileError:
        return {}


def with_migration_facts(
    pool: ObservedPool, driver: ManagingDriver | None, volumes: Sequence[str]
) -> ObservedPool:
    """Add what a migration into or out of the pool needs to be judged (free space, what
    its managed volumes occupy, the layouts its driver copies) to an observed pool."""
    if pool.volumes is None:
        return pool
    fields = _migration_fields(pool.volumes, driver, volumes)
    return dataclasses.replace(pool, **fields) if fields else pool


def _migration_fields(
    present: frozenset[str], driver: ManagingDriver | None, volumes: Sequence[str]
) -> dict[str, Any]:
    """with_migration_facts' fields of a pool whose volumes are `present` ({}: none)."""
    if driver is None:
        return {}
    try:
        facts = driver.migration_facts([v for v in volumes if v in present])
    except (OSError, PoolError):
        return {}  # unknown: no space check, and no migration (no layouts)
    return {
        "snapshots": implements(driver, Snapshots),
        "available": facts.available,
        "allocated": facts.allocated,
        "layouts": facts.layouts,
        "thick_unit": facts.thick_unit,
    }


def with_entries(desired: Desired, drivers: Mapping[str, ManagingDriver]) -> Desired:
    """Name the cache entry each disk is made from (its driver knows how), so the plan
    can see an entry that apply could not use."""
    # Disks mostly share a few images and templates: name each entry once.
    names: dict[tuple[str, str, str | None, int], str | None] = {}
    instances = []
    for inst in desired.instances:
        disks = []
        for d in inst.disks:
            src = d.spec.source
            key: tuple[str, str, str | None, int]
            if isinstance(src, SnapshotSource):
                # A restore is made from its snapshot (whose record names any backing).
                disks.append(d)
                continue
            if isinstance(src, ImageSource):
                key = (d.spec.pool, "image:" + src.image, None, 0)
            else:
                key = (d.spec.pool, src.template.value, src.label, d.spec.size)
            if key not in names:
                drv = drivers.get(d.spec.pool)
                source = (
                    {"image": src.image}
                    if isinstance(src, ImageSource)
                    else {"template": src.template.value, "label": src.label}
                )
                spec = {"source": source, "size": d.spec.size}
                names[key] = drv.entry_for(spec) if drv else None
            entry = names[key]
            disks.append(d.with_entry(entry) if entry else d)
        instances.append(inst.with_disks(tuple(disks)))
    return Desired(tuple(instances), desired.failed)


def plan_offline(
    config: Config, paths: Sequence[str], options: PlanOptions, observed: Observed
) -> tuple[Desired, Plan]:
    """Plan against an observed state from a file: no connection, no state directory.
    The manifests and their entries are read exactly as a live Session does."""
    conns = Connections()  # never used: no driver method below reaches a pool
    drivers = {
        name: driver_for(name, pc, conns, None, config) for name, pc in sorted(config.pools.items())
    }
    loaded, failed = load_manifests(paths, config, None)
    desired = with_entries(build_desired(loaded, failed, config.pools), managing(drivers))
    return desired, plan(desired, observed, options)
