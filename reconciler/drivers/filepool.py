"""File pools (libvirt `dir`, `fs`, `netfs`) serving the `flat` and `qcow2` backends."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from reconciler.diff.model import ObservedPool
from reconciler.drivers.headers import file_header_format
from reconciler.drivers.libvirt_conn import Connections
from reconciler.errors import PoolError
from reconciler.schema.config import PoolConfig
from reconciler.schema.record import DiskRecord

FILE_POOL_TYPES = ("dir", "fs", "netfs")
# libvirt's RPC refuses to list more volumes than this in one call (REMOTE_STORAGE_VOL_LIST_MAX
# in src/remote/remote_protocol.x); beyond it the pool directory is listed directly.
LIBVIRT_VOL_LIST_MAX = 16384


@dataclass(frozen=True)
class PoolInfo:
    type: str
    path: str


class FilePoolDriver:
    def __init__(self, name: str, config: PoolConfig, conns: Connections) -> None:
        self.name = name
        self.config = config
        self.conns = conns
        self._info: PoolInfo | None = None

    def _pool(self, conn: Any) -> Any:
        try:
            return conn.storagePoolLookupByName(self.config.libvirt_pool)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise PoolError(
                    f"libvirt pool {self.config.libvirt_pool!r} is not defined at {self.config.uri}"
                ) from None
            raise

    def info(self) -> PoolInfo:
        if self._info is None:

            def get(conn: Any) -> PoolInfo:
                pool = self._pool(conn)
                if not pool.isActive():
                    raise PoolError(f"libvirt pool {self.config.libvirt_pool!r} is not active")
                root = ET.fromstring(pool.XMLDesc(0))
                ptype = root.get("type", "")
                path = root.findtext("target/path") or ""
                return PoolInfo(ptype, path)

            info = self.conns.call(self.config.uri, f"pool {self.name}", get)
            if info.type not in FILE_POOL_TYPES:
                raise PoolError(
                    f"libvirt pool {self.config.libvirt_pool!r} is of type {info.type!r}; "
                    f"the flat and qcow2 backends need one of {', '.join(FILE_POOL_TYPES)}"
                )
            if not os.path.isabs(info.path) or not os.path.isdir(info.path):
                raise PoolError(f"pool {self.name}: target path {info.path!r} is not a directory")
            self._info = info
        return self._info

    def list_volumes(self) -> frozenset[str]:
        def names(conn: Any) -> frozenset[str] | None:
            pool = self._pool(conn)
            # A refresh makes libvirt re-read the directory, so volumes created or removed
            # behind its back are seen; busy pools are retried by Connections.call.
            if pool.numOfVolumes() > LIBVIRT_VOL_LIST_MAX:
                return None
            pool.refresh(0)
            if pool.numOfVolumes() > LIBVIRT_VOL_LIST_MAX:
                return None
            return frozenset(v.name() for v in pool.listAllVolumes(0))

        listed = self.conns.call(self.config.uri, f"list pool {self.name}", names)
        if listed is not None:
            return listed
        # Too many for libvirt's RPC: list what libvirt itself lists, the directory entries.
        with os.scandir(self.info().path) as it:
            return frozenset(e.name for e in it)

    def observe(self, records: Sequence[DiskRecord]) -> ObservedPool:
        try:
            info = self.info()
            volumes = self.list_volumes()
        except PoolError as e:
            return ObservedPool(self.name, None, str(e))
        except OSError as e:
            return ObservedPool(self.name, None, f"cannot list {e.filename}: {e.strerror}")
        headers: dict[str, str] = {}
        for rec in records:
            if rec.volume in volumes:
                fmt = file_header_format(os.path.join(info.path, rec.volume))
                if fmt != rec.format.value:
                    headers[rec.volume] = fmt
        return ObservedPool(self.name, volumes, None, headers)
