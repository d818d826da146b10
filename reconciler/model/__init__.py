"""The values every stage passes on, with no I/O behind them: what is desired, what is
observed, the plan (actions, problems and their codes), records, sizes, names and errors.

The names below are loaded on first use (PEP 562), so importing a leaf module of this
package (`reconciler.model.units`, which schema/common.py needs for its types) does not
import desired.py and with it the manifest schema that is still being imported."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers (exported by __all__)
    from reconciler.model.desired import (
        Desired,
        DesiredDisk,
        DesiredInstance,
        FailedInput,
    )
    from reconciler.model.observed import (
        Holder,
        Observed,
        ObservedPool,
    )
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

_WHERE = {
    **dict.fromkeys(("Desired", "DesiredDisk", "DesiredInstance", "FailedInput"), "desired"),
    **dict.fromkeys(("Holder", "Observed", "ObservedPool"), "observed"),
    **dict.fromkeys(
        ("Action", "ActionKind", "Handling", "Plan", "Precondition", "Problem", "ProblemCode",
         "Severity"),
        "plan",
    ),
}  # fmt: skip

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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value
