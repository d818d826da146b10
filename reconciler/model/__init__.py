"""The values every stage passes on, with no I/O behind them: what is desired, what is
observed, the plan (actions, problems and their codes), records, sizes, names and errors."""

from reconciler.model.desired import Desired, DesiredDisk, DesiredInstance, FailedInput
from reconciler.model.observed import Holder, Observed, ObservedPool
from reconciler.model.plan import (
    Action,
    ActionKind,
    Handling,
    Plan,
    Precondition,
    Problem,
    ProblemCode,
    Severity,
)

__all__ = [
    "Action",
    "ActionKind",
    "Desired",
    "DesiredDisk",
    "DesiredInstance",
    "FailedInput",
    "Handling",
    "Holder",
    "Observed",
    "ObservedPool",
    "Plan",
    "Precondition",
    "Problem",
    "ProblemCode",
    "Severity",
]
