"""What the manifests ask for, as the planner reads it: plain, immutable values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.model.keying import PoolKeys
from reconciler.schema.common import Preallocation
from reconciler.schema.manifest import DiskSpec


@dataclass(frozen=True, slots=True)
class DesiredDisk:
    instance: str
    spec: DiskSpec
    volume: str
    file: str
    line: int | None
    # The cache entry (in the disk's pool) a create makes it from, as its driver names it;
    # None for a disk made from nothing (blank), or where no driver could say.
    entry: str | None = None
    # How a disk made (or copied) into its pool is allocated: the pool's `preallocation`
    # (a file pool's); None: off, or a pool the config lacks.
    preallocation: Preallocation | None = None
    # Its pool has a key source (config `keys`): an encrypted disk's key can be had on
    # another host, so it may be taken over.
    key_source: bool = False
    # Every configured pool's libvirt daemon and key source (one mapping shared by all
    # disks): what a migration's keying is decided by (model/keying.py).
    pool_keys: Mapping[str, PoolKeys] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class DesiredInstance:
    instance: str
    file: str
    deleted: bool
    disks: tuple[DesiredDisk, ...]


@dataclass(frozen=True, slots=True)
class FailedInput:
    """A manifest that failed to load; its instance, when known, is left alone."""

    file: str
    line: int | None
    message: str
    instance: str | None


@dataclass(frozen=True)
class Desired:
    instances: tuple[DesiredInstance, ...]
    failed: tuple[FailedInput, ...] = ()
