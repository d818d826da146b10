"""The pure planning engine: desired + observed state -> Plan."""

from reconciler.diff.model import (
    Action,
    ActionKind,
    Desired,
    DesiredDisk,
    DesiredInstance,
    FailedInput,
    Observed,
    ObservedPool,
    Plan,
    Precondition,
    Problem,
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
    "Observed",
    "ObservedPool",
    "Plan",
    "PlanOptions",
    "Precondition",
    "Problem",
    "Severity",
    "plan",
]
