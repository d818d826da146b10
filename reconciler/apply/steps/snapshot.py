"""The `snapshot` and `delete-snapshot` steps (diff/snapshots.py plans them)."""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.model.errors import ReconcileError


def take(ctx: StepContext, h: Held) -> StepResult:
    raise ReconcileError(f"not taking snapshot {h.action.volume}: snapshots are not built yet")


def delete(ctx: StepContext, h: Held) -> StepResult:
    raise ReconcileError(f"not deleting snapshot {h.action.volume}: snapshots are not built yet")
