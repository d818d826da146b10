"""SIGKILL at every step boundary of a run that migrates disks (with --jobs 1; with --jobs 4,
at a spread of them): in one pool (flat -> qcow2, and with deletionPolicy Retain), and to
another pool (a qcow2 overlay flattened on the way, and with Retain).

Right after each kill, every disk has exactly one record that says where its data is (the
old volume while the copy is made, the copy once it is switched), and the data there is
the disk's. After the next run, every disk is in its new layout with the same data, and
nothing is left but the disks, their cache entries and the volumes Retain keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.model.record import DiskRecord, MigrationPhase, RecordKind, RecordState
from tests.conftest import Pools
from tests.env import Env, disk
from tests.killpoints import at_each, kill_points
from tests.test_migrate import content, files, two_pools, write_pattern

pytestmark = pytest.mark.libvirtd

BEFORE = {
    "fmt": disk("d", size="8MiB"),
    "tier": disk("d", backend="qcow2", fmt="qcow2", size="8MiB", template="ext4", label="t"),
    "keep": disk("d", size="8MiB", policy="Retain"),
    "keepfar": disk("d", size="8MiB", policy="Retain"),
}
AFTER = {
    "fmt": disk("d", backend="qcow2", fmt="qcow2", size="8MiB"),
    "tier": disk("d", size="8MiB", template="ext4", label="t", pool="fast"),
    "keep": disk("d", backend="flat", fmt="qcow2", size="8MiB", policy="Retain"),
    "keepfar": disk("d", size="8MiB", policy="Retain", pool="fast"),
}
FORMAT = {"fmt": "raw", "tier": "qcow2", "keep": "raw", "keepfar": "raw"}


def setup(pools: Pools, root: Path) -> tuple[Env, dict[str, str], dict[str, str]]:
    env = two_pools(pools, root)
    ids = {name: env.manifest(name, [spec]) for name, spec in BEFORE.items()}
    rc, out, err = env.run()
    assert rc == 0, out + err
    want = {}
    for name, inst in ids.items():
        vol = env.volume(inst, "d")
        write_pattern(vol, FORMAT[name])
        want[name] = content(vol, FORMAT[name], root)
    for name, spec in AFTER.items():
        env.manifest(name, [spec], instance=ids[name])
    return env, ids, want


def records(env: Env) -> list[DiskRecord]:
    store = env.store()
    recs, bad = store.load_all()
    store.close()
    assert not bad
    return recs


def check_after_kill(env: Env, ids: dict[str, str], want: dict[str, str], tmp: Path) -> None:
    """One record per disk names where its data is, and the data there is the disk's."""
    recs = [r for r in records(env) if r.kind is RecordKind.DISK]
    for name, inst in ids.items():
        mine = [r for r in recs if r.instance == inst]
        old = [r for r in mine if r.migration is not None]
        if len(mine) == 2:  # switched to another pool, the old record not yet removed
            (rec,) = old
            assert rec.migration is not None
            assert rec.migration.phase is MigrationPhase.SWITCHED
            assert {r.key() for r in mine} == {rec.key(), rec.migration.target()}
        else:
            (rec,) = mine
        mig = rec.migration
        if mig is not None and mig.phase is MigrationPhase.SWITCHED:
            copy = env.pool_dir(mig.pool) / mig.volume
            where = copy if copy.exists() else env.pool_dir(mig.pool) / mig.final_volume
            fmt = mig.format.value
        else:
            where = env.pool_dir(rec.pool) / rec.volume
            fmt = rec.format.value
            if rec.state is RecordState.CREATING:
                continue  # not reached: no migration creates
        assert content(where, fmt, tmp) == want[name], (name, rec)


def check_converged(env: Env, ids: dict[str, str], want: dict[str, str], tmp: Path) -> None:
    recs = records(env)
    assert all(r.state is RecordState.READY and r.migration is None for r in recs), recs
    disks = {r.instance: r for r in recs if r.kind is RecordKind.DISK}
    kept = set()
    for name, inst in ids.items():
        rec = disks[inst]
        spec = AFTER[name]
        assert (rec.pool, rec.backend.value, rec.format.value) == (
            spec["pool"],
            spec["backend"],
            spec["format"],
        )
        assert content(env.pool_dir(rec.pool) / rec.volume, rec.format.value, tmp) == want[name]
        if name == "keepfar":
            kept.add(("local", rec.volume))
            assert content(env.volume(inst, "d"), "raw", tmp) == want[name]
    for pool in ("local", "fast"):
        present = files(env, pool)
        recorded = {r.volume for r in recs if r.pool == pool}
        retained = {v for v in present if "+retained-g" in v}
        assert len(retained) == (1 if pool == "local" else 0), present
        for v in retained:  # the old volume of `keep`, as it was
            assert content(env.pool_dir(pool) / v, "raw", tmp) == want["keep"]
        assert present - retained - {v for p, v in kept if p == pool} == recorded, (
            pool,
            present,
            recorded,
        )


@pytest.mark.parametrize("jobs", [1, 4])
def test_kill_at_every_migration_step(pools: Pools, tmp_path: Path, jobs: int) -> None:
    """--jobs 1: each kill point is exactly the traced step, and every one is killed at;
    --jobs 4: the four migrations run together and a kill cuts several short at once, at
    varying steps: eight boundaries spread from the first to the last
    (tests/killpoints.py; all 30 passed when this was sampled)."""
    env, ids, want = setup(pools, tmp_path / "trace")
    steps = env.traced_steps("--jobs", str(jobs))
    names = set(steps)
    assert {"record.migrating", "volume.copied", "volume.verified", "record.switched"} <= names
    assert {"volume.switched", "volume.retained", "record.moved", "record.deleted"} <= names
    check_converged(env, ids, want, tmp_path)

    def kill_at(n: int) -> None:
        root = tmp_path / f"kill{n}"
        env, ids, want = setup(pools, root)
        res = env.subprocess("--jobs", str(jobs), env={"RECONCILER_CRASH_AT": str(n)})
        assert res.returncode == -9, f"kill point {n} ({steps[n - 1]}):\n{res.stdout}\n{res.stderr}"
        check_after_kill(env, ids, want, root)
        rc, out, err = env.run()
        assert rc == 0, f"kill point {n} ({steps[n - 1]}):\n{out}\n{err}"
        check_converged(env, ids, want, root)
        plan = env.plan_json()
        assert plan["actions"] == [], (n, json.dumps(plan["actions"]))

    at_each(kill_points(len(steps), jobs), kill_at)  # two at a time: each its own pools, env
