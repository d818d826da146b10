"""Backend drivers: everything that differs between flat, qcow2, lvm, rbd and ploop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from reconciler.drivers.api import ManagingDriver, PoolDriver
from reconciler.drivers.file.pool import FilePoolDriver
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import RecordStore
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord
from reconciler.schema.common import Backend
from reconciler.schema.config import Config, ImageConfig, PoolConfig

FILE_BACKENDS = frozenset({Backend.FLAT, Backend.QCOW2, Backend.PLOOP})


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
    images: Mapping[str, ImageConfig] = cfg.images if cfg is not None else {}
    if backends <= FILE_BACKENDS:
        return FilePoolDriver(name, config, conns, store, images)
    # The rbd and lvm drivers (and what they import: rados records, leases, LVM's tools)
    # are imported by the first pool that needs them: a host of file pools never pays
    # for them at start-up, which every `reconcile` run does.
    if backends == {Backend.RBD}:
        from reconciler.drivers.rbd.pool import RbdPoolDriver

        host = cfg.host_id() if cfg is not None else None
        expiry = cfg.ownership.heartbeat_expiry if cfg is not None else 300.0
        return RbdPoolDriver(name, config, conns, store, images, host, expiry)
    if backends == {Backend.LVM}:
        from reconciler.drivers.lvm.pool import LvmPoolDriver

        return LvmPoolDriver(name, config, conns, store, images)
    missing = ", ".join(
        sorted(b.value for b in backends - FILE_BACKENDS - {Backend.LVM, Backend.RBD})
    )
    return UnsupportedPool(name, f"no driver for backend(s) {missing} yet")


def managing(drivers: Mapping[str, PoolDriver]) -> dict[str, ManagingDriver]:
    """The drivers that can change their pools (not those of unsupported backends)."""
    out = {}
    for n, d in drivers.items():
        m = d.as_managing()
        if m is not None:
            out[n] = m
    return out


__all__ = [
    "Connections",
    "FilePoolDriver",
    "ManagingDriver",
    "PoolDriver",
    "driver_for",
    "managing",
]
