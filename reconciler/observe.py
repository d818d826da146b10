"""Observe every configured pool and read the records: the planner's Observed state."""

from __future__ import annotations

from collections import defaultdict

from reconciler.diff.model import Observed, ObservedPool
from reconciler.drivers import Connections, driver_for
from reconciler.schema.config import Config
from reconciler.schema.record import DiskRecord
from reconciler.store import RecordStore


def observe(config: Config, store: RecordStore, conns: Connections) -> Observed:
    records, bad = store.load_all()
    by_pool: dict[str, list[DiskRecord]] = defaultdict(list)
    for r in records:
        by_pool[r.pool].append(r)
    pools = {}
    for name in sorted(config.pools):
        driver = driver_for(name, config.pools[name], conns)
        pools[name] = driver.observe(by_pool.get(name, []))
    for name in sorted(by_pool.keys() - pools.keys()):
        pools[name] = ObservedPool(name, None, "the pool is not in the config (records name it)")
    return Observed(pools, tuple(records), tuple(bad))
