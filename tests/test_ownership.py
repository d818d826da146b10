"""A pool knows which record store manages it; a lost store is rebuilt from record copies.

Against the real private libvirtd: a deleted records database, two state directories on
one pool, a cache entry's name taken by a stranger's file, and strangers in general.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from reconciler.drivers.file.copies import RECORD_XATTR, TRUSTED_XATTR
from reconciler.drivers.host import ownership
from reconciler.drivers.host.store import SqliteRecordStore, StoreIdentity
from reconciler.model.naming import template_entry_name
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd

QCOW2_HEADER_NAMING_HOST_FILE = (
    # A qcow2 header (version 3) whose backing file is /etc/passwd, as a guest could write
    # into its raw disk: the reconciler must never act on it.
    b"QFI\xfb"
    + (3).to_bytes(4, "big")
    + (104).to_bytes(8, "big")
    + (11).to_bytes(4, "big")
    + (16).to_bytes(4, "big")
    + (1 << 30).to_bytes(8, "big")
)


def _files(pool: Path) -> dict[str, tuple[int, int]]:
    """Every volume file with its size and mtime (the pool's state dir apart)."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in pool.iterdir()
        if p.name != ".reconciler"
    }


def _records(env: Env) -> dict[tuple[str, str], str]:
    store = env.store()
    try:
        good, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    return {r.key(): r.model_dump_json() for r in good}


def _drop_store(env: Env) -> None:
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()


def _two_instances(env: Env) -> tuple[str, str]:
    a = env.manifest(
        "a",
        [
            disk("disk", size="32MiB", template="blank"),
            disk("eph0", backend="qcow2", fmt="qcow2", size="32MiB", template="ext4"),
        ],
    )
    b = env.manifest("b", [disk("disk", size="16MiB", template="swap", policy="Retain")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    return a, b


def test_a_lost_store_is_refused_then_rebuilt_from_the_volumes_copies(env: Env) -> None:
    a, _ = _two_instances(env)
    before = _records(env)
    assert len(before) == 5  # three disks, the ext4 and the swap template entries
    # A guest writes a qcow2 header naming a host file into its raw disk.
    raw = env.volume(a, "disk")
    with open(raw, "r+b") as f:
        f.write(QCOW2_HEADER_NAMING_HOST_FILE)
    files = _files(env.pool_dir())

    _drop_store(env)
    for args in (("--dry-run", "--output", "json"), ()):
        rc, out, err = env.run(*args)
        assert rc == 1, out + err
        assert "Traceback" not in err
    plan = env.plan_json()
    (e,) = [p for p in plan["errors"] if p["code"] == "pool-managed-elsewhere"]
    assert "records database was lost or replaced" in e["message"]
    assert "reconcile records rebuild local" in e["message"]
    assert plan["actions"] == []
    assert _files(env.pool_dir()) == files  # nothing touched
    assert _records(env) == {}

    rc, out, err = env.main(
        ["records", "rebuild", "local", "--dry-run", "--config", str(env.config_path)]
    )
    assert rc == 0, out + err
    assert sum(line.startswith("restore local/") for line in out.splitlines()) == 5
    assert "5 record(s) would be restored" in out
    assert _records(env) == {}  # a dry run changes nothing

    rc, out, err = env.main(["records", "rebuild", "local", "--config", str(env.config_path)])
    assert rc == 1 and "--yes" in err  # no terminal: confirmation is required
    assert _records(env) == {}

    rc, out, err = env.main(
        ["records", "rebuild", "local", "--yes", "--config", str(env.config_path)]
    )
    assert rc == 0, out + err
    assert _records(env) == before  # the very records, the raw disk's format included
    rec = json.loads(before[("local", raw.name)])
    assert rec["format"] == "raw"
    rc, out, err = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 0, out + err
    assert "No changes." in out
    assert _files(env.pool_dir()) == files


def test_a_second_store_on_the_same_pool_is_refused_at_once(env: Env, tmp_path: Path) -> None:
    _two_instances(env)
    files = _files(env.pool_dir())
    other = Env(tmp_path / "other", env.uri, env.pools)
    other.write_config()
    c = other.manifest("c", [disk("disk", size="16MiB")])
    # The same instance as the first store's, too: never "already in the desired state".
    other.manifest("a", [disk("disk", size="32MiB", template="blank")])

    plan = other.plan_json()
    (e,) = [p for p in plan["errors"] if p["code"] == "pool-managed-elsewhere"]
    assert "managed by another reconciler's record store" in e["message"]
    assert str(env.root / "state" / "records.sqlite") in e["message"]
    assert plan["actions"] == []
    rc, out, err = other.run()
    assert rc == 1
    assert "already in the desired state" not in out
    assert not other.volume(c, "disk").exists()
    assert _files(env.pool_dir()) == files
    # The first store still manages its pool.
    rc, out, err = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 0, out + err


def _race(d: Path) -> tuple[list[str], list[str]]:
    """Two stores claim the pool `d` at the same moment: (winners, losers)."""
    won: list[str] = []
    lost: list[str] = []
    gate = threading.Barrier(2)

    def claim(ident: StoreIdentity) -> None:
        gate.wait()
        try:
            ownership.claim(d, "p", ident)
            won.append(ident.id)
        except ownership.ManagedElsewhere:
            lost.append(ident.id)

    threads = [
        threading.Thread(target=claim, args=(StoreIdentity(f"s{k}", f"/db{k}", "h"),))
        for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_claims_race_one_store_wins(tmp_path: Path) -> None:
    for i in range(20):
        d = tmp_path / f"p{i}" / ".reconciler"
        won, lost = _race(d)
        assert len(won) == 1 and len(lost) == 1
        owner = ownership.read_owner(d, "p")
        assert owner is not None and owner.store == won[0]
        assert [p.name for p in d.iterdir()] == ["owner"]  # no temporary file left


def test_a_layout_1_database_gets_an_identity_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE records (pool TEXT NOT NULL, volume TEXT NOT NULL, instance TEXT NOT "
        "NULL, generation INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (pool, volume)) "
        "WITHOUT ROWID; INSERT INTO records VALUES ('p', 'v', 'i', 1, '{}'); "
        "PRAGMA user_version=1;"
    )
    db.close()
    store = SqliteRecordStore(path)
    ident = store.identity()
    rows = store._db.execute("SELECT pool, volume FROM records").fetchall()
    store.close()
    assert rows == [("p", "v")]
    again = SqliteRecordStore(path)
    assert again.identity() == ident  # made once
    again.close()


def test_every_volume_carries_a_copy_of_its_record(env: Env) -> None:
    _, b = _two_instances(env)
    for (pool, volume), data in _records(env).items():
        path = env.pool_dir(pool) / volume
        copy = os.getxattr(path, TRUSTED_XATTR, follow_symlinks=False)
        assert json.loads(copy) == json.loads(data), volume
        # Only root can write the trusted namespace; nothing is left where others can.
        assert RECORD_XATTR not in os.listxattr(path, follow_symlinks=False)
    # A grown disk's copy follows its record.
    env.manifest("b", [disk("disk", size="32MiB", template="swap", policy="Retain")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    copy = json.loads(os.getxattr(env.volume(b, "disk"), TRUSTED_XATTR))
    assert copy["virtual_size"] == 32 << 20 and copy["state"] == "ready"


def test_a_stranger_at_a_cache_entrys_name_is_a_plan_error(env: Env) -> None:
    """The plan shows what apply would refuse: the entry a create needs is not ours."""
    inst = env.manifest("e", [disk("eph0", size="32MiB", template="ext4", label="scratch")])
    entry = env.pool_dir() / template_entry_name("ext4", 32 << 20, "scratch")
    entry.write_bytes(b"someone else's file")
    plan = env.plan_json()
    (e,) = [p for p in plan["errors"] if p["code"] == "cache-entry-unmanaged"]
    assert e["volume"] == entry.name and e["disk"] == "eph0"
    assert plan["actions"] == []
    rc, out, err = env.run()
    assert rc == 1
    assert "cache-entry-unmanaged" in out
    assert not env.volume(inst, "eph0").exists()
    assert entry.read_bytes() == b"someone else's file"
    # Once the stranger is gone, the plan and apply agree again.
    entry.unlink()
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert env.volume(inst, "eph0").exists()


def test_strangers_are_reported_once_per_pool_and_never_touched(env: Env) -> None:
    env.manifest("s", [disk("disk", size="16MiB")])
    pool = env.pool_dir()
    for i in range(25):
        (pool / f"stranger-{i:02d}.img").write_bytes(b"x")
    (pool / "lost+found").mkdir()
    rc, out, err = env.run()
    assert rc == 0, out + err
    plan = env.plan_json()
    (w,) = [p for p in plan["warnings"] if p["code"] == "unmanaged-volumes"]
    assert w["pool"] == "local"
    assert "holds 25 volume(s)" in w["message"]
    assert "stranger-00.img" in w["message"] and "and 15 more" in w["message"]
    # The first ten by name, in order, whatever order the pool lists them in.
    shown = ", ".join(f"stranger-{i:02d}.img" for i in range(10))
    assert w["message"].endswith(f": {shown} and 15 more")
    assert "lost+found" not in w["message"]
    assert all((pool / f"stranger-{i:02d}.img").read_bytes() == b"x" for i in range(25))
