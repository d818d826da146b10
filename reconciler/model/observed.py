"""What the pools hold and the records say, as the planner reads it: plain, immutable values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.model.record import BadRecord, DiskRecord


@dataclass(frozen=True, slots=True)
class Holder:
    """Another host's hold on the record of a volume in a pool many hosts share."""

    host: str  # the owner; RELEASED (drivers/rbd/records.py) when it let the disk go
    generation: int  # the record's, for the compare-and-swap that takes it
    free: bool  # released, or its owner's heartbeat expired: this host may take it
    why: str  # for messages: who holds it and since when


@dataclass(frozen=True, slots=True)
class ObservedPool:
    """What a pool holds, by name only. `volumes` is None when the pool is unreachable.

    `header_formats` maps a managed volume to the format its first bytes announce, where
    that differs from the record; it is used for warnings only, never to decide anything.
    """

    name: str
    volumes: frozenset[str] | None
    error: str | None = None
    header_formats: Mapping[str, str] = field(default_factory=dict)
    # Volume -> domains whose definition uses it, and those of them that are running.
    attached: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    running: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # False where the connection cannot list domains: then nothing may be deleted.
    attachments_known: bool = True
    attachments_why: str = ""
    # Set with `error` when the pool is managed by another record store: reported whether
    # or not a manifest names the pool, unlike a pool that is only unreachable.
    managed_elsewhere: bool = False
    # A pool many hosts share (Ceph): a disk whose manifest is gone here is handed over,
    # never pruned, and `held` names the volumes whose records another host holds.
    shared: bool = False
    held: Mapping[str, Holder] = field(default_factory=dict)
    # For migrations (see MigrationFacts in drivers/api.py): free bytes in the pool (None:
    # unknown), bytes each managed volume occupies, and the `backend/format` layouts the
    # pool's driver can copy a disk out of and into. Empty: the driver cannot migrate.
    # `thick_unit`: 0 where a copy into the pool is sparse, else a copy takes its whole
    # size rounded up to that many bytes.
    available: int | None = None
    allocated: Mapping[str, int] = field(default_factory=dict)
    layouts: frozenset[str] = frozenset()
    thick_unit: int = 0
    # Facts above (field name -> why, with what to do) that an exported state does not
    # carry: the planner refuses to plan what depends on them rather than read a default.
    unknown: Mapping[str, str] = field(default_factory=dict)
    # The pool's driver takes snapshots (drivers/api.py's Snapshots): a pool whose driver
    # does lists each snapshot's key (VOLUME+snap-NAME) among its volumes.
    snapshots: bool = False
    # Snapshot key -> the volumes the backend lists as depending on it, made by any host
    # (rbd: clones of its image snapshot); a snapshot with users is never deleted.
    snapshot_users: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    pools: Mapping[str, ObservedPool]
    records: tuple[DiskRecord, ...] = ()
    bad_records: tuple[BadRecord, ...] = ()
    # Running domains -> whether the guest agent answered (asked only where the plan
    # takes a snapshot of a disk such a domain runs; drivers/host/freeze.py).
    agents: Mapping[str, bool] = field(default_factory=dict)
