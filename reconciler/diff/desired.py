"""Turn loaded manifests into the planner's Desired state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from reconciler.model.desired import Desired, DesiredDisk, DesiredInstance, FailedInput
from reconciler.model.keying import PoolKeys
from reconciler.model.naming import volume_name
from reconciler.schema.common import Preallocation
from reconciler.schema.config import PoolConfig
from reconciler.schema.load import FailedManifest, LoadedManifest


def build_desired(
    loaded: Sequence[LoadedManifest],
    failed: Sequence[FailedManifest],
    pools: Mapping[str, PoolConfig] | None = None,
) -> Desired:
    """The planner's input; `pools` (the config's) says how each pool allocates a disk
    made in it (`preallocation`), which the plan shows and apply records."""
    modes = {
        name: pc.preallocation
        for name, pc in (pools or {}).items()
        if pc.preallocation is not Preallocation.OFF
    }
    sourced = {name for name, pc in (pools or {}).items() if pc.keys is not None}
    pool_keys = {
        name: PoolKeys(pc.uri, None if pc.keys is None else pc.keys.model_dump_json())
        for name, pc in (pools or {}).items()
    }
    instances = []
    for lm in loaded:
        m = lm.manifest
        disks = tuple(
            DesiredDisk(
                instance=m.instance,
                spec=d,
                volume=volume_name(m.instance, d.name),
                file=lm.file,
                line=lm.disk_line(i),
                preallocation=modes.get(d.pool),
                key_source=d.pool in sourced,
                pool_keys=pool_keys,
            )
            for i, d in enumerate(m.disks)
        )
        instances.append(DesiredInstance(m.instance, lm.file, m.deleted, disks))
    bad = tuple(
        FailedInput(
            file=f.file,
            line=e.location.line,
            message=(f"{e.field}: {e.message}" if e.field else e.message),
            instance=f.instance,
        )
        for f in failed
        for e in f.errors
    )
    return Desired(tuple(instances), bad)
