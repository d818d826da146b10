"""A cache entry's record, the same in every pool: what each driver's image cache writes
before, after and while it uses an entry (invariant 2: the record before the volume)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable
from typing import Any

from reconciler import faults
from reconciler.errors import ReconcileError
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.record import DiskRecord, RecordKind, RecordState
from reconciler.store import ConflictError, RecordStore


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def begin(
    store: RecordStore,
    pool: str,
    backend: Backend,
    entry: str,
    spec: dict[str, Any],
    size: int,
    *,
    exists: Callable[[str], bool],
    remove: Callable[[str], None],
) -> DiskRecord | None:
    """Under the entry's lock: None if a ready entry exists, else its `creating` record
    (written) after removing, with `remove`, what an interrupted run left."""
    rec = store.get(pool, entry)
    present = exists(entry)
    if rec is not None and rec.state is RecordState.READY and present:
        return None
    if present:
        if rec is None:
            raise ReconcileError(
                f"{entry} exists in pool {pool} without a record; it is left alone "
                "and cannot be used until it is removed"
            )
        remove(entry)  # a partial entry from an interrupted run
    gen = rec.generation if rec is not None else None
    new = DiskRecord(
        kind=RecordKind.CACHE,
        backend=backend,
        pool=pool,
        volume=entry,
        instance="",
        disk="",
        format=DiskFormat.RAW,
        virtual_size=size,
        spec=spec,
        source=dict(spec),
        state=RecordState.CREATING,
        generation=(gen or 0) + 1,
    )
    store.put(new, gen)
    faults.point("cache.record.creating")
    return new


def touch(store: RecordStore, entry: DiskRecord) -> None:
    """Note that an entry was used (for `cache gc --min-age`), at most once a minute."""
    if entry.unused_for(datetime.datetime.now(datetime.UTC)) < 60:
        return
    with contextlib.suppress(ConflictError):  # someone else touched it just now
        store.put(
            entry.model_copy(update={"generation": entry.generation + 1, "last_used": now()}),
            entry.generation,
        )


def finish(store: RecordStore, rec: DiskRecord, virtual_size: int) -> DiskRecord:
    """The entry is made: its record `ready`, lazily durable (store.py)."""
    ready = rec.model_copy(
        update={
            "state": RecordState.READY,
            "generation": rec.generation + 1,
            "virtual_size": virtual_size,
            "last_used": now(),
        }
    )
    store.put(ready, rec.generation, durable=False)
    faults.point("cache.record.ready")
    return ready
