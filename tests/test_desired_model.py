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
    copy = disk.with_entry(entry)
    # Field by field, by identity: == skips a field declared compare=False (pool_keys).
    for f in dataclasses.fields(DesiredDisk):
        assert getattr(copy, f.name) is (entry if f.name == "entry" else values[f.name]), f.name
    assert copy == dataclasses.replace(disk, entry=entry)
    assert copy != disk
    fields: dict[str, Any] = {f.name: object() for f in dataclasses.fields(DesiredInstance)}
    inst = DesiredInstance(**fields)
    disks = (disk,)
    assert inst.with_disks(disks) == dataclasses.replace(inst, disks=disks)
    assert inst.with_disks(disks) != inst
