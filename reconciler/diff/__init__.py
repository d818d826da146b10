"""The pure planning engine: desired + observed state -> Plan.

`planner` dispatches each instance's disks to one module per question (a new disk, a
changed disk, a removed disk, a migration, ownership, the guards); `render` shows a Plan to
people and programs; `desired` turns loaded manifests into the planner's input. Nothing
here does I/O: the snapshot tests pin what it plans."""

from reconciler.diff.planner import PlanOptions, plan

__all__ = ["PlanOptions", "plan"]
