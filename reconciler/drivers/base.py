"""What every backend driver provides. Nothing backend-specific lives above drivers/."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.diff.model import ObservedPool
from reconciler.drivers.domains import Attachments
from reconciler.drivers.ownership import Owner
from reconciler.errors import ReconcileError
from reconciler.schema.manifest import TemplateSource
from reconciler.schema.record import DiskRecord
from reconciler.store import RecordStore


class VolumeExists(ReconcileError):
    """A volume of the name to create already exists: someone else's, never removed."""


@dataclass(frozen=True)
class RecordCopies:
    """The copies of records a pool's volumes carry, and the volumes that carry none."""

    records: tuple[DiskRecord, ...]
    without: tuple[tuple[str, str], ...]  # (volume, why)


class PoolDriver(Protocol):
    """A driver bound to one configured pool."""

    name: str

    def observe(self) -> ObservedPool:
        """List the pool's volumes (names only) and the domains that use them.

        Never raises for an unreachable pool: returns an ObservedPool with `error` set.
        """
        ...

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Add warnings-only header formats of managed volumes to an observed pool."""
        ...

    def as_managing(self) -> ManagingDriver | None:
        """This driver as one that can change its pool, or None (a capability, so nothing
        above drivers/ asks which class a driver is)."""
        ...

    def record_store(self) -> RecordStore | None:
        """The store that keeps this pool's records, opened on first call (RecordError if
        it cannot be); None: the host's records database (reconciler/records.py)."""
        ...


class ManagingDriver(PoolDriver, Protocol):
    """A driver that can change its pool: what the executor and `cache gc` use."""

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """A lock shared by every reconciler using this pool (processes or hosts)."""
        ...

    def volume_exists(self, volume: str) -> bool: ...

    def check_owner(self) -> None:
        """Raise PoolError (ManagedElsewhere) if another record store manages the pool."""
        ...

    def claim(self) -> None:
        """Make this driver's record store the pool's manager before the first change;
        raises PoolError if another store manages the pool."""
        ...

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """Keep a copy of `rec` beside its volume, where the host (not a guest) can."""
        ...

    def record_copies(self) -> RecordCopies:
        """The record copies the pool's volumes carry (for `records rebuild`)."""
        ...

    def owner(self) -> Owner | None:
        """The record store that manages the pool, if one has claimed it."""
        ...

    def take_over(self) -> None:
        """Make this driver's store the pool's manager, whoever managed it before."""
        ...

    def attachments(self) -> Attachments: ...

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` is made from, if any."""
        ...

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` depends on once made, if any."""
        ...

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None: ...

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None: ...

    def resize(self, rec: DiskRecord, size: int) -> None: ...

    def delete_volume(self, volume: str) -> None: ...

    def sweep_temp(self) -> list[str]: ...
