"""SIGKILL at every step boundary of a run that takes, deletes and restores from
snapshots on a file pool (--jobs 1): the next run converges with nothing orphaned or lost.

After each kill and one normal run: every record is ready, every file in the pool has a
record and every record its file, no temporary file is left, the snapshot that stays
holds the bytes it was taken with, and the disks restored from it hold them too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from reconciler.model.naming import snapshot_name
from reconciler.model.record import RecordState
from tests.conftest import Pools
from tests.env import Env, disk
from tests.killpoints import at_each, kill_points
from tests.test_images import catalog_entry

pytestmark = pytest.mark.libvirtd


def sha(path: Path, length: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length) if length is not None else f.read()).hexdigest()


def vm_disks(names: list[str]) -> list[dict[str, Any]]:
    return [
        disk("raw", size="4MiB", template="ext4", label="snap") | {"snapshots": names},
        disk("ovl", backend="qcow2", fmt="qcow2", size="4MiB", image="img") | {"snapshots": names},
    ]


def setup_env(pools: Pools, root: Path) -> tuple[Env, str]:
    pool = pools.make(root / "pool")
    img = root / "img.raw"
    img.write_bytes(hashlib.sha256(b"img").digest() * (1 << 14))
    env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
    env.images = {"img": catalog_entry(img, "raw")}
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    vm = env.manifest("vm", vm_disks(["keep", "old"]))
    for _ in range(2):  # made, then snapshotted
        rc, out, err = env.run()
        assert rc == 0, out + err
    assert env.plan_json()["actions"] == []
    with open(env.volume(vm, "raw"), "r+b") as f:  # the disk moves on after its snapshots
        f.write(b"later" * 100)
    return env, vm


def after(env: Env, vm: str) -> str:
    """Take `new`, delete `old`, and restore a new instance's disks from `keep`."""
    env.manifest("vm", vm_disks(["keep", "new"]), instance=vm)
    return env.manifest(
        "restored",
        [
            disk("raw", size="8MiB", template=None) | {"source": {"snapshot": f"{vm}/raw@keep"}},
            disk("ovl", backend="qcow2", fmt="qcow2", size="4MiB", template=None)
            | {"source": {"snapshot": f"{vm}/ovl@keep"}},
        ],
    )


def check_converged(env: Env, vm: str, rest: str, kept: dict[str, str]) -> None:
    assert env.plan_json()["actions"] == []
    store = env.store()
    try:
        recs, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    assert all(r.state is RecordState.READY for r in recs), [
        (r.volume, r.state) for r in recs if r.state is not RecordState.READY
    ]
    present = {p.name for p in env.pool_dir().iterdir() if p.name != ".reconciler"}
    assert present == {r.volume for r in recs}, (present, {r.volume for r in recs})
    for name in ("raw", "ovl"):
        vol = env.volume(vm, name).name
        assert sha(env.pool_dir() / snapshot_name(vol, "keep")) == kept[name]
        assert (env.pool_dir() / snapshot_name(vol, "new")).exists()
        assert not (env.pool_dir() / snapshot_name(vol, "old")).exists()
    assert sha(env.volume(rest, "raw"), 4 << 20) == kept["raw"]
    assert os.path.getsize(env.volume(rest, "raw")) == 8 << 20
    assert sha(env.volume(rest, "ovl")) == kept["ovl"]


def test_kill_at_every_step_boundary_of_snapshot_delete_and_restore(
    pools: Pools, tmp_path: Path
) -> None:
    env, vm = setup_env(pools, tmp_path / "trace")
    kept = {
        n: sha(env.pool_dir() / snapshot_name(env.volume(vm, n).name, "keep"))
        for n in ("raw", "ovl")
    }
    rest = after(env, vm)
    steps = env.traced_steps("--jobs", "1")
    assert {"snapshot.creating", "snapshot.copied", "snapshot.ready", "snapshot.deleting",
            "snapshot.deleted", "record.creating"} <= set(steps), steps  # fmt: skip
    check_converged(env, vm, rest, kept)

    def kill_at(k: int) -> None:
        env, vm = setup_env(pools, tmp_path / f"k{k}")
        kept = {
            n: sha(env.pool_dir() / snapshot_name(env.volume(vm, n).name, "keep"))
            for n in ("raw", "ovl")
        }
        rest = after(env, vm)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, f"{k}: {killed.stdout}{killed.stderr}"
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        check_converged(env, vm, rest, kept)

    points = kill_points(len(steps), 1)
    at_each(points, kill_at)
    print(f"snapshot kill points: {len(points)}: {json.dumps(steps)}")
