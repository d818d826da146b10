"""Whether each disk of an instance can be given to a domain: made, at rest, at its
manifest's current content.

A disk is ready when its (checked) record is `ready` with no migration under way, and a
plan of its instance, made now against its records and volumes, has no step and no error
for it. Anything else is a state a compute service can act on: not made yet, being made,
resized, deleted or moved, a change still to apply (the manifest changed since the disk was
made), held by another host, or failed (the plan's error, terminal when its code says it
waits for the manifest, as the loop's status does: reconciler/control/outcome.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from reconciler.model import Handling, Plan, Problem, ProblemCode
from reconciler.model.desired import DesiredDisk
from reconciler.model.record import DiskRecord, RecordState


class DiskState(StrEnum):
    READY = "ready"
    NOT_MADE = "not-made"  # no record: the disk was never made (or is not yet)
    CREATING = "creating"
    RESIZING = "resizing"
    DELETING = "deleting"
    MIGRATING = "migrating"
    CHANGING = "changing"  # made, but a step is planned for it (the manifest changed)
    HELD_ELSEWHERE = "held-elsewhere"  # another host holds its record (a shared pool)
    FAILED = "failed"  # the plan has an error for it


@dataclass(frozen=True)
class DiskReadiness:
    disk: str
    pool: str
    volume: str
    state: DiskState
    message: str
    terminal: bool = False  # FAILED with only errors that wait for the manifest to change
    record: DiskRecord | None = None

    @property
    def ready(self) -> bool:
        return self.state is DiskState.READY

    def describe(self) -> str:
        return f"disk {self.disk} ({self.pool}/{self.volume}): {self.state}: {self.message}"


def _concerns(p: Problem, d: DesiredDisk) -> bool:
    """Whether a problem of the disk's instance is about this disk: it names the disk, or
    names no disk and no other pool (an instance's or its pool's error)."""
    if p.disk is not None:
        return p.disk == d.spec.name
    return p.pool is None or p.pool == d.spec.pool


def disk_readiness(
    disks: Sequence[DesiredDisk], records: Sequence[DiskRecord], plan: Plan
) -> list[DiskReadiness]:
    """Each of `disks`' readiness from its instance's checked `records` and `plan`."""
    by_key = {r.key(): r for r in records}
    out = []
    for d in disks:
        rec = by_key.get((d.spec.pool, d.volume))
        errors = [p for p in plan.errors if p.instance == d.instance and _concerns(p, d)]
        held = [
            p
            for p in plan.warnings
            if p.instance == d.instance
            and p.code is ProblemCode.OWNED_ELSEWHERE
            and p.disk == d.spec.name
        ]
        steps = [a for a in plan.actions if a.instance == d.instance and a.disk == d.spec.name]
        at = (d.spec.name, d.spec.pool, d.volume)
        if errors:
            terminal = all(p.code.handling is Handling.TERMINAL for p in errors)
            message = "; ".join(f"{p.code}: {p.message}" for p in errors)
            out.append(DiskReadiness(*at, DiskState.FAILED, message, terminal, rec))
        elif held:
            out.append(DiskReadiness(*at, DiskState.HELD_ELSEWHERE, held[0].message, record=rec))
        elif rec is None:
            why = steps[0].reason if steps else "no record"
            out.append(DiskReadiness(*at, DiskState.NOT_MADE, f"not made yet ({why})"))
        elif rec.migration is not None:
            to = rec.migration
            out.append(
                DiskReadiness(
                    *at,
                    DiskState.MIGRATING,
                    f"moving to {to.pool}/{to.final_volume} ({to.backend}, {to.format}): "
                    f"{to.phase}",
                    record=rec,
                )
            )
        elif rec.state is not RecordState.READY:
            state = DiskState(rec.state.value)
            what = {
                RecordState.CREATING: "being made (or its making was interrupted)",
                RecordState.RESIZING: f"being grown to {rec.pending_size} bytes",
                RecordState.DELETING: "being deleted",
            }[rec.state]
            out.append(DiskReadiness(*at, state, what, record=rec))
        elif steps:
            what = "; ".join(f"{a.action} planned: {a.reason}" for a in steps)
            out.append(DiskReadiness(*at, DiskState.CHANGING, what, record=rec))
        else:
            out.append(
                DiskReadiness(
                    *at, DiskState.READY, f"ready at generation {rec.generation}", record=rec
                )
            )
    return out
