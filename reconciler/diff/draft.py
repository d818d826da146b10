"""The plan being built: the one object every planning question reads and adds to.

A `Draft` holds what the planner was given (the observed state and the options), the
indices it reads from them (records by instance, every volume a record explains, the
unreadable records), what it has planned so far (actions, errors, warnings) and the
bookkeeping that spans disks: volumes an error already names (not listed again as
unmanaged), pools a disk could not use (reported once per pool), bytes earlier migrations
claimed in each pool. The question modules (new, changed, removed, migration, ownership,
guards) are functions of a Draft; none keeps state of its own. `Recorded` bundles what
changed.py and migration.py judge of one disk that has a record (its manifest entry, its
record, the pools it is in and goes to), and builds the actions they plan for it.

Invariant: nothing here does I/O or reads a clock; `finish` orders actions and problems
by their contents alone, so the same inputs give the same Plan, byte for byte.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.desired import DesiredDisk
from reconciler.model.observed import Observed, ObservedPool
from reconciler.model.plan import (
    Action,
    ActionKind,
    Plan,
    Precondition,
    Problem,
    ProblemCode,
    Severity,
)
from reconciler.model.record import BadRecord, DiskRecord, RecordKind


@dataclass(frozen=True)
class PlanOptions:
    """What the operator allows: replacing disks (destroys data), pruning orphans, going
    past the delete threshold (`force`, `max_delete_percent`)."""

    allow_replace: bool = False
    prune: bool = False
    # Hand over (not delete) this host's disks in pools many hosts share when no manifest
    # names their instance: only when every manifest has been read (--prune, or the loop).
    hand_over: bool = False
    force: bool = False
    max_delete_percent: int = 10


# Where plan order puts an action among its disk's (by its kind's name otherwise): a
# snapshot goes before its disk is deleted (an rbd image with snapshots cannot be
# removed), and is taken after anything else planned for the disk.
_RANK = {ActionKind.DELETE_SNAPSHOT: " delete-snapshot", ActionKind.SNAPSHOT: "~snapshot"}


@dataclass
class Draft:
    """The plan being built (see the module docstring); made by `start`, read by `finish`."""

    observed: Observed
    options: PlanOptions
    actions: list[Action] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    held: list[Action] = field(default_factory=list)  # what the delete guard took out
    manifests: dict[str, str] = field(default_factory=dict)  # instance -> its manifest file
    # Indices of `observed`, read only once made (see `start`).
    bad: dict[tuple[str, str], BadRecord] = field(default_factory=dict)
    records: dict[str, list[DiskRecord]] = field(default_factory=lambda: defaultdict(list))
    disk_records: int = 0
    snapshot_records: int = 0  # the delete guard counts snapshots as it counts disks
    # Every volume a record (readable or not) explains, disks and cache entries alike.
    recorded: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Volumes without a record that an error already names (not listed again).
    reported: set[tuple[str, str]] = field(default_factory=set)
    # Pool -> the disks that needed it while it could not be used.
    blocked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Bytes the plan's migrations so far will write into each pool.
    claimed: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @classmethod
    def start(cls, observed: Observed, options: PlanOptions) -> Draft:
        draft = cls(observed, options)
        draft.bad = {(b.pool, b.volume): b for b in observed.bad_records}
        for b in observed.bad_records:
            draft.recorded[b.pool].add(b.volume)
        for name, p in observed.pools.items():
            draft.recorded[name].update(p.held)  # another host's records explain these
        for r in observed.records:
            draft.recorded[r.pool].add(r.volume)
            if r.migration is not None:  # the copy is the record's, not a stranger
                draft.recorded[r.migration.pool].add(r.migration.volume)
            if r.kind is RecordKind.DISK:
                draft.records[r.instance].append(r)
                draft.disk_records += 1
            elif r.kind is RecordKind.SNAPSHOT:
                draft.snapshot_records += 1
        return draft

    # A code is a ProblemCode's value (a string not declared there fails here, and
    # tests/test_problem_codes.py finds every `draft.error`/`draft.warn` in diff/ before it
    # runs: call them on a Draft named `draft`, with the code as a literal).
    def error(self, code: str, message: str, **where: Any) -> None:
        self.errors.append(Problem(Severity.ERROR, ProblemCode(code), message, **where))

    def warn(self, code: str, message: str, **where: Any) -> None:
        self.warnings.append(Problem(Severity.WARNING, ProblemCode(code), message, **where))

    def pool(self, name: str, subject: str) -> ObservedPool | None:
        """The observed pool, or None when it cannot be used (reported once per pool)."""
        p = self.observed.pools.get(name)
        if p is None or p.volumes is None:
            self.blocked[name].append(subject)
            return None
        return p

    def finish(self) -> Plan:
        def order(a: Action) -> tuple[str, str, str, str]:
            return (a.instance, a.disk, a.pool, _RANK.get(a.action, a.action.value))

        return Plan(
            tuple(sorted(self.actions, key=order)),
            tuple(sorted(self.errors, key=Problem.sort_key)),
            tuple(sorted(self.warnings, key=Problem.sort_key)),
            tuple(sorted(self.held, key=order)),
            dict(sorted(self.manifests.items())),
        )


@dataclass(frozen=True)
class Recorded:
    """A manifest's disk that has a record, as changed.py and migration.py judge it: `pool`
    is where the manifest wants it, `rpool` where its record is (the same pool unless it
    moves), `spec` the manifest's spec as a record holds it, `where` what problems name."""

    d: DesiredDisk
    spec: dict[str, Any]
    rec: DiskRecord
    pool: ObservedPool
    rpool: ObservedPool
    where: dict[str, Any]

    @property
    def exists(self) -> bool:
        """The recorded volume is in its pool."""
        return self.rec.volume in (self.rpool.volumes or ())

    @property
    def pre(self) -> Precondition:
        """What apply checks again: the record's generation and the volume's presence."""
        return Precondition(self.rec.generation, self.exists)

    @property
    def moved(self) -> bool:
        """The disk goes to another pool or volume name than the record's."""
        return (self.rec.pool, self.rec.volume) != (self.d.spec.pool, self.d.volume)

    @property
    def at(self) -> dict[str, Any]:
        """Where a problem about the recorded volume points."""
        return {"pool": self.rec.pool, "volume": self.rec.volume, **self.where}

    def action(
        self,
        kind: ActionKind,
        reason: str,
        *,
        destructive: bool = False,
        replaces: tuple[str, str] | None = None,
    ) -> Action:
        return disk_action(
            kind, self.d, self.spec, self.rec, reason, self.pre, destructive, replaces
        )


def disk_action(
    kind: ActionKind,
    d: DesiredDisk,
    spec: dict[str, Any],
    rec: DiskRecord | None,
    reason: str,
    pre: Precondition,
    destructive: bool = False,
    replaces: tuple[str, str] | None = None,
) -> Action:
    """An action on a manifest's disk at its desired location (a create or a replace is
    added through new.make, which checks its cache entry first)."""
    return Action(
        action=kind,
        instance=d.instance,
        disk=d.spec.name,
        pool=d.spec.pool,
        volume=d.volume,
        reason=reason,
        patch=patch(rec.spec if rec else None, spec),
        destructive=destructive,
        precondition=pre,
        spec=spec,
        recorded=rec.spec if rec else None,
        replaces=replaces,
    )


def where_of(d: DesiredDisk) -> dict[str, Any]:
    """Where a problem about a manifest's disk points: its instance, disk, file and line."""
    return {"instance": d.instance, "disk": d.spec.name, "file": d.file, "line": d.line}


def patch(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> tuple[dict[str, Any], ...]:
    import jsonpatch  # at the first action: a plan with none (a no-op) never needs it

    return tuple(jsonpatch.make_patch(dict(before or {}), dict(after or {})).patch)


def retained(spec: Mapping[str, Any]) -> bool:
    """A disk whose deletionPolicy keeps its volume when the reconciler lets it go."""
    return spec.get("deletionPolicy") == "Retain"
