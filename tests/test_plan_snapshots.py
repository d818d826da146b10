"""Pinned plans (text and JSON) for every example manifest against several observed states."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from syrupy.assertion import SnapshotAssertion

from reconciler.diff import PlanOptions, plan
from reconciler.diff.render import to_json, to_markdown, to_text
from reconciler.model import Desired, Observed, ObservedPool
from reconciler.model.naming import migration_name, volume_name
from reconciler.model.record import Migration, MigrationPhase, RecordState
from reconciler.schema import exported
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import DiskSpec
from tests.helpers import (
    EXAMPLES,
    ROOT,
    converged,
    desired_from,
    example_config,
    observed,
    record_for,
)
from tests.snapshot_ext import JsonSnapshot, MarkdownSnapshot, TextSnapshot

POOLS = ("demo", "demo-fast")
WEB = "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01"
DB = "5d6c2b7e-0f4a-4b8e-a1d3-7e9f00c4a2b2"
BATCH = "9a1f3c5e-7b2d-4e6f-8a0b-1c2d3e4f5a63"
OLD = "c3d4e5f6-a7b8-4c9d-8e0f-a1b2c3d4e5f4"
GONE = str(uuid.UUID(int=0xFEED))


@pytest.fixture
def desired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Desired:
    monkeypatch.chdir(ROOT)  # manifest paths in the output are relative to the repo
    config = example_config(tmp_path)
    d = desired_from([str(EXAMPLES.relative_to(ROOT) / "manifests")], config)
    assert not d.failed, d.failed
    return d


def _spec(desired: Desired, instance: str, disk: str) -> DiskSpec:
    for inst in desired.instances:
        for dd in inst.disks:
            if inst.instance == instance and dd.spec.name == disk:
                return dd.spec
    raise KeyError((instance, disk))


def _extra_spec(name: str, pool: str, size: int, policy: str = "Delete") -> DiskSpec:
    return DiskSpec.model_validate(
        {
            "name": name,
            "backend": "flat",
            "pool": pool,
            "format": "raw",
            "size": size,
            "source": {"template": "blank"},
            "deletionPolicy": policy,
        }
    )


def empty(d: Desired) -> Observed:
    return observed([], {p: set() for p in POOLS})


def converged_state(d: Desired) -> Observed:
    records, volumes = converged(d, POOLS)
    return observed(records, volumes)


def drifted(d: Desired) -> Observed:
    """Volume gone, size changed in the manifest, unmanaged volume, orphans, a tombstone."""
    records, volumes = converged(d, POOLS)
    # web-1's swap volume was removed behind the reconciler's back.
    volumes["demo"].discard(volume_name(WEB, "disk.swap"))
    # web-1's ephemeral disk was made at 256 MiB; the manifest now says 512 MiB.
    eph = _spec(d, WEB, "disk.eph0")
    records = [r for r in records if r.volume != volume_name(WEB, "disk.eph0")]
    records.append(record_for(WEB, eph, volume_name(WEB, "disk.eph0"), size=256 << 20))
    # batch-7's scratch volume exists but was not made by the reconciler.
    records = [r for r in records if r.volume != volume_name(BATCH, "scratch")]
    # An instance nobody has a manifest for any more.
    orphan = _extra_spec("disk", "demo", 1 << 30)
    records.append(record_for(GONE, orphan, volume_name(GONE, "disk")))
    volumes["demo"].add(volume_name(GONE, "disk"))
    # The deleted instance old-3 still has two disks; one is kept by its policy.
    for spec in (
        _extra_spec("disk", "demo", 1 << 30),
        _extra_spec("data", "demo-fast", 2 << 30, "Retain"),
    ):
        records.append(record_for(OLD, spec, volume_name(OLD, spec.name)))
        volumes[spec.pool].add(volume_name(OLD, spec.name))
    return observed(records, volumes)


def refused(d: Desired) -> Observed:
    """Changes that are not actions: a format change, a shrink, a guest-written header."""
    records, volumes = converged(d, POOLS)
    db_disk = _spec(d, DB, "disk")
    db_data = _spec(d, DB, "data")
    keep = {volume_name(DB, "disk"), volume_name(DB, "data"), volume_name(WEB, "disk.eph0")}
    records = [r for r in records if r.volume not in keep]
    # db-1's root was made raw; the manifest now says qcow2.
    records.append(
        record_for(DB, db_disk, volume_name(DB, "disk"), fmt="raw", spec_override={"format": "raw"})
    )
    # db-1's data disk is 4 GiB; the manifest says 1 GiB.
    records.append(record_for(DB, db_data, volume_name(DB, "data"), size=4 << 30))
    # web-1's ephemeral is recorded raw, but a guest wrote a qcow2 header into it.
    eph = _spec(d, WEB, "disk.eph0")
    records.append(record_for(WEB, eph, volume_name(WEB, "disk.eph0")))
    return observed(records, volumes, headers={"demo": {volume_name(WEB, "disk.eph0"): "qcow2"}})


def pool_down(d: Desired) -> Observed:
    records, volumes = converged(d, POOLS)
    volumes.pop("demo-fast")
    return observed(
        records,
        volumes,
        unreachable={"demo-fast": "libvirt pool 'reconciler-demo-fast' is not active"},
    )


def interrupted(d: Desired) -> Observed:
    """A run stopped mid-create, mid-resize and mid-delete."""
    records, volumes = converged(d, POOLS)
    by_vol = {r.volume: r for r in records}
    web_root = by_vol[volume_name(WEB, "disk")]
    db_cfg = by_vol[volume_name(DB, "disk.config")]
    records = [r for r in records if r.volume not in (web_root.volume, db_cfg.volume)]
    records.append(web_root.model_copy(update={"state": RecordState.CREATING}))
    records.append(
        db_cfg.model_copy(
            update={
                "state": RecordState.RESIZING,
                "virtual_size": 32 << 20,
                "pending_size": 64 << 20,
            }
        )
    )
    old = _extra_spec("disk", "demo", 1 << 30)
    rec = record_for(OLD, old, volume_name(OLD, "disk"), state=RecordState.DELETING)
    records.append(rec)
    return observed(records, volumes)


FILE_LAYOUTS = frozenset({"flat/raw", "flat/qcow2", "qcow2/qcow2", "ploop/ploop"})


def migrating(d: Desired) -> Observed:
    """Migrations: planned (a format in one pool, a tier down), refused (a running domain,
    no room in the target, a layout the pool's driver cannot copy) and interrupted (a
    copy under way where the manifest went back, a switched one to finish)."""
    records, volumes = converged(d, POOLS)
    moved = (
        {volume_name(DB, n) for n in ("disk", "data", "disk.config")}
        | {volume_name(WEB, n) for n in ("disk.eph0", "disk.swap")}
        | {volume_name(BATCH, n) for n in ("disk", "scratch")}
    )
    records = [r for r in records if r.volume not in moved]
    volumes["demo-fast"] -= moved
    # db-1's root was made raw; the manifest now says qcow2: a migration in pool demo.
    db_disk = _spec(d, DB, "disk")
    records.append(
        record_for(DB, db_disk, volume_name(DB, "disk"), fmt="raw", spec_override={"format": "raw"})
    )
    # web-1's ephemeral disk is in demo-fast; the manifest now puts it in demo.
    eph = _spec(d, WEB, "disk.eph0")
    records.append(
        record_for(
            WEB, eph, volume_name(WEB, "disk.eph0"), spec_override={"pool": "demo-fast"}
        ).model_copy(update={"pool": "demo-fast"})
    )
    volumes["demo"].discard(volume_name(WEB, "disk.eph0"))
    volumes["demo-fast"].add(volume_name(WEB, "disk.eph0"))
    # web-1's swap was qcow2; its domain is running.
    swap = _spec(d, WEB, "disk.swap")
    records.append(
        record_for(
            WEB,
            swap,
            volume_name(WEB, "disk.swap"),
            fmt="qcow2",
            spec_override={"backend": "qcow2", "format": "qcow2"},
        )
    )
    # db-1's data disk is in demo; the manifest puts it in demo-fast, which is too full.
    data = _spec(d, DB, "data")
    records.append(
        record_for(DB, data, volume_name(DB, "data"), spec_override={"pool": "demo"}).model_copy(
            update={"pool": "demo"}
        )
    )
    volumes["demo"].add(volume_name(DB, "data"))
    # batch-7's scratch disk is a ploop one, which demo-fast's driver cannot copy out.
    scratch = _spec(d, BATCH, "scratch")
    records.append(
        record_for(
            BATCH,
            scratch,
            volume_name(BATCH, "scratch"),
            fmt="ploop",
            spec_override={"backend": "ploop", "format": "ploop"},
        )
    )
    volumes["demo-fast"].add(volume_name(BATCH, "scratch"))
    # batch-7's root was being copied to flat/raw when a run stopped; the manifest is
    # back at qcow2: rolled back.
    root = _spec(d, BATCH, "disk")
    rec = record_for(BATCH, root, volume_name(BATCH, "disk"), generation=4)
    target = dict(rec.spec, backend="flat", format="raw")
    records = [r for r in records if r.volume != rec.volume]
    records.append(
        rec.model_copy(
            update={
                "schema_version": 2,
                "migration": Migration(
                    pool="demo",
                    volume=migration_name(rec.volume),
                    final_volume=rec.volume,
                    backend=Backend.FLAT,
                    format=DiskFormat.RAW,
                    virtual_size=rec.virtual_size,
                    spec=target,
                    phase=MigrationPhase.COPYING,
                ),
            }
        )
    )
    volumes["demo"].add(migration_name(rec.volume))
    # db-1's config drive was qcow2 and had switched to its raw copy: finished.
    cfg = _spec(d, DB, "disk.config")
    old = record_for(
        DB, cfg, volume_name(DB, "disk.config"), fmt="qcow2", spec_override={"format": "qcow2"}
    )
    records.append(
        old.model_copy(
            update={
                "schema_version": 2,
                "migration": Migration(
                    pool="demo",
                    volume=migration_name(old.volume),
                    final_volume=old.volume,
                    backend=Backend.FLAT,
                    format=DiskFormat.RAW,
                    virtual_size=old.virtual_size,
                    spec=cfg.spec_dict(),
                    phase=MigrationPhase.SWITCHED,
                ),
            }
        )
    )
    base = observed(records, volumes)
    demo, fast = base.pools["demo"], base.pools["demo-fast"]
    assert demo.volumes is not None and fast.volumes is not None
    pools = {
        "demo": ObservedPool(
            "demo",
            demo.volumes,
            running={volume_name(WEB, "disk.swap"): ("web-1",)},
            attached={volume_name(WEB, "disk.swap"): ("web-1",)},
            available=100 << 30,
            allocated={volume_name(DB, "data"): 900 << 20, volume_name(DB, "disk"): 300 << 20},
            layouts=FILE_LAYOUTS,
        ),
        "demo-fast": ObservedPool(
            "demo-fast",
            fast.volumes,
            available=300 << 20,
            allocated={volume_name(WEB, "disk.eph0"): 40 << 20},
            layouts=FILE_LAYOUTS - {"ploop/ploop"},
        ),
    }
    return Observed(pools, base.records, ())


SCENARIOS: dict[str, tuple[Callable[[Desired], Observed], PlanOptions]] = {
    "empty": (empty, PlanOptions()),
    "converged": (converged_state, PlanOptions()),
    "drifted": (drifted, PlanOptions()),
    "drifted-prune": (drifted, PlanOptions(prune=True)),
    "refused": (refused, PlanOptions()),
    "refused-allow-replace": (refused, PlanOptions(allow_replace=True, force=True)),
    "pool-down": (pool_down, PlanOptions()),
    "interrupted": (interrupted, PlanOptions()),
    "migrating": (migrating, PlanOptions()),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_text_plan(scenario: str, desired: Desired, snapshot: SnapshotAssertion) -> None:
    make, options = SCENARIOS[scenario]
    p = plan(desired, make(desired), options)
    assert to_text(p) == snapshot(extension_class=TextSnapshot)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_json_plan(scenario: str, desired: Desired, snapshot: SnapshotAssertion) -> None:
    make, options = SCENARIOS[scenario]
    obs = make(desired)
    first = to_json(plan(desired, obs, options))
    # Same inputs, byte-identical output.
    assert to_json(plan(desired, obs, options)) == first
    assert first == snapshot(extension_class=JsonSnapshot)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_markdown_plan(scenario: str, desired: Desired, snapshot: SnapshotAssertion) -> None:
    make, options = SCENARIOS[scenario]
    p = plan(desired, make(desired), options)
    assert to_markdown(p, ["Planned against the example state."]) == snapshot(
        extension_class=MarkdownSnapshot
    )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_state_file_plans_as_the_state_it_holds(
    scenario: str, desired: Desired, tmp_path: Path
) -> None:
    """Observed -> state file (.json and .json.gz) -> Observed gives the very same plan."""
    make, options = SCENARIOS[scenario]
    obs = make(desired)
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    doc = exported.document(obs, example_config(tmp_path), now)
    want = to_json(plan(desired, obs, options))
    for name in ("state.json", "state.json.gz"):
        path = str(tmp_path / name)
        exported.write(path, doc)
        again, info = exported.load(path)
        assert info.observed_at == now
        assert to_json(plan(desired, again, options)) == want
    first = (tmp_path / "state.json.gz").read_bytes()
    exported.write(str(tmp_path / "state.json.gz"), doc)
    assert (tmp_path / "state.json.gz").read_bytes() == first  # deterministic bytes
