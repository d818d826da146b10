"""The planner's output: actions, problems and their codes; plain, immutable values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Self

from reconciler.schema.common import Preallocation


class ActionKind(StrEnum):
    CREATE = "create"
    RESIZE = "resize"
    REPLACE = "replace"
    UPDATE = "update"  # record-only change (deletionPolicy)
    DELETE = "delete"
    RELEASE = "release"  # deletionPolicy Retain: keep the volume, drop the record
    TAKE_OVER = "take-over"  # a shared pool: become the owner of another host's record
    HAND_OVER = "hand-over"  # a shared pool: let another host take this host's record
    MIGRATE = "migrate"  # copy to a new pool, backend or format, verify, switch, remove old
    # One per instance, pool and snapshot name: the instance's disks of that pool taken at
    # one moment (diff/snapshots.py); `volume` is the first disk's snapshot key.
    SNAPSHOT = "snapshot"
    DELETE_SNAPSHOT = "delete-snapshot"  # destructive: the snapshot's data is gone


# Counted in a plan's summary only where a plan has one, so the summaries of plans without
# (and the documents pinned from them) stay as they were.
OPTIONAL_KINDS = frozenset({ActionKind.MIGRATE, ActionKind.SNAPSHOT, ActionKind.DELETE_SNAPSHOT})


@dataclass(frozen=True, slots=True)
class Precondition:
    """What the plan saw; apply refuses an action whose precondition no longer holds."""

    record_generation: int | None  # None: no record existed
    volume_exists: bool

    def to_json(self) -> dict[str, Any]:
        return {"record_generation": self.record_generation, "volume_exists": self.volume_exists}


@dataclass(frozen=True, slots=True)
class SnapshotMember:
    """One disk of a snapshot action: its volume, the snapshot's key (VOLUME+snap-NAME)
    and the disk record's generation the snapshot is of (apply checks it again)."""

    disk: str
    volume: str
    key: str
    generation: int

    def to_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "volume": self.volume, "key": self.key,
                "generation": self.generation}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SnapshotOp:
    """What a `snapshot` or `delete-snapshot` action is about: the snapshot's name, its
    disks (all of one instance and pool, taken at one moment), and for a take how
    consistent it is planned to be (model.record.Consistency) with the running domains
    whose guest agents freeze it."""

    name: str
    members: tuple[SnapshotMember, ...]
    consistency: str = ""
    domains: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "disks": [m.to_json() for m in self.members]}
        if self.consistency:
            out["consistency"] = self.consistency
        if self.domains:
            out["domains"] = list(self.domains)
        return out


@dataclass(frozen=True, slots=True)
class Action:
    action: ActionKind
    instance: str
    disk: str
    pool: str
    volume: str
    reason: str
    patch: tuple[dict[str, Any], ...]
    destructive: bool
    precondition: Precondition
    spec: Mapping[str, Any] | None = None  # desired spec (None for delete/release)
    recorded: Mapping[str, Any] | None = None  # the record's spec, when there is one
    # (pool, volume) removed by a replace; for a migrate, the disk's old location
    replaces: tuple[str, str] | None = None
    holder: str | None = None  # take-over: the host the record is taken from
    # How the volume the action makes or grows is allocated (a file pool's preallocation:
    # a create's and a migration's copy the pool's, a resize the record's); None: off.
    preallocation: Preallocation | None = None
    # A snapshot action's snapshot (its `volume` is its first disk's snapshot key).
    snapshot: SnapshotOp | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action.value,
            "instance": self.instance,
            "disk": self.disk,
            "pool": self.pool,
            "volume": self.volume,
            "reason": self.reason,
            "patch": list(self.patch),
            "destructive": self.destructive,
            "precondition": self.precondition.to_json(),
        }
        if self.spec is not None:
            out["spec"] = dict(self.spec)
        if self.replaces is not None:
            out["replaces"] = {"pool": self.replaces[0], "volume": self.replaces[1]}
        if self.holder is not None:
            out["holder"] = self.holder
        if self.preallocation is not None:
            out["preallocation"] = self.preallocation.value
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.to_json()
        return out


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class Handling(Enum):
    """What `reconcile watch` does with an instance whose plan has an error of a code."""

    TERMINAL = "terminal"  # waits for the instance's manifest (or an operator) to change
    RETRY = "retry"  # may pass by itself (a pool comes back, a domain lets go): back off
    WARNING = "warning"  # only ever a warning: reported, never fails a reconcile


class ProblemCode(StrEnum):
    """Every code a problem can carry, each with the loop's outcome for it (the status
    reason and its handling), so that a code and its outcome are declared together and
    adding a code is one line. The value is the code as plans and messages show it."""

    reason: str
    handling: Handling

    def __new__(cls, code: str, reason: str = "", handling: Handling = Handling.WARNING) -> Self:
        member = str.__new__(cls, code)
        member._value_ = code
        member.reason = reason
        member.handling = handling
        return member

    # Errors that wait for the manifest (or an operator's flag) to change.
    MANIFEST_INVALID = "manifest-invalid", "ManifestInvalid", Handling.TERMINAL
    CONFLICT = "conflict", "ManifestConflict", Handling.TERMINAL
    SHRINK_REFUSED = "shrink-refused", "ShrinkRefused", Handling.TERMINAL
    RESIZE_UNSUPPORTED = "resize-unsupported", "ResizeUnsupported", Handling.TERMINAL
    REPLACE_REQUIRED = "replace-required", "ReplaceRequired", Handling.TERMINAL
    UNMANAGED_VOLUME = "unmanaged-volume", "UnmanagedVolume", Handling.TERMINAL
    CACHE_ENTRY_UNMANAGED = "cache-entry-unmanaged", "CacheEntryUnmanaged", Handling.TERMINAL
    CACHE_ENTRY_UNREADABLE = "cache-entry-unreadable", "RecordUnreadable", Handling.TERMINAL
    RECORD_UNREADABLE = "record-unreadable", "RecordUnreadable", Handling.TERMINAL
    RECORD_CONFLICT = "record-conflict", "RecordConflict", Handling.TERMINAL
    ATTACHMENTS_UNKNOWN = "attachments-unknown", "AttachmentsUnknown", Handling.TERMINAL
    PRUNE_REFUSED = "prune-refused", "PruneRefused", Handling.TERMINAL
    MIGRATE_UNSUPPORTED = "migrate-unsupported", "MigrateUnsupported", Handling.TERMINAL
    MIGRATION_CHANGED = "migration-changed", "MigrationChanged", Handling.TERMINAL
    # The pool's preallocation is one the disk's format cannot be made with.
    PREALLOCATION_UNSUPPORTED = (
        "preallocation-unsupported",
        "PreallocationUnsupported",
        Handling.TERMINAL,
    )
    # An encryption the disk's backend cannot make yet, or a change of encryption (a
    # migrate, not built yet), or what an encrypted disk needs its key for.
    ENCRYPTION_UNSUPPORTED = (
        "encryption-unsupported",
        "EncryptionUnsupported",
        Handling.TERMINAL,
    )
    # Another pool, layout or a smaller size; an encrypted disk; a driver without snapshots.
    SNAPSHOT_UNSUPPORTED = "snapshot-unsupported", "SnapshotUnsupported", Handling.TERMINAL
    # A snapshot restores depend on (named), or a disk with snapshots replaced or moved.
    SNAPSHOT_IN_USE = "snapshot-in-use", "SnapshotInUse", Handling.TERMINAL
    # A restore from a snapshot that has no ready record.
    SNAPSHOT_MISSING = "snapshot-missing", "SnapshotMissing", Handling.TERMINAL
    # Only from an exported state older than a fact the plan needs (never the loop's).
    STATE_INCOMPLETE = "state-incomplete", "StateIncomplete", Handling.TERMINAL
    # Only planned without --force (the loop plans with it): the operator decides.
    DELETE_THRESHOLD = "delete-threshold", "DeleteThreshold", Handling.TERMINAL
    # Errors that may pass by themselves: retried with backoff (a resync notices too).
    MIGRATE_NO_SPACE = "migrate-no-space", "MigrateNoSpace", Handling.RETRY
    VOLUME_IN_USE = "volume-in-use", "VolumeInUse", Handling.RETRY
    POOL_UNREACHABLE = "pool-unreachable", "PoolUnreachable", Handling.RETRY
    POOL_MANAGED_ELSEWHERE = "pool-managed-elsewhere", "PoolManagedElsewhere", Handling.RETRY
    APPLY_FAILED = "apply-failed", "ApplyFailed", Handling.RETRY  # a step failed (the loop's)
    # Warnings only.
    # Another live host holds the disk (the instance is moving): the normal state, so a
    # warning (one-shot runs exit 0); the loop's status says OwnedElsewhere, waiting, and a
    # resync plans the take-over once that host lets go or its heartbeat expires.
    OWNED_ELSEWHERE = "owned-elsewhere", "OwnedElsewhere"
    UNMANAGED_VOLUMES = "unmanaged-volumes"
    INTERRUPTED_DELETE = "interrupted-delete"
    DRIFT = "drift"
    ORPHANED_RECORD = "orphaned-record"
    FORMAT_MISMATCH = "format-mismatch"
    # A snapshot of a running guest whose agent did not answer: as after a power cut.
    CRASH_CONSISTENT = "crash-consistent"


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    code: ProblemCode
    message: str
    instance: str | None = None
    disk: str | None = None
    pool: str | None = None
    volume: str | None = None
    file: str | None = None
    line: int | None = None

    def sort_key(self) -> tuple[str, int, str, str, str, str, str, str]:
        return (
            self.file or "",
            self.line or 0,
            self.instance or "",
            self.disk or "",
            self.pool or "",
            self.volume or "",
            self.code,
            self.message,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        for k in ("instance", "disk", "pool", "volume", "file", "line"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    # For people only (the Markdown review), never in the JSON, a saved plan or apply: the
    # destructive actions the delete guard took out of the plan (its `delete-threshold`
    # error), and each instance's manifest file (an instance several manifests claim, or
    # none, has no entry).
    held: tuple[Action, ...] = ()
    manifests: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    def summary(self) -> dict[str, int]:
        # `migrate` and the snapshot actions are counted only where a plan has one, so the
        # summaries of plans without (and the documents pinned from them) stay as they were.
        counts = {k.value: 0 for k in ActionKind if k not in OPTIONAL_KINDS}
        for a in self.actions:
            counts[a.action.value] = counts.get(a.action.value, 0) + 1
        counts["destructive"] = sum(1 for a in self.actions if a.destructive)
        counts["errors"] = len(self.errors)
        counts["warnings"] = len(self.warnings)
        return counts
