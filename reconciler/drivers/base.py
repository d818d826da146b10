"""What every backend driver provides. Nothing backend-specific lives above drivers/."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from reconciler.diff.model import ObservedPool
from reconciler.schema.record import DiskRecord


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
