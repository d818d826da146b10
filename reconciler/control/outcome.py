"""A reconcile's outcome: what it says in the status, and what the loop does next.

Owns the one mapping (`settlement`, controller-runtime's switch) of a reconcile's
`Result` to its queue action, its `controller_runtime_reconcile_total` label and whether
the status is terminal (waits for its manifest to change), and the one composition
(`decide`) of an instance's conditions from the errors and warnings of a plan and its
apply. The loop (reconciler/control/loop.py) and a one-shot apply's status
(`status.record_run`) both use them, so the two cannot say different things for the
same errors.

Invariants: whether an error is retried or waits for its manifest is declared with its
code (ProblemCode in reconciler/model/plan.py), never decided here; when a reconcile has
several errors, the first that may pass by itself decides (else the first), so an
instance is retried while any of its errors may pass; every "error" label is also counted
as an error (see metrics.Metrics.reconciled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from reconciler.model import Handling, Problem, ProblemCode, Severity

if TYPE_CHECKING:
    from reconciler.schema.load import FailedManifest

Condition = tuple[str, str, str]  # (status, reason, message)

AS_EXPECTED: Condition = ("False", "AsExpected", "")


class Result(Enum):
    """How a reconcile ended; `settlement` maps each to what the loop does next."""

    CONVERGED = "converged"
    WAITING = "waiting"  # nothing to do until a manifest names the instance again
    BACKOFF = "backoff"  # an error that may pass by itself
    TERMINAL = "terminal"  # an error that waits for the manifest (or an operator)


class QueueAction(Enum):
    FORGET = "forget"  # done: no retry, and the next failure starts a fresh backoff
    BACKOFF = "backoff"  # requeued after the instance's backoff


@dataclass(frozen=True)
class Settlement:
    queue: QueueAction
    label: str  # controller_runtime_reconcile_total's result
    terminal: bool  # the status says it waits for its manifest to change


def settlement(result: Result) -> Settlement:
    """The one mapping of a reconcile's result to its queue action, metric label and the
    status's terminality (controller-runtime's switch)."""
    match result:
        case Result.CONVERGED:
            return Settlement(QueueAction.FORGET, "success", terminal=False)
        case Result.WAITING:
            return Settlement(QueueAction.FORGET, "success", terminal=True)
        case Result.BACKOFF:
            return Settlement(QueueAction.BACKOFF, "error", terminal=False)
        case Result.TERMINAL:
            return Settlement(QueueAction.FORGET, "error", terminal=True)


@dataclass(frozen=True)
class Outcome:
    """A reconcile's result with its status conditions (see `decide`)."""

    result: Result
    ready: Condition
    degraded: Condition
    error: str = ""
    applying: bool = False  # written while the steps run, never settled

    @property
    def settled(self) -> Settlement:
        return settlement(self.result)

    def conditions(self) -> dict[str, Condition]:
        """The status's conditions: Ready, Progressing (True only while applying) and
        Degraded."""
        if self.applying:
            message = self.ready[2]
            return {
                "Ready": self.ready,
                "Progressing": ("True", "Applying", message),
                "Degraded": self.degraded,
            }
        return {
            "Ready": self.ready,
            "Progressing": ("False", "Idle", ""),
            "Degraded": self.degraded,
        }

    @classmethod
    def failed(cls, reason: str, message: str, *, terminal: bool) -> Outcome:
        """Not ready and degraded for `reason`: retried with backoff unless terminal."""
        return cls(
            Result.TERMINAL if terminal else Result.BACKOFF,
            ("False", reason, message),
            ("True", reason, message),
            error=message,
        )

    @classmethod
    def of(cls, problem: Problem) -> Outcome:
        """The outcome of an error, as its code declares it."""
        code = problem.code
        return cls.failed(code.reason, problem.message, terminal=code.handling is Handling.TERMINAL)

    @classmethod
    def progressing(cls, actions: int) -> Outcome:
        """Written as the status while the plan's steps run: the reconcile's end settles."""
        return cls(
            Result.CONVERGED,
            ("False", "Applying", f"applying {actions} action(s)"),
            AS_EXPECTED,
            applying=True,
        )

    @classmethod
    def settling(cls, message: str) -> Outcome:
        """Destructive steps wait for the manifest to settle: queued again once it has."""
        return cls(Result.WAITING, ("False", "Settling", message), AS_EXPECTED)


def decide(
    errors: Sequence[Problem], *, done: str, elsewhere: str | None = None, orphaned: int = 0
) -> Outcome:
    """The outcome of a reconcile (or of a one-shot run, for one instance) from its errors,
    in the order found: each code declares whether it is terminal, and the first that
    may pass by itself decides (else the first). Without errors: `orphaned` disks kept
    because no manifest names the instance wait for one (NoManifest); a disk owned by
    another live host (`elsewhere`, the message) waits for that host to let it go; else
    converged, `done` saying what was done."""
    if errors:
        transient = [e for e in errors if e.code.handling is not Handling.TERMINAL]
        return Outcome.of((transient or list(errors))[0])
    if orphaned:
        msg = (
            f"no manifest names this instance; its {orphaned} disk(s) are kept "
            "(watch --prune deletes them)"
        )
        return Outcome(Result.WAITING, ("Unknown", "NoManifest", msg), ("False", "NoManifest", msg))
    if elsewhere is not None:
        # Another live host owns the instance (it is moving): not ready here, and not
        # an error either; a resync plans the take-over once that host lets it go.
        ready = ("False", ProblemCode.OWNED_ELSEWHERE.reason, elsewhere)
        return Outcome(Result.WAITING, ready, AS_EXPECTED)
    return Outcome(Result.CONVERGED, ("True", "Converged", done), AS_EXPECTED)


def applied(n: int) -> str:
    """What a reconcile that applied `n` steps did, as its Converged message says."""
    return f"{n} action(s) applied" if n else "nothing to do"


def apply_failed(instance: str, disk: str, message: str) -> Problem:
    """A step that failed, as the error of its instance (the loop's own code)."""
    return Problem(
        Severity.ERROR,
        ProblemCode.APPLY_FAILED,
        f"{disk}: {message}",
        instance=instance,
        disk=disk,
    )


def located(e: Problem, failed: list[FailedManifest]) -> Problem:
    """An invalid manifest's error as `reconcile validate` says it, file:line:column first
    (the plan keeps file and line apart, and no column)."""
    if e.code != "manifest-invalid":
        return e
    for f in failed:
        for err in f.errors:
            text = f"{err.field}: {err.message}" if err.field else err.message
            if (f.file, err.location.line, text) == (e.file, e.line, e.message):
                return replace(e, message=str(err))
    return e
