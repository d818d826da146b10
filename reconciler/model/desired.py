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

    def with_entry(self, entry: str) -> DesiredDisk:
        """dataclasses.replace(self, entry=entry), at a tenth of its cost: every disk of a
        run gets its entry (30,000 of them in bench/plan.py). Lists every field: one added
        above is added here (tests/test_desired_model.py checks it is)."""
        return DesiredDisk(
            self.instance,
            self.spec,
            self.volume,
            self.file,
            self.line,
            entry,
            self.preallocation,
            self.key_source,
            self.pool_keys,
        )


@dataclass(frozen=True, slots=True)
class DesiredInstance:
    instance: str
    file: str
    deleted: bool
    disks: tuple[DesiredDisk, ...]

    def with_disks(self, disks: tuple[DesiredDisk, ...]) -> DesiredInstance:
        """dataclasses.replace(self, disks=disks), cheaply (see DesiredDisk.with_entry)."""
        return DesiredInstance(self.instance, self.file, self.deleted, disks)


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
