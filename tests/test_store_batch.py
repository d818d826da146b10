"""SqliteRecordStore.for_instances: the records of many instances in one read, the same
as for_instance gives each (in the same order), a damaged record failing only its own
instance. Pure: a database in a temporary directory, no daemon."""

from __future__ import annotations

from pathlib import Path

from reconciler.drivers.host.store import SqliteRecordStore
from reconciler.model.errors import RecordError
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
