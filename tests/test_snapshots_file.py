"""Snapshots on a real file pool (private libvirtd): taken, restored, deleted.

What each test proves: a snapshot is a read-only copy of the disk as it was (bytes
compared), its record is ready and kept beside it (xattr) for `records rebuild`; a qcow2
overlay's snapshot keeps its cache entry, which `cache gc` counts; a restore is the copy
grown to the disk's size; the plan shows exactly what apply does; a FICLONE that fails
for another reason than "cannot" fails the snapshot (no full copy); on XFS with reflink
the copy shares blocks.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.cache import entries
from reconciler.drivers.file import snapshots as file_snapshots
from reconciler.model.naming import snapshot_name
from reconciler.model.record import RecordKind, RecordState
from tests.conftest import Pools, daemon_dir
from tests.env import Env, disk
from tests.test_images import catalog_entry

pytestmark = pytest.mark.libvirtd


def sha(path: Path, length: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length) if length is not None else f.read()).hexdigest()


def snap_disks(**snaps: list[str]) -> list[dict[str, Any]]:
    raw = disk("raw", size="8MiB", template="ext4", label="snap")
    overlay = disk("ovl", backend="qcow2", fmt="qcow2", size="8MiB", image="img")
    for d in (raw, overlay):
        if d["name"] in snaps:
            d["snapshots"] = snaps[d["name"]]
    return [raw, overlay]


def make_env(pools: Pools, root: Path, pool_dir: Path | None = None) -> Env:
    pool = pools.make(pool_dir or root / "pool")
    img = root / "img.raw"
    img.write_bytes(os.urandom(1 << 20))
    env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
    env.images = {"img": catalog_entry(img, "raw")}
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    return env


def records(env: Env) -> dict[str, Any]:
    store = env.store()
    try:
        recs, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    return {r.volume: r for r in recs}


def test_take_restore_and_delete(pools: Pools, tmp_path: Path) -> None:
    env = make_env(pools, tmp_path)
    vm = env.manifest("vm", snap_disks(raw=["s1"], ovl=["s1"]))
    rc, out, err = env.run()
    assert rc == 0, out + err
    raw, ovl = env.volume(vm, "raw"), env.volume(vm, "ovl")
    with open(raw, "r+b") as f:  # the disk's data as it is when the snapshot is taken
        f.seek(3 << 20)
        f.write(b"before" * 1000)
    before = sha(raw)

    # The plan says what apply does: one snapshot action for both disks, nothing else.
    plan = env.plan_json()
    keys = [snapshot_name(raw.name, "s1"), snapshot_name(ovl.name, "s1")]
    assert [(a["action"], a["snapshot"]["name"]) for a in plan["actions"]] == [("snapshot", "s1")]
    assert sorted(d["key"] for d in plan["actions"][0]["snapshot"]["disks"]) == sorted(keys)
    assert plan["actions"][0]["snapshot"]["consistency"] == "idle"
    present = {p.name for p in env.pool_dir().iterdir()}
    # Applied as a saved plan: what was reviewed is what is done, or nothing.
    saved = tmp_path / "plan.json"
    rc, out, err = env.run("--dry-run", "--plan-out", str(saved))
    assert rc == 0, out + err
    rc, out, err = env.main(
        ["apply", str(saved), "--config", str(env.config_path), str(env.manifests)]
    )
    assert rc == 0, out + err
    assert {p.name for p in env.pool_dir().iterdir()} - present == set(keys)
    assert env.plan_json()["actions"] == []

    recs = records(env)
    for key in keys:
        r = recs[key]
        assert r.kind is RecordKind.SNAPSHOT and r.state is RecordState.READY
        assert r.snapshot is not None and r.snapshot.consistency.value == "idle"
        assert r.snapshot.disk_generation == recs[key.split("+")[0]].generation
        path = env.pool_dir() / key
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o400
        assert os.getxattr(path, "trusted.reconciler.record")  # its copy, for rebuild
    assert sha(env.pool_dir() / keys[0]) == before
    # The overlay's snapshot keeps its cache entry as backing, and `cache gc` counts it.
    entry = recs[ovl.name].backing
    assert entry is not None and recs[keys[1]].backing == entry
    now = datetime.datetime.now(datetime.UTC)
    (e,) = [e for e in entries(env.store(), now) if e.volume == entry]
    assert e.users == 2

    # The disk changes; a new disk restored from the snapshot, larger, has the old bytes.
    with open(raw, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"after!" * 1000)
    rest = env.manifest(
        "restored",
        [
            disk("raw", size="16MiB", template=None) | {"source": {"snapshot": f"{vm}/raw@s1"}},
            disk("ovl", backend="qcow2", fmt="qcow2", size="8MiB", template=None)
            | {"source": {"snapshot": f"{vm}/ovl@s1"}},
        ],
    )
    plan = env.plan_json()
    assert sorted((a["action"], a["disk"]) for a in plan["actions"]) == [
        ("create", "ovl"), ("create", "raw")
    ]  # fmt: skip
    rc, out, err = env.run()
    assert rc == 0, out + err
    restored = env.volume(rest, "raw")
    assert os.path.getsize(restored) == 16 << 20
    assert sha(restored, 8 << 20) == before and sha(restored) != sha(raw)
    assert stat.S_IMODE(os.lstat(restored).st_mode) == 0o600
    recs = records(env)
    assert recs[restored.name].source == {"snapshot": f"{vm}/raw@s1"}
    assert recs[env.volume(rest, "ovl").name].backing == entry
    assert env.plan_json()["actions"] == []

    # Dropping a name deletes that snapshot (destructive); while a restore from it is
    # still to be made, it is refused, named.
    env.manifest("vm", snap_disks(raw=[], ovl=["s1"]), instance=vm)
    env.remove_manifest("restored")
    env.manifest(
        "pending",
        [disk("x", size="8MiB", template=None) | {"source": {"snapshot": f"{vm}/raw@s1"}}],
    )
    plan = env.plan_json("--prune")
    assert [e["code"] for e in plan["errors"]] == ["snapshot-in-use"]
    env.remove_manifest("pending")
    plan = env.plan_json("--prune")
    dels = [a for a in plan["actions"] if a["action"] == "delete-snapshot"]
    assert [(a["volume"], a["destructive"]) for a in dels] == [(keys[0], True)]
    rc, out, err = env.run("--prune")
    assert rc == 0, out + err
    assert not (env.pool_dir() / keys[0]).exists() and keys[0] not in records(env)
    # The instance goes: its disks take their snapshots with them.
    env.manifest("vm", [], instance=vm, deleted=True)
    rc, out, err = env.run("--prune")
    assert rc == 0, out + err
    assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(vm)]
    assert not [r for r in records(env).values() if r.instance == vm]


def test_a_ficlone_error_other_than_cannot_fails_without_a_full_copy(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(pools, tmp_path)
    vm = env.manifest("vm", snap_disks(raw=["s"]))
    rc, out, err = env.run()
    assert rc == 0, out + err

    def broken(fd: int, request: int, arg: int) -> int:
        assert request == file_snapshots.FICLONE
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_snapshots, "_ioctl", broken)
    rc, out, err = env.run()
    assert rc == 1 and "Input/output error" in out, out + err
    key = snapshot_name(env.volume(vm, "raw").name, "s")
    assert not (env.pool_dir() / key).exists()
    assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(".reconciler-tmp")]
    assert key not in records(env)  # rolled back: nothing orphaned

    # "Cannot" (this file system has no reflink): a sparse copy of the data extents.
    def cannot(fd: int, request: int, arg: int) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(file_snapshots, "_ioctl", cannot)
    rc, out, err = env.run()
    assert rc == 0, out + err
    path = env.pool_dir() / key
    assert sha(path) == sha(env.volume(vm, "raw"))
    assert os.stat(path).st_blocks * 512 < os.path.getsize(path)  # holes stayed holes


def test_on_xfs_with_reflink_the_snapshot_shares_blocks(
    pools: Pools, tmp_path: Path, libvirt_uri: str
) -> None:
    mnt = daemon_dir(libvirt_uri) / "mnt" / f"xfs-{tmp_path.name}"
    mnt.mkdir(parents=True, exist_ok=True)
    backing = tmp_path / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(320 << 20)  # mkfs.xfs's smallest
    made = subprocess.run(
        ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(backing)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        env = make_env(pools, tmp_path, mnt / "pool")
        vm = env.manifest("vm", snap_disks(raw=["s"], ovl=["s"]))
        for _ in range(2):  # made, then taken
            rc, out, err = env.run()
            assert rc == 0, out + err
        for name in ("raw", "ovl"):
            vol = env.volume(vm, name)
            snap = env.pool_dir() / snapshot_name(vol.name, "s")
            assert sha(snap) == sha(vol)
            shared = subprocess.run(
                ["xfs_io", "-r", "-c", "fiemap -v", str(snap)], capture_output=True, text=True
            )
            assert shared.returncode == 0, shared.stderr  # FIEMAP_EXTENT_SHARED is 0x2000
            if True:
                flags = [ln.split()[-1] for ln in shared.stdout.splitlines()[2:] if ln.strip()]
                assert any(int(f, 16) & 0x2000 for f in flags if f.startswith("0x")), shared.stdout
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_records_rebuild_restores_snapshot_records(pools: Pools, tmp_path: Path) -> None:
    env = make_env(pools, tmp_path)
    vm = env.manifest("vm", snap_disks(raw=["s"], ovl=["s", "t"]))
    for _ in range(2):  # made, then taken
        rc, out, err = env.run()
        assert rc == 0, out + err
    before = sorted((r.volume, r.kind, r.snapshot) for r in records(env).values())
    assert sum(1 for _, kind, _ in before if kind is RecordKind.SNAPSHOT) == 3
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()
    rc, out, err = env.main(
        ["records", "rebuild", "--yes", "--config", str(env.config_path), "local"]
    )
    assert rc == 0, out + err
    assert sorted((r.volume, r.kind, r.snapshot) for r in records(env).values()) == before
    assert env.plan_json()["actions"] == []
    # A copy someone else wrote on a snapshot is checked as input: refused, not restored.
    key = snapshot_name(env.volume(vm, "raw").name, "s")
    forged = records(env)[key].model_copy(update={"backing": "../../etc/shadow"})
    os.setxattr(
        env.pool_dir() / key, "trusted.reconciler.record", forged.model_dump_json().encode()
    )
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()
    rc, out, err = env.main(
        ["records", "rebuild", "--yes", "--config", str(env.config_path), "local"]
    )
    assert key not in records(env) and "cache entry" in out + err, out + err


def test_a_ploop_snapshot_and_an_exported_state_that_carries_snapshots(
    pools: Pools, tmp_path: Path
) -> None:
    env = make_env(pools, tmp_path)
    env.backends = ["flat", "qcow2", "ploop"]
    env.write_config()
    p = disk("p", backend="ploop", fmt="ploop", size="4MiB") | {"snapshots": ["s"]}
    vm = env.manifest("vm", [p])
    for _ in range(2):
        rc, out, err = env.run()
        assert rc == 0, out + err
    vol = env.volume(vm, "p")
    key = snapshot_name(vol.name, "s")
    assert sha(env.pool_dir() / key) == sha(vol)
    # A ploop disk cannot grow: a larger restore is refused in the plan, the same size made.
    src = {"source": {"snapshot": f"{vm}/p@s"}}
    env.manifest("big", [disk("p", backend="ploop", fmt="ploop", size="8MiB", template=None) | src])
    assert [e["code"] for e in env.plan_json()["errors"]] == ["snapshot-unsupported"]
    same = env.manifest(
        "big", [disk("p", backend="ploop", fmt="ploop", size="4MiB", template=None) | src]
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert sha(env.volume(same, "p")) == sha(env.pool_dir() / key)

    # An exported state carries the snapshot records, each checked as input when read.
    state = tmp_path / "state.json"
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, out + err
    doc = json.loads(state.read_text())
    assert doc["pools"]["local"]["snapshots"] is True
    (rec,) = [r for r in doc["records"] if r["volume"] == key]
    rc, out, err = env.run("--dry-run", "--observed", str(state))
    assert rc == 0 and "No changes." in out, out + err
    rec["snapshot"]["handle"] = "/etc/passwd"
    state.write_text(json.dumps(doc))
    rc, out, err = env.run("--dry-run", "--observed", str(state))
    assert "record-unreadable" in out and "not a name" in out, out + err
    # An older export (format 2: no `snapshots`, no `secrets`) does not say whether the
    # pool snapshots: nothing is planned from a default.
    doc["format_version"] = 2
    del doc["pools"]["local"]["snapshots"]
    del doc["pools"]["local"]["secrets"]
    rec["snapshot"]["handle"] = key
    env.manifest("vm", [p | {"snapshots": ["s", "t"]}], instance=vm)
    state.write_text(json.dumps(doc))
    rc, out, err = env.run("--dry-run", "--observed", str(state))
    assert "state-incomplete" in out and "snapshots of pool local" in out, out + err
