"""The pure planning engine: desired + observed state -> Plan."""

from reconciler.diff.model import (
    Action,
    ActionKind,
    Desired,
    DesiredDisk,
    DesiredInstance,
    FailedInput,
    Handling,
    Observed,
    ObservedPool,
    Plan,
    Precondition,
    Problem,
    ProblemCode,
    Severity,
)
from reconciler.diff.planner import PlanOptions, plan

__all__ = [
    "Action",
    "ActionKind",
    "Desired",
    "DesiredDisk",
    "DesiredInstance",
    "FailedInput",
    "Handling",
    "Observed",
    "ObservedPool",
    "Plan",
    "PlanOptions",
    "Precondition",
    "Problem",
    "ProblemCode",
    "Severity",
    "plan",
]
