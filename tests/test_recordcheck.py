"""schema/recordcheck.py: the one check every record passes wherever it is read.

Pure: records made here, no daemon. What the real pools do with a refused record is in
tests/test_record_trust.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.host import copykey
from reconciler.model.errors import RecordError
from reconciler.model.naming import (
    migration_name,
    retained_name,
    snapshot_name,
    template_entry_name,
)
from reconciler.model.record import Consistency, DiskRecord, snapshot_of
from reconciler.schema.recordcheck import check_record, is_entry_name, problem, validate

INST = "4f3f2898-69e3-5a0d-820a-c4e87987dbce"
ENTRY = template_entry_name("ext4", 1 << 26, None)
POOLS: dict[str, list[str]] = {"local": ["flat", "qcow2"], "vg": ["lvm"], "ceph": ["rbd"]}


def rec(**changes: Any) -> DiskRecord:
    doc: dict[str, Any] = {
        "backend": "qcow2",
        "pool": "local",
        "volume": f"{INST}_root",
        "instance": INST,
        "disk": "root",
        "format": "qcow2",
        "virtual_size": 1 << 26,
        "source": {"template": "ext4"},
        "backing": ENTRY,
        "state": "ready",
        "generation": 1,
    }
    doc.update(changes)
    if "spec" not in doc:  # the spec it was made to, as the executor writes it
        doc["spec"] = (
            {"template": "ext4", "size": doc["virtual_size"]}
            if doc.get("kind") == "cache"
            else spec_of(doc["disk"], doc["pool"], doc["backend"], doc["format"])
        )
    return DiskRecord.model_validate(doc)


def spec_of(disk: str, pool: str, backend: str, fmt: str) -> dict[str, Any]:
    return {
        "name": disk,
        "backend": backend,
        "pool": pool,
        "format": fmt,
        "size": 1 << 26,
        "source": {"template": "ext4"},
        "deletionPolicy": "Delete",
    }


def entry(**changes: Any) -> DiskRecord:
    base: dict[str, Any] = {
        "kind": "cache",
        "backend": "flat",
        "format": "raw",
        "volume": ENTRY,
        "instance": "",
        "disk": "",
        "backing": None,
    }
    return rec(**{**base, **changes})


def test_the_records_the_reconciler_writes_pass() -> None:
    good = [rec(), entry(), rec(backend="flat", format="raw", backing=None)]
    migrating = rec(
        schema_version=2,
        migration={
            "pool": "local",
            "volume": migration_name(f"{INST}_root"),
            "final_volume": f"{INST}_root",
            "backend": "flat",
            "format": "raw",
            "virtual_size": 1 << 26,
            "spec": spec_of("root", "local", "flat", "raw"),
            "phase": "copying",
            "retained_as": retained_name(f"{INST}_root", 3),
        },
    )
    for r in [*good, migrating]:
        check_record(r, r.pool, r.volume)
    assert validate([*good, migrating], POOLS) == ([*good, migrating], [])


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"backing": "/etc/shadow"}, "never a path"),
        ({"backing": "../../etc/shadow"}, "never a path"),
        ({"backing": f"{ENTRY}/../../x"}, "never a path"),
        ({"backing": "_cache_..x"}, "never a path"),
        ({"backing": "other-disk"}, "never a path"),
        ({"volume": f"{INST}_swap"}, "derived from its instance and disk"),
        ({"instance": "x/../y"}, "instance is not a name"),
        ({"disk": ".."}, "disk is not a name"),
        ({"backend": "lvm"}, "holds no qcow2"),
        ({"backend": "rbd", "format": "qcow2"}, "holds no qcow2"),
    ],
)
def test_a_disk_record_that_could_not_be_ours_is_refused(changes: dict[str, Any], why: str) -> None:
    r = rec(**changes)
    got = problem(r, r.pool, r.volume)
    assert got is not None and why in got
    with pytest.raises(RecordError, match="is refused"):
        check_record(r, r.pool, r.volume)
    good, bad = validate([r, entry()], POOLS)
    assert good == [entry()] and [(b.pool, b.volume) for b in bad] == [r.key()]


def test_a_record_read_under_another_name_or_pool_is_refused() -> None:
    r = rec()
    assert problem(r, "ceph", r.volume) == f"it describes local/{r.volume}"
    assert problem(r, "local", f"{INST}_swap") == f"it describes local/{r.volume}"


def test_a_cache_entry_names_no_disk_and_is_named_as_one() -> None:
    for bad in (entry(volume="entry"), entry(instance=INST), entry(backing=ENTRY)):
        assert problem(bad, bad.pool, bad.volume) is not None
    assert is_entry_name(ENTRY) and not is_entry_name("_cache_") and not is_entry_name("/x")


def test_backend_and_pool_must_agree_with_the_config() -> None:
    lvm = rec(backend="lvm", format="raw", backing=None)  # an lvm disk in a file pool
    good, bad = validate([lvm], POOLS)
    assert good == [] and "cannot be in pool local" in bad[0].error
    # A backend the config dropped from a file pool is still a file pool's: it migrates.
    flat_only = {"local": ["flat"]}
    assert validate([rec(), entry()], flat_only) == ([rec(), entry()], [])
    assert validate([rec(), entry()], None)[1] == []  # no config: nothing to compare


def test_a_backing_must_be_a_recorded_entry_of_the_same_pool() -> None:
    lone = rec()
    good, bad = validate([lone], POOLS)
    assert good == [] and "with a record of its own" in bad[0].error
    # Known from elsewhere (a plan of one instance reads its entries by name).
    assert validate([lone], POOLS, [("local", ENTRY)]) == ([lone], [])
    # Another pool's entry of that name is not this pool's.
    assert validate([lone, entry(pool="other")], None)[0] == [entry(pool="other")]
    # A disk being made may name an entry not recorded yet: it holds no data.
    creating = rec(state="creating")
    assert validate([creating], POOLS) == ([creating], [])
    # An entry that is itself refused backs nothing.
    assert validate([lone, entry(volume="_cache_/x")], POOLS)[0] == []


def test_racing_first_copies_all_use_one_whole_key(tmp_path: Path) -> None:
    """Threads of one apply seal their first copies at once: each gets the same key,
    never a key file read before it was whole."""
    got: list[bytes | None] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8, timeout=30)

    def first_copy() -> None:
        try:
            start.wait()
            got.append(copykey.load(tmp_path, create=True))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=first_copy) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    key = (tmp_path / copykey.KEY_FILE).read_bytes()
    assert got == [key] * 8 and len(key) == copykey.KEY_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == [copykey.KEY_FILE]  # no temporary
    sealed = copykey.seal(key, b"{}")
    assert copykey.unseal(key, sealed) == b"{}"
    assert copykey.unseal(key, sealed.replace(b"{}", b"[]")) is None
    assert copykey.unseal(None, sealed) is None and copykey.unseal(key, b"{}") is None


# -- snapshot records (kind snapshot) ---------------------------------------------------


def snap(name: str = "daily", **changes: Any) -> DiskRecord:
    doc: dict[str, Any] = {
        "kind": "snapshot",
        "volume": snapshot_name(f"{INST}_root", name),
        "snapshot": {"name": name, "disk_generation": 3, "consistency": "crash"},
    }
    doc.update(changes)
    return rec(**doc)


def test_a_snapshot_record_passes_and_round_trips() -> None:
    s = snap(snapshot={"name": "daily", "disk_generation": 3, "consistency": "frozen",
                       "handle": f"{INST}_root+snap-daily"})  # fmt: skip
    assert problem(s, "local", s.volume) is None
    assert snapshot_of(s).consistency is Consistency.FROZEN
    assert DiskRecord.model_validate_json(s.model_dump_json()) == s
    # A disk's record is stored as it was before snapshots existed: no `snapshot` key.
    assert "snapshot" not in rec().model_dump()
    assert validate([s, rec(kind="cache", volume=ENTRY, instance="", disk="", backing=None)],
                    POOLS)[1] == []  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"volume": f"{INST}_root+snap-other"}, "is " + f"{INST}_root+snap-daily"),
        ({"volume": f"{INST}_root"}, "not"),
        ({"snapshot": None}, "has no snapshot"),
        ({"kind": "disk", "volume": f"{INST}_root"}, "only a snapshot's record"),
        ({"snapshot": {"name": "../x", "disk_generation": 1, "consistency": "idle"}}, "name"),
        (
            {
                "snapshot": {
                    "name": "daily",
                    "disk_generation": 1,
                    "consistency": "idle",
                    "handle": "/etc/passwd",
                }
            },
            "not a name",
        ),
        ({"backing": "../../etc/shadow"}, "cache entry"),
        ({"state": "resizing"}, "never resizing"),
        (
            {"encryption": {"format": "luks", "secret": "4f3f2898-69e3-5a0d-820a-c4e87987dbce"}},
            "never encrypted",
        ),
    ],
)
def test_a_snapshot_record_that_was_not_ours_is_refused(changes: dict[str, Any], why: str) -> None:
    s = snap(**changes)
    got = problem(s, "local", s.volume)
    assert got is not None and why in got, got


def test_a_restored_disk_records_its_snapshot_source() -> None:
    spec = spec_of("root", "local", "qcow2", "qcow2") | {
        "source": {"snapshot": f"{INST}/root@daily"}
    }
    assert problem(rec(spec=spec), "local", f"{INST}_root") is None
    bad = spec | {"source": {"snapshot": f"{INST}/root@x/../y"}}
    assert "INSTANCE/DISK@NAME" in (problem(rec(spec=bad), "local", f"{INST}_root") or "")
