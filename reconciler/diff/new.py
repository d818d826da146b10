"""A disk made from its source: a new disk (no record), and a recorded disk made again.

`disk` plans a manifest's disk that has no record and no other host's hold: created,
unless a volume of its name already stands in the pool without a record (it is never
touched: DESIGN 4) or the observed state cannot say whether another host holds its record.
`make` is the one way any question plans a create or a replace: the cache entry the disk
is made from must be usable first, and the pool's preallocation one the disk's format can
be made with (apply would refuse either); the action carries that preallocation.
`drifted` plans a recorded disk whose volume is gone from its pool: made again, with a
warning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reconciler.diff import guards
from reconciler.diff.draft import Draft, Recorded, disk_action, where_of
from reconciler.diff.render import describe_source
from reconciler.model.desired import DesiredDisk
from reconciler.model.observed import ObservedPool
from reconciler.model.plan import Action, ActionKind, Precondition
from reconciler.model.units import format_size
from reconciler.schema.common import Backend, preallocation_refusal
from reconciler.schema.manifest import ImageSource, SnapshotSource
from reconciler.schema.recordcheck import ENCRYPTING_BACKENDS


def disk(
    draft: Draft, d: DesiredDisk, spec: dict[str, Any], pool: ObservedPool, where: dict[str, Any]
) -> None:
    """A disk with no record that no other host holds, wanted in `pool`."""
    assert pool.volumes is not None
    if d.volume in pool.volumes:
        guards.unmanaged(
            draft,
            (d.spec.pool, d.volume),
            f"volume {d.volume} exists in pool {d.spec.pool} but the reconciler has "
            "no record of making it; it is left untouched (adopt it explicitly or "
            "remove it by hand)",
            pool=d.spec.pool,
            volume=d.volume,
            **where,
        )
        return
    needs = "whether another host holds this disk's record"
    if guards.incomplete(
        draft, pool, frozenset({"shared", "held"}), needs, pool=pool.name, **where
    ):
        return
    reason = (
        f"new disk: {d.spec.format} {format_size(d.spec.size)} from "
        f"{describe_source(spec['source'])}"
    )
    pre = Precondition(None, False)
    make(draft, d, disk_action(ActionKind.CREATE, d, spec, None, reason, pre))


def make(draft: Draft, d: DesiredDisk, action: Action) -> None:
    """A create or a replace of `d`, unless the cache entry it is made from cannot be used
    or the pool's preallocation cannot make its format; made with that preallocation."""
    assert action.action in (ActionKind.CREATE, ActionKind.REPLACE)
    if guards.entry_refused(draft, d, draft.observed.pools[d.spec.pool], where_of(d)):
        return
    if isinstance(d.spec.source, SnapshotSource):
        # A restore (diff/snapshots.py checks its snapshot): a sparse copy, never
        # preallocated, and never encrypted (that pass refuses an encrypted one).
        draft.actions.append(action)
        return
    if preallocation_refused(draft, d):
        return
    if encryption_refused(draft, d):
        return
    draft.actions.append(dataclasses.replace(action, preallocation=d.preallocation))


def encryption_refused(draft: Draft, d: DesiredDisk) -> bool:
    """True (with an error) where `d` asks for encryption its backend cannot make yet."""
    if d.spec.encryption is None:
        return False
    if d.spec.backend is Backend.RBD and isinstance(d.spec.source, ImageSource) and d.entry is None:
        # The rbd driver names no cache entry for a catalog rbd:// snapshot of the pool's
        # own cluster (its disks are cloned from it directly), and an encrypted disk is a
        # copy, not a clone, which apply would refuse: said here, before anything is made.
        draft.error(
            "encryption-unsupported",
            f"an encrypted disk of image {d.spec.source.image}, a catalog rbd:// snapshot "
            "of this cluster, is not built yet (it would be copied from the snapshot); give "
            "the catalog another location, or leave the disk unencrypted; the disk is not made",
            pool=d.spec.pool,
            volume=d.volume,
            **where_of(d),
        )
        return True
    if d.spec.backend in ENCRYPTING_BACKENDS:
        return False
    draft.error(
        "encryption-unsupported",
        f"encryption of a {d.spec.backend.value} disk is not supported (flat, qcow2, lvm "
        "and rbd disks are); the disk is not made",
        pool=d.spec.pool,
        volume=d.volume,
        **where_of(d),
    )
    return True


def preallocation_refused(draft: Draft, d: DesiredDisk) -> bool:
    """True (with an error) where `d`'s pool allocates disks in a way its format cannot
    be made (a raw disk with metadata, a ploop one with falloc or metadata)."""
    why = preallocation_refusal(d.spec.format, d.preallocation)
    if why is None:
        return False
    assert d.preallocation is not None
    draft.error(
        "preallocation-unsupported",
        f"pool {d.spec.pool} has preallocation {d.preallocation.value}: {why}; the disk "
        "is not made",
        pool=d.spec.pool,
        volume=d.volume,
        **where_of(d),
    )
    return True


def drifted(
    draft: Draft,
    r: Recorded,
    *,
    then: str = "",
    reason: str,
    replaces: tuple[str, str] | None = None,
) -> None:
    """A recorded disk whose volume was removed outside the reconciler: made again."""
    draft.warn(
        "drift",
        f"volume {r.rec.volume} is missing from pool {r.rec.pool}: it was removed outside "
        f"the reconciler{then}",
        **r.at,
    )
    make(draft, r.d, r.action(ActionKind.CREATE, reason, replaces=replaces))
