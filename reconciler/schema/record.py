"""The durable record the reconciler keeps for every disk (and cache entry) it made.

DESIGN invariant 2: the record is written before the volume is created and updated after
each step. It is the only source of a disk's format, size and backing; nothing is ever
read back from the volume or from libvirt's XML. Records are versioned so they can grow.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.schema.common import Backend, DiskFormat

RECORD_SCHEMA_VERSION: Literal[1] = 1


class RecordState(StrEnum):
    CREATING = "creating"  # intent written, volume may be partial: holds no user data
    READY = "ready"
    RESIZING = "resizing"  # target size recorded in `pending_size`
    DELETING = "deleting"  # the volume is being removed


class RecordKind(StrEnum):
    DISK = "disk"
    CACHE = "cache"


class DiskRecord(BaseModel):
    """What the reconciler knows about one volume it made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = RECORD_SCHEMA_VERSION
    kind: RecordKind = RecordKind.DISK
    backend: Backend
    pool: str
    volume: str
    instance: str
    disk: str
    format: DiskFormat
    virtual_size: int = Field(gt=0)
    # The desired spec this volume was made to (as in the manifest, sizes in bytes).
    spec: dict[str, Any]
    source: dict[str, Any]
    # Name of the cache entry volume this disk is backed by, if any (same pool).
    backing: str | None = None
    state: RecordState
    pending_size: int | None = None
    generation: int = Field(ge=1)
    # Cache entries: when a disk was last made from it (ISO 8601, UTC), for `cache gc`.
    last_used: str | None = None

    def key(self) -> tuple[str, str]:
        return (self.pool, self.volume)

    def unused_for(self, now: datetime.datetime) -> float:
        """Seconds since a disk was last made from this cache entry (inf: never noted)."""
        if not self.last_used:
            return float("inf")
        return (now - datetime.datetime.fromisoformat(self.last_used)).total_seconds()


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that exists but cannot be read: work on its disk stops."""

    pool: str
    volume: str
    error: str
