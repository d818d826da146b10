"""Which driver serves a pool: a table from the backends a pool is configured for to the
factory of its driver. Adding a backend is one row here and its package under drivers/.

Invariant: a pool is served by exactly one driver, the first whose backends include all of
the pool's; a pool whose backends no driver serves is observed as unusable and never
touched (UnsupportedPool). The rbd and lvm drivers (and what they import: rados records,
leases, LVM's tools) are imported by the first pool that needs them: a host of file pools
never pays for them at start-up, which every `reconcile` run does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from reconciler.drivers.api import ManagingDriver, PoolDriver
from reconciler.drivers.file.pool import FilePoolDriver
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import RecordStore
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord
from reconciler.schema.common import Backend
from reconciler.schema.config import Config, PoolConfig

Factory = Callable[[str, PoolConfig, Connections, RecordStore | None, Config | None], PoolDriver]


class UnsupportedPool:
    """A pool whose backends have no driver yet: observed as unusable, never touched."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why

    def observe(self) -> ObservedPool:
        return ObservedPool(self.name, None, self.why)

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        return pool

    def as_managing(self) -> ManagingDriver | None:
        return None  # observed as unusable, never changed

    def record_store(self) -> RecordStore | None:
        return None

    def close(self) -> None:
        pass  # nothing opened


def _file(
    name: str, config: PoolConfig, conns: Connections, store: RecordStore | None, cfg: Config | None
) -> PoolDriver:
    from reconciler.drivers.file.headercache import cache_path

    if cfg is None:
        return FilePoolDriver(name, config, conns, store, {})
    # Only beside the host's own store, whose state directory keeps it.
    headers = cache_path(cfg.state_dir(), name) if store is not None else None
    return FilePoolDriver(name, config, conns, store, cfg.images, headers)


def _rbd(
    name: str, config: PoolConfig, conns: Connections, store: RecordStore | None, cfg: Config | None
) -> PoolDriver:
    from reconciler.drivers.rbd.changes import FILE
    from reconciler.drivers.rbd.listing import path_for
    from reconciler.drivers.rbd.pool import RbdPoolDriver

    if cfg is None:
        return RbdPoolDriver(name, config, conns, store, {}, None, 300.0)
    host, expiry = cfg.host_id(), cfg.ownership.heartbeat_expiry
    # Only beside the host's own store: a driver without one plans from a file.
    changes = cfg.state_dir() / FILE if store is not None else None
    listing = path_for(cfg.state_dir(), name) if store is not None else None
    return RbdPoolDriver(name, config, conns, store, cfg.images, host, expiry, changes, listing)


def _lvm(
    name: str, config: PoolConfig, conns: Connections, store: RecordStore | None, cfg: Config | None
) -> PoolDriver:
    from reconciler.drivers.lvm.pool import LvmPoolDriver

    return LvmPoolDriver(name, config, conns, store, cfg.images if cfg is not None else {})


FILE_BACKENDS = frozenset({Backend.FLAT, Backend.QCOW2, Backend.PLOOP})
DRIVERS: tuple[tuple[frozenset[Backend], Factory], ...] = (
    (FILE_BACKENDS, _file),
    (frozenset({Backend.RBD}), _rbd),
    (frozenset({Backend.LVM}), _lvm),
)


def driver_for(
    name: str,
    config: PoolConfig,
    conns: Connections,
    store: RecordStore | None = None,
    cfg: Config | None = None,
) -> PoolDriver:
    """The driver of pool `name`; `store` is the host's records database (file pools keep
    their records there), `cfg` the whole config (the image catalog, this host's id)."""
    backends = set(config.backends)
    for served, factory in DRIVERS:
        if backends <= served:
            return factory(name, config, conns, store, cfg)
    known = frozenset().union(*(served for served, _ in DRIVERS))
    missing = ", ".join(sorted(b.value for b in backends - known))
    return UnsupportedPool(name, f"no driver for backend(s) {missing} yet")


def managing(drivers: Mapping[str, PoolDriver]) -> dict[str, ManagingDriver]:
    """The drivers that can change their pools (not those of unsupported backends)."""
    out = {}
    for n, d in drivers.items():
        m = d.as_managing()
        if m is not None:
            out[n] = m
    return out
