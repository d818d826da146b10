"""The planner's Desired values: the fast copies keep every field."""

from __future__ import annotations

import dataclasses
from typing import Any

from reconciler.model.desired import DesiredDisk, DesiredInstance


def test_with_entry_and_with_disks_are_replace_with_every_field() -> None:
    """A field added to DesiredDisk or DesiredInstance must be added to the fast copies
    too: every field gets its own value here, so one they dropped would differ."""
    values: dict[str, Any] = {f.name: object() for f in dataclasses.fields(DesiredDisk)}
    disk = DesiredDisk(**values)
    entry = "_cache_template-swap-1-x"
    assert disk.with_entry(entry) == dataclasses.replace(disk, entry=entry)
    assert disk.with_entry(entry) != disk
    fields: dict[str, Any] = {f.name: object() for f in dataclasses.fields(DesiredInstance)}
    inst = DesiredInstance(**fields)
    disks = (disk,)
    assert inst.with_disks(disks) == dataclasses.replace(inst, disks=disks)
    assert inst.with_disks(disks) != inst
