"""diff/snapshots.py: snapshot, delete-snapshot and restores planned (pure, no daemon).

Each scenario's text and JSON plan is pinned (syrupy); the assertions beside them say what
each must show, so a pinned plan that went wrong fails here too."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from reconciler.diff import PlanOptions, plan
from reconciler.diff.render import to_json, to_text
from reconciler.model import Desired, Observed, ObservedPool
from reconciler.model.desired import DesiredDisk, DesiredInstance
from reconciler.model.naming import snapshot_name, volume_name
from reconciler.model.plan import ActionKind, Plan
from reconciler.model.record import DiskRecord, RecordKind, RecordState, Snapshot
from reconciler.schema.manifest import DiskSpec
from tests.snapshot_ext import JsonSnapshot, TextSnapshot

VM = str(uuid.UUID(int=0x51))
DB = str(uuid.UUID(int=0x52))
NEW = str(uuid.UUID(int=0x53))


def spec(name: str, pool: str = "local", **kw: Any) -> DiskSpec:
    backend, fmt = ("lvm", "raw") if pool == "vg" else ("qcow2", "qcow2")
    data = {"name": name, "backend": backend, "pool": pool, "format": fmt, "size": 1 << 30,
            "source": {"template": "blank"}} | kw  # fmt: skip
    return DiskSpec.model_validate(data)


def inst(uuid_: str, *disks: DiskSpec, deleted: bool = False) -> DesiredInstance:
    ds = tuple(
        DesiredDisk(uuid_, d, volume_name(uuid_, d.name), f"{uuid_[-2:]}.yaml", 5 + 8 * i)
        for i, d in enumerate(disks)
    )
    return DesiredInstance(uuid_, f"{uuid_[-2:]}.yaml", deleted, ds)


def disk_rec(uuid_: str, d: DiskSpec, generation: int = 3, **kw: Any) -> DiskRecord:
    s = d.spec_dict()
    return DiskRecord(
        backend=s["backend"], pool=s["pool"], volume=volume_name(uuid_, d.name),
        instance=uuid_, disk=d.name, format=s["format"], virtual_size=s["size"], spec=s,
        source=s["source"], state=RecordState.READY, generation=generation,
    ).model_copy(update=kw)  # fmt: skip


def snap_rec(disk: DiskRecord, name: str, state: RecordState = RecordState.READY) -> DiskRecord:
    key = snapshot_name(disk.volume, name)
    return disk.model_copy(
        update={
            "kind": RecordKind.SNAPSHOT,
            "volume": key,
            "state": state,
            "generation": 1,
            "snapshot": Snapshot(
                name=name, disk_generation=disk.generation, consistency="idle", handle=key
            ),
        }
    )


def observe(
    records: list[DiskRecord],
    *,
    running: Mapping[str, tuple[str, ...]] | None = None,
    agents: dict[str, bool] | None = None,
    no_snapshots: tuple[str, ...] = (),
    missing: tuple[str, ...] = (),
) -> Observed:
    pools = {}
    for name in ("local", "vg", "plain"):
        vols = frozenset(r.volume for r in records if r.pool == name) - set(missing)
        pools[name] = ObservedPool(
            name, vols, running=running or {}, snapshots=name not in (*no_snapshots, "plain")
        )
    return Observed(pools, tuple(records), (), agents or {})


def run(desired: list[DesiredInstance], observed: Observed, **opts: Any) -> Plan:
    return plan(Desired(tuple(desired)), observed, PlanOptions(**opts))


def kinds(p: Plan) -> list[tuple[str, str, str]]:
    return [(a.action.value, a.disk, a.volume) for a in p.actions]


def codes(p: Plan) -> list[tuple[str, str | None]]:
    return [(e.code.value, e.disk) for e in (*p.errors, *p.warnings)]


# -- scenarios ---------------------------------------------------------------------------


def take() -> tuple[list[DesiredInstance], Observed]:
    """vm's two disks of `local` and one of `vg` list `daily`: one action per pool; its
    local disks run in a domain whose agent answers (frozen), its vg disk in one whose
    agent does not (crash-consistent, warned); db is idle."""
    root, data = spec("root", snapshots=["daily"]), spec("data", snapshots=["daily"])
    lv = spec("lv", pool="vg", snapshots=["daily"])
    dbroot = spec("root", snapshots=["before-upgrade"])
    recs = [disk_rec(VM, root), disk_rec(VM, data), disk_rec(VM, lv), disk_rec(DB, dbroot)]
    running = {
        volume_name(VM, "root"): ("vm",),
        volume_name(VM, "data"): ("vm",),
        volume_name(VM, "lv"): ("vm-lv",),
    }
    obs = observe(recs, running=running, agents={"vm": True})
    return [inst(VM, root, data, lv), inst(DB, dbroot)], obs


def delete() -> tuple[list[DesiredInstance], Observed]:
    """A name dropped from the list; a disk dropped from the manifest (its snapshots go
    with it, before it); an interrupted take of a name still listed (taken again); an
    interrupted delete (finished); a snapshot of an instance that is deleted."""
    root = spec("root", snapshots=["keep", "retry"])
    gone = spec("scratch", snapshots=["old"])
    r_root, r_gone = disk_rec(VM, root), disk_rec(VM, gone)
    dbroot = spec("root")
    r_db = disk_rec(DB, dbroot)
    recs = [
        r_root, r_gone, r_db,
        snap_rec(r_root, "keep"), snap_rec(r_root, "dropped"),
        snap_rec(r_root, "retry", RecordState.CREATING),
        snap_rec(r_root, "half-gone", RecordState.DELETING),
        snap_rec(r_gone, "old"), snap_rec(r_db, "last"),
    ]  # fmt: skip
    return [inst(VM, root), inst(DB, dbroot, deleted=True)], observe(recs)


def refused() -> tuple[list[DesiredInstance], Observed]:
    """What is not planned: an encrypted disk's snapshot, a pool whose driver takes none,
    a disk with snapshots that would be replaced, restores from a missing snapshot and
    from one larger than the disk, and the delete of a snapshot a restore needs."""
    enc = spec("enc", snapshots=["a"], encryption={"format": "luks"})
    plain = spec("p", pool="plain", snapshots=["a"])
    plain = DiskSpec.model_validate(
        plain.spec_dict() | {"backend": "flat", "format": "raw", "snapshots": ["a"]}
    )
    moved = spec("moved", snapshots=["a"], source={"image": "cirros"})
    r_moved = disk_rec(VM, spec("moved", snapshots=["a"]))  # made from a template
    src = spec("src", snapshots=["needed"])
    r_src = disk_rec(VM, spec("src", snapshots=["a", "needed"]))
    # `needed` is no longer listed, but the new instance restores from it.
    src = spec("src")
    r_src = r_src.model_copy(update={"spec": src.spec_dict()})
    r_src = disk_rec(VM, src)
    small = spec("small", size=1 << 20, source={"snapshot": f"{VM}/src@needed"})
    missing = spec("missing", source={"snapshot": f"{VM}/src@never"})
    ok = spec("ok", source={"snapshot": f"{VM}/src@needed"})
    recs = [
        disk_rec(VM, enc, encryption={"format": "luks", "secret": str(uuid.UUID(int=9))}),
        disk_rec(VM, plain), r_moved, snap_rec(r_moved, "a"), r_src,
        snap_rec(r_src, "needed"),
    ]  # fmt: skip
    desired = [inst(VM, enc, plain, moved, src), inst(NEW, small, missing, ok)]
    return desired, observe(recs)


SCENARIOS = {"take": take, "delete": delete, "refused": refused}
OPTS: dict[str, dict[str, Any]] = {"refused": {"allow_replace": True}, "delete": {"force": True}}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pinned_plans(scenario: str, snapshot: SnapshotAssertion) -> None:
    desired, obs = SCENARIOS[scenario]()
    p = run(desired, obs, **OPTS.get(scenario, {}))
    assert to_text(p) == snapshot(extension_class=TextSnapshot)
    assert to_json(p) == snapshot(extension_class=JsonSnapshot)
    assert to_json(run(desired, obs, **OPTS.get(scenario, {}))) == to_json(p)  # pure


def test_take_is_one_action_per_instance_pool_and_name() -> None:
    p = run(*take())
    snaps = [a for a in p.actions if a.action is ActionKind.SNAPSHOT]
    assert [(a.instance, a.pool, a.snapshot and a.snapshot.name) for a in snaps] == [
        (VM, "local", "daily"),
        (VM, "vg", "daily"),
        (DB, "local", "before-upgrade"),
    ] or sorted((a.instance, a.pool) for a in snaps) == sorted(
        [(VM, "local"), (VM, "vg"), (DB, "local")]
    )
    by_pool = {(a.instance, a.pool): a.snapshot for a in snaps}
    local = by_pool[(VM, "local")]
    assert local is not None and [m.disk for m in local.members] == ["data", "root"]
    assert local.consistency == "frozen" and local.domains == ("vm",)
    vg = by_pool[(VM, "vg")]
    assert vg is not None and vg.consistency == "crash"
    idle = by_pool[(DB, "local")]
    assert idle is not None and idle.consistency == "idle" and idle.members[0].generation == 3
    assert codes(p) == [("crash-consistent", "lv")]
    assert not any(a.destructive for a in p.actions)
    # Once taken (records ready, volumes there), nothing is left to do.
    desired, obs = take()
    done = [snap_rec(r, "daily" if r.instance == VM else "before-upgrade") for r in obs.records]
    again = run(desired, observe([*obs.records, *done]))
    assert again.actions == () and again.errors == ()


def test_delete_is_destructive_and_a_disk_takes_its_snapshots_with_it() -> None:
    p = run(*delete(), force=True)
    got = kinds(p)
    k = snapshot_name
    assert set(got) == {
        ("delete-snapshot", "root", k(volume_name(VM, "root"), "half-gone")),
        ("delete-snapshot", "root", k(volume_name(VM, "root"), "dropped")),
        ("delete-snapshot", "root", k(volume_name(VM, "root"), "half-gone")),
        ("delete-snapshot", "scratch", k(volume_name(VM, "scratch"), "old")),
        ("delete", "scratch", volume_name(VM, "scratch")),
        ("snapshot", "root", k(volume_name(VM, "root"), "retry")),
        ("delete", "root", volume_name(DB, "root")),
        ("delete-snapshot", "root", k(volume_name(DB, "root"), "last")),
    }
    assert len(got) == 7, got
    destructive = {a.volume for a in p.actions if a.destructive and a.snapshot}
    assert destructive == {
        k(volume_name(VM, "root"), "dropped"),
        k(volume_name(VM, "scratch"), "old"),
        k(volume_name(DB, "root"), "last"),
    }
    # A disk's snapshots go before it (an rbd image with snapshots cannot be removed).
    order = [
        (a.action.value, a.disk) for a in p.actions if a.instance == VM and a.disk == "scratch"
    ]
    assert order == [("delete-snapshot", "scratch"), ("delete", "scratch")]
    redo = next(a for a in p.actions if a.action is ActionKind.SNAPSHOT)
    assert redo.precondition.record_generation == 1


def test_the_delete_guard_counts_deleted_snapshots() -> None:
    desired, obs = delete()
    p = run(desired, obs, max_delete_percent=50)
    assert "delete-threshold" in [e.code.value for e in p.errors]
    assert not any(a.destructive for a in p.actions)
    assert {a.volume for a in p.held if a.snapshot} >= {
        snapshot_name(volume_name(VM, "root"), "dropped")
    }


def test_refused_snapshots_and_restores_are_plan_errors() -> None:
    p = run(*refused(), allow_replace=True)
    assert sorted(codes(p)) == sorted(
        [
            ("snapshot-unsupported", "enc"),
            ("snapshot-unsupported", "p"),
            ("snapshot-in-use", "moved"),
            ("snapshot-unsupported", "small"),
            ("snapshot-missing", "missing"),
            ("snapshot-in-use", "src"),
        ]
    ), codes(p)
    in_use = next(e for e in p.errors if e.disk == "src")
    assert f"{NEW}/ok" in in_use.message and f"{NEW}/small" not in in_use.message
    # Only the restore that can be made is planned; nothing is replaced or deleted.
    assert kinds(p) == [("create", "ok", volume_name(NEW, "ok"))]
    assert p.actions[0].spec is not None
    assert p.actions[0].spec["source"] == {"snapshot": f"{VM}/src@needed"}


def test_an_encrypted_disk_is_never_restored_into_and_a_pool_must_snapshot() -> None:
    src = spec("src", snapshots=["s", "t"])
    r = disk_rec(VM, src)
    enc = spec("e", source={"snapshot": f"{VM}/src@s"}, encryption={"format": "luks"})
    p = run([inst(VM, src), inst(NEW, enc)], observe([r, snap_rec(r, "s")]))
    assert codes(p) == [("snapshot-unsupported", "e")] and "encrypted" in p.errors[0].message
    assert kinds(p) == [("snapshot", "src", snapshot_name(r.volume, "t"))]
    plain = spec("x", source={"snapshot": f"{VM}/src@s"})
    p = run(
        [inst(VM, src), inst(NEW, plain)], observe([r, snap_rec(r, "s")], no_snapshots=("local",))
    )
    assert ("snapshot-unsupported", "x") in codes(p) and ("snapshot-unsupported", "src") in codes(p)


def test_a_missing_snapshot_volume_is_drift_and_kept() -> None:
    root = spec("root", snapshots=["s"])
    r = disk_rec(VM, root)
    s = snap_rec(r, "s")
    p = run([inst(VM, root)], observe([r, s], missing=(s.volume,)))
    assert p.actions == () and codes(p) == [("drift", "root")]


# -- apply refuses what the plan refuses (apply/steps/snapshot.py), read under the locks --


class _Records:
    def __init__(self, recs: list[DiskRecord]) -> None:
        self.recs = {r.key(): r for r in recs}

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        return self.recs.get((pool, volume))

    def snapshots(self, instance: str, disk: str) -> list[DiskRecord]:
        return [
            r for r in self.recs.values()
            if r.kind is RecordKind.SNAPSHOT and (r.instance, r.disk) == (instance, disk)
        ]  # fmt: skip


def test_apply_refuses_a_replace_or_move_of_a_disk_with_snapshots_and_bad_restores() -> None:
    from reconciler.apply.steps.snapshot import (
        SnapshotInUse,
        refuse_if_snapshotted,
        restore_source,
    )
    from reconciler.model.errors import ReconcileError

    r = disk_rec(VM, spec("d"))
    ctx: Any = type("Ctx", (), {"records": _Records([r, snap_rec(r, "s")])})()
    with pytest.raises(SnapshotInUse, match="has snapshot"):
        refuse_if_snapshotted(ctx, r, "replacing")
    other = disk_rec(VM, spec("e"))
    refuse_if_snapshotted(ctx, other, "replacing")  # no snapshots: nothing to refuse
    ok = spec("n", source={"snapshot": f"{VM}/d@s"}).spec_dict()
    got = restore_source(ctx, "local", volume_name(NEW, "n"), ok)
    assert got is not None and got.volume == snapshot_name(r.volume, "s")
    for bad, says in (
        (ok | {"source": {"snapshot": f"{VM}/d@gone"}}, "snapshot-missing"),
        (ok | {"size": 1 << 20}, "snapshot-unsupported"),
        (ok | {"backend": "flat", "format": "raw"}, "snapshot-unsupported"),
        (ok | {"encryption": {"format": "luks"}}, "snapshot-unsupported"),
    ):
        with pytest.raises(ReconcileError, match=says):
            restore_source(ctx, "local", volume_name(NEW, "n"), bad)
    assert restore_source(ctx, "local", "x", spec("t").spec_dict()) is None


def test_an_observed_state_that_does_not_say_whether_a_pool_snapshots_plans_none() -> None:
    desired, obs = refused()
    pools = {
        n: dataclasses.replace(p, unknown={"snapshots": "too old"}) for n, p in obs.pools.items()
    }
    p = run(desired, dataclasses.replace(obs, pools=pools), allow_replace=True)
    assert p.actions == ()
    assert {e.disk for e in p.errors if e.code.value == "state-incomplete"} >= {"ok", "small"}


def test_a_running_instances_rbd_disks_are_paused_for_their_snapshots_and_the_plan_says_so() -> (
    None
):
    """rbd takes image snapshots one by one: the plan says which domains its driver pauses
    for that window (more than one disk, a domain running them), and says nothing where
    none is paused."""
    a = spec("root", backend="rbd", format="raw", snapshots=["s"])
    b = spec("data", backend="rbd", format="raw", snapshots=["s"])
    recs = [disk_rec(VM, a), disk_rec(VM, b)]
    running = {volume_name(VM, "root"): ("vm",), volume_name(VM, "data"): ("vm",)}
    p = run([inst(VM, a, b)], observe(recs, running=running, agents={"vm": True}))
    (snap,) = [x for x in p.actions if x.action is ActionKind.SNAPSHOT]
    assert "domain(s) vm paused while its image snapshots are taken" in snap.reason
    one = run([inst(VM, a)], observe(recs[:1], running=running, agents={"vm": True}))
    idle = run([inst(VM, a, b)], observe(recs))
    for quiet in (one, idle):
        assert [x.action for x in quiet.actions] == [ActionKind.SNAPSHOT]
        assert all("paused" not in x.reason for x in quiet.actions)
