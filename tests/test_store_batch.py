"""SqliteRecordStore.for_instances: the records of many instances in one read, the same
as for_instance gives each (in the same order), a damaged record failing only its own
instance; put_many: many records written in one transaction, all or none, durable after
one fdatasync. Pure: a database in a temporary directory, no daemon."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.drivers.host.store import ConflictError, SqliteRecordStore
from reconciler.model.errors import RecordError
from reconciler.model.record import RecordState
from tests.test_recordcheck import rec

A = "00000000-0000-0000-0000-00000000000a"
B = "00000000-0000-0000-0000-00000000000b"
C = "00000000-0000-0000-0000-00000000000c"


def test_for_instances_is_for_instance_of_each(tmp_path: Path) -> None:
    store = SqliteRecordStore(tmp_path / "state" / "records.sqlite")
    try:
        # Written out of order, in two pools: each instance's come back as for_instance's.
        for instance, disk, pool in [
            (B, "swap", "local"),
            (A, "root", "vg"),
            (A, "eph0", "local"),
            (B, "root", "local"),
            (A, "root", "local"),
        ]:
            r = rec(
                instance=instance,
                disk=disk,
                pool=pool,
                volume=f"{instance}_{disk}",
                **({"backend": "lvm", "format": "raw", "backing": None} if pool == "vg" else {}),
            )
            store.put(r, None)
        got = store.for_instances([A, B, C, A])
        assert list(got) == [A, B, C]
        for instance in (A, B, C):
            assert got[instance] == store.for_instance(instance)
        assert got[C] == []
    finally:
        store.close()


def test_a_damaged_record_fails_only_its_instance(tmp_path: Path) -> None:
    store = SqliteRecordStore(tmp_path / "state" / "records.sqlite")
    try:
        store.put(rec(instance=A, disk="root", volume=f"{A}_root"), None)
        store.put_raw("local", f"{B}_root", 1, "{not json", instance=B)
        got = store.for_instances([A, B])
        assert got[A] == store.for_instance(A)
        assert isinstance(got[B], RecordError)
    finally:
        store.close()


def test_put_many_writes_all_or_none(tmp_path: Path) -> None:
    """A migration's `switched` record and its record at the new location are one
    transaction: a conflict on the second leaves the first unwritten too."""
    store = SqliteRecordStore(tmp_path / "state" / "records.sqlite")
    try:
        old = rec(instance=A, disk="root", volume=f"{A}_root")
        store.put(old, None)
        moved = old.model_copy(update={"generation": 2, "state": RecordState.RESIZING})
        there = rec(instance=A, disk="root", pool="fast", volume=f"{A}_root")
        taken = there.model_copy(update={"virtual_size": 1 << 27})
        store.put(taken, None)  # someone's record at the new location
        with pytest.raises(ConflictError, match=f"fast/{A}_root is at generation 1"):
            store.put_many([(moved, 1), (there, None)])
        assert store.get("local", f"{A}_root") == old
        assert store.get("fast", f"{A}_root") == taken

        store.put_many([(moved, 1), (there.model_copy(update={"generation": 2}), 1)])
        assert store.get("local", f"{A}_root") == moved
        assert store.get("fast", f"{A}_root") == there.model_copy(update={"generation": 2})
    finally:
        store.close()


def test_a_durable_put_many_is_one_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteRecordStore(tmp_path / "state" / "records.sqlite")
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        writes = [(rec(instance=i, disk="root", volume=f"{i}_root"), None) for i in (A, B, C)]
        store.put_many(writes)
        assert len(synced) == 1
        store.put_many(
            [(r.model_copy(update={"generation": 2}), 1) for r, _ in writes], durable=False
        )
        assert len(synced) == 1
        got = [store.get("local", f"{i}_root") for i in (A, B, C)]
        assert [r.generation if r else None for r in got] == [2, 2, 2]
    finally:
        store.close()
