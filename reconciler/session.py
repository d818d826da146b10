"""One reconcile: load, observe, plan; and the pieces apply needs (drivers, re-planning)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reconciler.desired import build_desired
from reconciler.diff import Action, Desired, Observed, ObservedPool, Plan, PlanOptions, plan
from reconciler.drivers import Connections, driver_for, managing
from reconciler.drivers.base import ManagingDriver
from reconciler.schema.config import Config
from reconciler.schema.load import ManifestLoad
from reconciler.schema.mcache import ManifestCache
from reconciler.schema.record import DiskRecord
from reconciler.store import SqliteRecordStore, open_store

if TYPE_CHECKING:
    from reconciler.apply import Executor, Replanner


@dataclass
class Session:
    config: Config
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        self.store: SqliteRecordStore = open_store(self.config.state_dir())
        self.conns = Connections()
        self.drivers = {
            name: driver_for(name, pc, self.conns, self.store, self.config.images)
            for name, pc in sorted(self.config.pools.items())
        }
        self.desired = Desired(())
        self._loading: ManifestLoad | None = None

    def close(self) -> None:
        self._end_loading()
        self.conns.close()
        self.store.close()

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
            observed = self.observe() if observe else None
            loaded, failed = loading.finish()
        except BaseException:
            loading.close()
            raise
        # Kept until close() or the next load: its worker may still be writing the cache.
        self._loading = loading
        self.desired = build_desired(loaded, failed)
        return observed

    def _end_loading(self) -> None:
        if self._loading is not None:
            self._loading.close()
            self._loading = None

    def observe(self) -> Observed:
        # Volumes before records: a record is written before its volume is made, so a volume
        # seen here always has its record below, even while another reconciler is creating.
        pools = {name: d.observe() for name, d in self.drivers.items()}
        records, bad = self.store.load_all()
        by_pool: dict[str, list[DiskRecord]] = {}
        for r in records:
            by_pool.setdefault(r.pool, []).append(r)
        pools = {
            name: self.drivers[name].check_headers(p, by_pool.get(name, []))
            for name, p in pools.items()
        }
        for name in sorted(by_pool.keys() - pools.keys()):
            pools[name] = ObservedPool(
                name, None, "the pool is not in the config (records name it)"
            )
        return Observed(pools, tuple(records), tuple(bad))

    def plan(self, observed: Observed | None = None) -> Plan:
        """Plan the loaded manifests against `observed`, or against the pools as they are."""
        return plan(self.desired, self.observe() if observed is None else observed, self.options)

    def managing_drivers(self) -> dict[str, ManagingDriver]:
        return managing(self.drivers)

    def replanner(self) -> Replanner:
        def replan(a: Action) -> list[Action]:
            """Plan one instance again against its fresh records and volumes."""
            records = self.store.for_instance(a.instance)
            wanted = tuple(i for i in self.desired.instances if i.instance == a.instance)
            drivers = self.managing_drivers()
            names: dict[str, set[str]] = {}
            for r in records:
                names.setdefault(r.pool, set()).add(r.volume)
            for inst in wanted:
                for d in inst.disks:
                    names.setdefault(d.spec.pool, set()).add(d.volume)
            pools = {}
            for pool, vols in names.items():
                drv = drivers.get(pool)
                if drv is None:
                    pools[pool] = ObservedPool(pool, None, "no driver")
                    continue
                att = drv.attachments()
                pools[pool] = ObservedPool(
                    pool,
                    frozenset(v for v in vols if drv.volume_exists(v)),
                    None,
                    {},
                    att.defined,
                    att.running,
                    att.known,
                    att.why_unknown,
                )
            opts = PlanOptions(
                allow_replace=self.options.allow_replace, prune=self.options.prune, force=True
            )
            return list(plan(Desired(wanted), Observed(pools, tuple(records)), opts).actions)

        return replan

    def executor(self, *, saved: bool, jobs: int = 1) -> Executor:
        from reconciler.apply import Executor  # not needed (nor imported) by --dry-run

        return Executor(
            self.store,
            self.managing_drivers(),
            replan=None if saved else self.replanner(),
            jobs=jobs,
        )
