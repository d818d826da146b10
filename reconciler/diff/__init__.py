"""The pure planning engine: desired + observed state -> Plan.

`planner` dispatches each instance's disks to one module per question (`new`, `changed`,
`removed`, `migration`, `ownership`, `guards`), all functions of one `draft.Draft`, the
plan being built (`draft` also holds `PlanOptions`); `render` shows a Plan to people and
programs; `desired` turns loaded manifests into the planner's input. Nothing here does
I/O: the snapshot tests pin what it plans."""

from reconciler.diff.draft import PlanOptions
from reconciler.diff.planner import plan

__all__ = ["PlanOptions", "plan"]
