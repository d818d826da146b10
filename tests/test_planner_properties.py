"""Property-based tests of the pure planner `reconciler.diff.plan`.

A small in-memory model applies a Plan to an observed state the way DESIGN.md says apply
does (checking every action's precondition on the way), so the properties can ask what
the world looks like after a plan: converged, idempotent, and never touched where the
reconciler does not own it. Scenarios are made by planning an earlier desired state from
nothing, applying it with the model, and then changing both sides at random (drift,
unmanaged volumes, interrupted steps, edited, dropped and tombstoned manifests).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.diff import PlanOptions, plan
from reconciler.diff.render import to_json
from reconciler.model import (
    Action,
    ActionKind,
    Desired,
    DesiredDisk,
    DesiredInstance,
    FailedInput,
    Observed,
    ObservedPool,
    Plan,
    Precondition,
    Problem,
)
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import BACKEND_FORMATS, Backend, DiskFormat
from reconciler.schema.manifest import DiskSpec

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MiB = 1 << 20
DISK_NAMES = ("disk", "disk.eph0", "disk.swap", "data", "config-2", "scratch_1")
IMAGES = ("cirros-0.6", "debian-12")
SIZES = (512, 1536, MiB, 2 * MiB, 3 * MiB, 4 * MiB, 8 * MiB)
LABELS = {"ext4": "data-vol", "xfs": "scratch", "vfat": "CONFIG-2"}
BACKENDS = sorted(BACKEND_FORMATS)

# Every way the planner names a problem with one disk instead of acting on it (a ploop
# disk cannot grow: resize-unsupported).
DISK_ERRORS = frozenset(
    {"unmanaged-volume", "shrink-refused", "record-conflict", "resize-unsupported"}
)


# -- the model ----------------------------------------------------------------------------


class ModelViolation(AssertionError):
    """Applying the plan did something apply must refuse (or must never do)."""


@dataclass
class World:
    """Pools (None: unreachable, absent: not observed at all) and records by (pool, volume)."""

    pools: dict[str, set[str] | None]
    records: dict[tuple[str, str], DiskRecord] = field(default_factory=dict)

    def copy(self) -> World:
        return World(
            {k: (set(v) if v is not None else None) for k, v in self.pools.items()},
            dict(self.records),
        )

    def volumes(self, pool: str) -> set[str]:
        vols = self.pools.get(pool)
        if vols is None:
            raise ModelViolation(f"an action touches pool {pool}, which cannot be used")
        return vols

    def observed(self) -> Observed:
        pools = {
            name: ObservedPool(
                name,
                frozenset(vols) if vols is not None else None,
                None if vols is not None else "connection refused (test)",
            )
            for name, vols in sorted(self.pools.items())
        }
        return Observed(pools, tuple(self.records[k] for k in sorted(self.records)))


def _record_from_spec(a: Action, generation: int) -> DiskRecord:
    assert a.spec is not None
    spec = dict(a.spec)
    return DiskRecord(
        backend=Backend(spec["backend"]),
        pool=a.pool,
        volume=a.volume,
        instance=a.instance,
        disk=a.disk,
        format=DiskFormat(spec["format"]),
        virtual_size=int(spec["size"]),
        spec=spec,
        source=dict(spec["source"]),
        state=RecordState.READY,
        generation=generation,
    )


def apply_action(w: World, a: Action) -> None:
    """Apply one action to `w` in place, as DESIGN.md's apply does (minus the I/O)."""
    moved = a.replaces is not None and a.replaces != (a.pool, a.volume)
    # The precondition describes the old location of a move, else the action's own.
    where = a.replaces if moved and a.replaces is not None else (a.pool, a.volume)
    rec = w.records.get(where)
    seen = Precondition(rec.generation if rec else None, where[1] in w.volumes(where[0]))
    if seen != a.precondition:
        raise ModelViolation(
            f"{a.action.value} {a.pool}/{a.volume}: precondition {a.precondition} does not "
            f"hold at {where[0]}/{where[1]}, which is {seen}"
        )
    target = w.volumes(a.pool)
    here = w.records.get((a.pool, a.volume))
    holds_data = rec is not None and rec.state in (RecordState.READY, RecordState.RESIZING)
    removes = a.action in (ActionKind.DELETE, ActionKind.REPLACE) or (
        a.action is ActionKind.CREATE and rec is not None and seen.volume_exists
    )
    if removes and holds_data and seen.volume_exists and not a.destructive:
        raise ModelViolation(f"{a.action.value} {where} destroys data but is not destructive")
    if a.action in (ActionKind.CREATE, ActionKind.REPLACE):
        if a.spec is None:
            raise ModelViolation(f"{a.action.value} without a spec")
        if moved and a.replaces is not None:
            old = w.records.pop(a.replaces, None)
            if old is None:
                raise ModelViolation(f"{a.action.value} replaces {a.replaces} without a record")
            w.volumes(a.replaces[0]).discard(a.replaces[1])
        if here is None and a.volume in target:
            raise ModelViolation(
                f"{a.action.value} {a.pool}/{a.volume} would overwrite a volume the "
                "reconciler has no record of (invariant 4)"
            )
        w.records[(a.pool, a.volume)] = _record_from_spec(a, (here.generation if here else 0) + 1)
        target.add(a.volume)
        return
    if here is None:
        raise ModelViolation(f"{a.action.value} {a.pool}/{a.volume} has no record to act on")
    if a.action is ActionKind.RESIZE:
        assert a.spec is not None
        size = int(a.spec["size"])
        if size < here.virtual_size:
            raise ModelViolation(f"resize shrinks {a.volume} {here.virtual_size} -> {size}")
        w.records[(a.pool, a.volume)] = here.model_copy(
            update={
                "virtual_size": size,
                "spec": dict(a.spec),
                "state": RecordState.READY,
                "pending_size": None,
                "generation": here.generation + 1,
            }
        )
    elif a.action is ActionKind.UPDATE:
        assert a.spec is not None
        w.records[(a.pool, a.volume)] = here.model_copy(
            update={
                "spec": dict(a.spec),
                "state": RecordState.READY,
                "pending_size": None,
                "generation": here.generation + 1,
            }
        )
    elif a.action is ActionKind.DELETE:
        del w.records[(a.pool, a.volume)]
        target.discard(a.volume)
    elif a.action is ActionKind.RELEASE:
        del w.records[(a.pool, a.volume)]
    else:  # pragma: no cover
        raise AssertionError(a.action)


def apply_plan(w: World, p: Plan) -> World:
    out = w.copy()
    for a in p.actions:
        apply_action(out, a)
    return out


# -- building inputs ----------------------------------------------------------------------


def make_spec(
    name: str,
    backend: str,
    fmt: str,
    pool: str,
    size: int,
    source: Mapping[str, Any],
    policy: str = "Delete",
) -> DiskSpec:
    return DiskSpec.model_validate(
        {
            "name": name,
            "backend": backend,
            "pool": pool,
            "format": fmt,
            "size": size,
            "source": dict(source),
            "deletionPolicy": policy,
        }
    )


def manifest_file(instance: str, n: int = 0) -> str:
    return f"manifests/{instance}{'' if n == 0 else f'-{n}'}.yaml"


def make_instance(
    instance: str, specs: Iterable[DiskSpec], *, deleted: bool = False, n: int = 0
) -> DesiredInstance:
    file = manifest_file(instance, n)
    disks = tuple(
        DesiredDisk(instance, s, volume_name(instance, s.name), file, 6 + 8 * i)
        for i, s in enumerate(specs)
    )
    return DesiredInstance(instance, file, deleted, disks)


def uuids(n: int) -> str:
    return str(uuid.UUID(int=(n * 0x9E3779B97F4A7C15) % (1 << 128)))


@st.composite
def sources(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["image", "blank", "swap", "ext4", "xfs", "vfat"]))
    if kind == "image":
        return {"image": draw(st.sampled_from(IMAGES))}
    src: dict[str, Any] = {"template": kind}
    if kind in LABELS and draw(st.booleans()):
        src["label"] = LABELS[kind]
    return src


@st.composite
def disk_specs(draw: st.DrawFn, name: str, pools: list[str]) -> DiskSpec:
    backend = draw(st.sampled_from(BACKENDS))
    fmt = draw(st.sampled_from(sorted(BACKEND_FORMATS[backend])))
    return make_spec(
        name,
        backend,
        fmt,
        draw(st.sampled_from(pools)),
        draw(st.sampled_from(SIZES)),
        draw(sources()),
        draw(st.sampled_from(["Delete", "Delete", "Retain"])),
    )


@st.composite
def changed_spec(draw: st.DrawFn, s: DiskSpec, pools: list[str]) -> DiskSpec:
    """The same disk with its manifest edited (or not)."""
    d = s.spec_dict()
    for what in draw(
        st.lists(
            st.sampled_from(["size", "size", "backend", "pool", "pool", "source", "policy"]),
            max_size=2,
            unique=True,
        )
    ):
        if what == "size":
            d["size"] = draw(st.sampled_from(SIZES))
        elif what == "backend":
            d["backend"] = draw(st.sampled_from(BACKENDS))
            d["format"] = draw(st.sampled_from(sorted(BACKEND_FORMATS[d["backend"]])))
        elif what == "pool":
            d["pool"] = draw(st.sampled_from(pools))
        elif what == "source":
            d["source"] = draw(sources())
        else:
            d["deletionPolicy"] = "Retain" if d["deletionPolicy"] == "Delete" else "Delete"
    return DiskSpec.model_validate(d)


@st.composite
def desired_disks(draw: st.DrawFn, pools: list[str]) -> list[DiskSpec]:
    names = draw(st.lists(st.sampled_from(DISK_NAMES), min_size=1, max_size=4, unique=True))
    return [draw(disk_specs(n, pools)) for n in names]


@dataclass(frozen=True)
class Scenario:
    desired: Desired
    world: World
    # Pools that are in the world but cannot be used (None) or not observed at all.
    unusable: frozenset[str]

    @property
    def observed(self) -> Observed:
        return self.world.observed()


def _mutate_records(draw: st.DrawFn, w: World, pools: list[str]) -> None:
    """What happens behind the reconciler's back, and runs that stopped half way."""
    for key in sorted(w.records):
        rec = w.records[key]
        vols = w.volumes(rec.pool)
        what = draw(
            st.sampled_from(
                ["keep"] * 4
                + ["vanish", "creating", "resizing", "deleting", "forget", "generation", "dup"]
            )
        )
        if what == "vanish":
            vols.discard(rec.volume)
        elif what == "creating":
            w.records[key] = rec.model_copy(update={"state": RecordState.CREATING})
            if draw(st.booleans()):
                vols.discard(rec.volume)
        elif what == "resizing":
            pending = max(rec.virtual_size, draw(st.sampled_from(SIZES)))
            w.records[key] = rec.model_copy(
                update={"state": RecordState.RESIZING, "pending_size": pending}
            )
        elif what == "deleting":
            w.records[key] = rec.model_copy(update={"state": RecordState.DELETING})
            if draw(st.booleans()):
                vols.discard(rec.volume)
        elif what == "forget":
            del w.records[key]  # the volume stays: it is now unmanaged
        elif what == "generation":
            w.records[key] = rec.model_copy(
                update={"generation": rec.generation + draw(st.integers(1, 5))}
            )
        elif what == "dup":
            # A second record of the same disk in another pool (a crash in a move).
            other = draw(st.sampled_from(pools))
            if other != rec.pool and (other, rec.volume) not in w.records:
                w.records[(other, rec.volume)] = rec.model_copy(update={"pool": other})
                if draw(st.booleans()):
                    w.volumes(other).add(rec.volume)


@st.composite
def scenarios(
    draw: st.DrawFn, unreachable: bool | None = False, extras: bool | None = None
) -> Scenario:
    if unreachable is None:
        unreachable = draw(st.booleans())
    if extras is None:
        extras = draw(st.booleans())
    pools = [f"pool{i}" for i in range(draw(st.integers(1, 3)))]
    ids = [uuids(n) for n in draw(st.lists(st.integers(1, 50), max_size=7, unique=True))]
    n_earlier = draw(st.integers(0, len(ids)))

    # An earlier desired state, planned from nothing and applied with the model.
    earlier = {i: draw(desired_disks(pools)) for i in ids[:n_earlier]}
    first = Desired(tuple(make_instance(i, specs) for i, specs in earlier.items()))
    world = World({p: set() for p in pools})
    p0 = plan(first, world.observed())
    assert not p0.errors, p0.errors
    assert all(a.action is ActionKind.CREATE for a in p0.actions)
    world = apply_plan(world, p0)
    _mutate_records(draw, world, pools)

    # The desired state now: manifests edited, tombstoned, dropped; new instances.
    instances: list[DesiredInstance] = []
    for i, specs in earlier.items():
        fate = draw(st.sampled_from(["keep"] * 4 + ["tombstone", "drop"]))
        if fate == "drop":
            continue
        if fate == "tombstone":
            instances.append(make_instance(i, specs if draw(st.booleans()) else [], deleted=True))
            continue
        now: list[DiskSpec] = []
        for s in specs:
            what = draw(st.sampled_from(["same", "edit", "edit", "remove"]))
            if what == "edit":
                now.append(draw(changed_spec(s, pools)))
            elif what == "same":
                now.append(s)
        taken = {s.name for s in specs}
        for name in draw(st.lists(st.sampled_from(DISK_NAMES), max_size=2, unique=True)):
            if name not in taken:
                now.append(draw(disk_specs(name, pools)))
                taken.add(name)
        if not now:
            now.append(draw(disk_specs("disk", pools)))
        instances.append(make_instance(i, now))
    for i in ids[n_earlier:]:
        deleted = draw(st.integers(0, 4)) == 0
        instances.append(make_instance(i, draw(desired_disks(pools)), deleted=deleted))

    # Volumes the reconciler did not make, named as it would name them (often as a
    # desired disk's volume, in its pool or in another one).
    named = sorted({d.volume for inst in instances for d in inst.disks})
    for _ in range(draw(st.integers(0, 3))):
        if len(named) > 0 and draw(st.booleans()):
            vol = draw(st.sampled_from(named))
        else:
            owner = draw(st.sampled_from([*ids, uuids(99)]))
            vol = volume_name(owner, draw(st.sampled_from(DISK_NAMES)))
        world.volumes(draw(st.sampled_from(pools))).add(vol)

    failed: list[FailedInput] = []
    if extras:
        # Two manifests for one instance, and manifests that failed to load.
        if len(instances) > 0 and draw(st.booleans()):
            twin = draw(st.sampled_from(instances))
            specs = [d.spec for d in twin.disks]
            instances.append(make_instance(twin.instance, specs, deleted=twin.deleted, n=1))
        for _ in range(draw(st.integers(0, 2))):
            who = draw(st.one_of(st.none(), st.sampled_from([*ids, uuids(98)])))
            failed.append(
                FailedInput(
                    f"manifests/broken-{len(failed)}.yaml", 3, "disks.0.size: not a size", who
                )
            )

    unusable: set[str] = set()
    if unreachable:
        for p in draw(st.lists(st.sampled_from(pools), min_size=1, unique=True)):
            unusable.add(p)
            if draw(st.booleans()):
                world.pools[p] = None
            else:
                # Not observed at all: the records in it are still in the store.
                del world.pools[p]
    return Scenario(Desired(tuple(instances), tuple(failed)), world, frozenset(unusable))


# -- reading a scenario -------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """Which instances the planner must act on, and how."""

    live: dict[str, DesiredInstance]  # exactly one manifest, not failed, not deleted
    tombstoned: dict[str, DesiredInstance]
    held: frozenset[str]  # several manifests, or one that failed: nothing is done
    orphans: frozenset[str]  # records, but no manifest at all
    unknown_failed: int


def roles(s: Scenario) -> Roles:
    by: dict[str, list[DesiredInstance]] = {}
    for inst in s.desired.instances:
        by.setdefault(inst.instance, []).append(inst)
    failed = {f.instance for f in s.desired.failed if f.instance is not None}
    held = {i for i, v in by.items() if len(v) > 1} | (failed & by.keys())
    live = {i: v[0] for i, v in by.items() if i not in held and not v[0].deleted}
    dead = {i: v[0] for i, v in by.items() if i not in held and v[0].deleted}
    recorded = {r.instance for r in s.world.records.values()}
    return Roles(
        live,
        dead,
        frozenset(held),
        frozenset(recorded - by.keys() - failed),
        sum(1 for f in s.desired.failed if f.instance is None),
    )


def records_of(w: World, instance: str, disk: str | None = None) -> list[DiskRecord]:
    return [
        r for r in w.records.values() if r.instance == instance and (disk is None or r.disk == disk)
    ]


def unreachable_errors(p: Plan) -> set[str]:
    return {e.pool for e in p.errors if e.code == "pool-unreachable" and e.pool is not None}


def key(e: Problem) -> tuple[str, str | None, str | None, str | None, str | None]:
    return (e.code, e.instance, e.disk, e.pool, e.volume)


def shuffled(s: Scenario, seed: int) -> tuple[Desired, Observed]:
    rnd = random.Random(seed)
    insts = list(s.desired.instances)
    rnd.shuffle(insts)
    obs = s.observed
    recs = list(obs.records)
    rnd.shuffle(recs)
    names = list(obs.pools)
    rnd.shuffle(names)
    return (
        Desired(tuple(insts), s.desired.failed),
        Observed({n: obs.pools[n] for n in names}, tuple(recs), obs.bad_records),
    )


def disk_converged(w: World, d: DesiredDisk) -> bool:
    recs = records_of(w, d.instance, d.spec.name)
    if len(recs) != 1:
        return False
    r = recs[0]
    return (
        (r.pool, r.volume) == (d.spec.pool, d.volume)
        and r.state is RecordState.READY
        and r.spec == d.spec.spec_dict()
        and r.virtual_size == d.spec.size
        and r.format == d.spec.format
        and r.backend == d.spec.backend
        and r.source == d.spec.spec_dict()["source"]
        and d.volume in (w.pools.get(d.spec.pool) or set())
    )


UNFINISHED = (RecordState.CREATING, RecordState.DELETING)


options_any = st.builds(
    PlanOptions,
    allow_replace=st.booleans(),
    prune=st.booleans(),
    force=st.booleans(),
    max_delete_percent=st.sampled_from([0, 10, 34, 50, 100]),
)
ALL_FLAGS = PlanOptions(allow_replace=True, prune=True, force=True)


# -- a. determinism -----------------------------------------------------------------------


@SETTINGS
@given(scenarios(unreachable=None), options_any, st.integers(0, 2**32 - 1))
def test_plan_is_deterministic(s: Scenario, options: PlanOptions, seed: int) -> None:
    one = plan(s.desired, s.observed, options)
    two = plan(s.desired, s.observed, options)
    assert one == two
    text = to_json(one)
    assert text == to_json(two)
    assert to_json(plan(*shuffled(s, seed), options)) == text


# -- b. convergence -----------------------------------------------------------------------


@SETTINGS
@given(scenarios(unreachable=None))
def test_plan_converges_and_is_idempotent(s: Scenario) -> None:
    r = roles(s)
    first = plan(s.desired, s.observed, ALL_FLAGS)
    after = apply_plan(s.world, first)
    blocked = unreachable_errors(first)
    allowed = DISK_ERRORS | {"pool-unreachable", "conflict", "manifest-invalid", "prune-refused"}
    assert {e.code for e in first.errors} <= allowed, first.errors

    def explained(instance: str, disk: str, pools: Iterable[str]) -> bool:
        return bool(blocked & set(pools)) or any(
            e.instance == instance and e.disk == disk and e.code in DISK_ERRORS
            for e in first.errors
        )

    for inst in r.live.values():
        names = {d.spec.name for d in inst.disks}
        for d in inst.disks:
            if not disk_converged(after, d):
                pools = {d.spec.pool} | {
                    x.pool for x in records_of(s.world, inst.instance, d.spec.name)
                }
                assert explained(inst.instance, d.spec.name, pools), (d, first)
        for rec in records_of(after, inst.instance):
            if rec.disk not in names:
                assert rec.pool in blocked, (rec, first)
    for i in r.tombstoned.keys() | r.orphans:
        for rec in records_of(after, i):
            refused = i in r.orphans and r.unknown_failed > 0
            assert rec.pool in blocked or refused, (rec, first)
    for i in r.held:
        assert sorted(records_of(after, i), key=DiskRecord.key) == sorted(
            records_of(s.world, i), key=DiskRecord.key
        )

    again = plan(s.desired, after.observed(), ALL_FLAGS)
    assert again.actions == (), again.actions
    before = {key(e) for e in first.errors}
    now = {key(e) for e in again.errors}
    assert now <= before, now - before
    unmanaged = {k for k in before if k[0] == "unmanaged-volume"}
    assert unmanaged <= now


# -- c. safety with default options -------------------------------------------------------


@SETTINGS
@given(scenarios(unreachable=None))
def test_default_plan_is_safe(s: Scenario) -> None:
    r = roles(s)
    p = plan(s.desired, s.observed, PlanOptions())
    apply_plan(s.world, p)  # preconditions hold, nothing unowned is overwritten
    records = s.world.records
    for a in p.actions:
        assert a.action is not ActionKind.REPLACE, a
        old = records.get(a.replaces or (a.pool, a.volume))
        # Finishing a delete that was under way when a run stopped is not a new decision.
        finishing = old is not None and old.state is RecordState.DELETING
        if a.destructive and not finishing:
            assert a.action is ActionKind.DELETE, a
            if a.instance in r.live:
                assert a.disk not in {d.spec.name for d in r.live[a.instance].disks}, a
            else:
                assert a.instance in r.tombstoned, a
        for pool, vol in [(a.pool, a.volume), *([a.replaces] if a.replaces else [])]:
            exists = vol in (s.world.pools.get(pool) or set())
            assert (pool, vol) in records or not exists, ("touches an unmanaged volume", a)
        rec = records.get((a.pool, a.volume))
        if a.action is ActionKind.RESIZE:
            assert rec is not None and a.spec is not None
            size = int(a.spec["size"])
            assert size >= rec.virtual_size, a
            assert size > rec.virtual_size or rec.state is RecordState.RESIZING, a
        if a.action is ActionKind.UPDATE:
            assert rec is not None and a.spec is not None
            assert int(a.spec["size"]) == rec.virtual_size, a
        assert a.instance not in r.held, a
        if a.action is ActionKind.DELETE and old is not None and old.state not in UNFINISHED:
            # deletionPolicy Retain: the volume outlives its record.
            assert old.spec.get("deletionPolicy") != "Retain", a
        if a.instance in r.orphans:
            # Only runs that stopped half way are finished (rolled back or deleted).
            assert a.action is ActionKind.DELETE, a
            assert old is not None and old.state in UNFINISHED, a
    warned = {(w.instance, w.disk) for w in p.warnings if w.code == "orphaned-record"}
    for i in r.orphans:
        for rec in records_of(s.world, i):
            if rec.state not in UNFINISHED:
                assert (i, rec.disk) in warned, (rec, p.warnings)


# -- d. the delete threshold --------------------------------------------------------------


@SETTINGS
@given(scenarios(unreachable=None), options_any)
def test_delete_threshold(s: Scenario, options: PlanOptions) -> None:
    options = replace(options, force=False)
    p = plan(s.desired, s.observed, options)
    managed = sum(1 for r in s.world.records.values() if r.kind is RecordKind.DISK)
    doomed = sum(1 for a in p.actions if a.destructive)
    codes = {e.code for e in p.errors}
    assert doomed * 100 <= options.max_delete_percent * managed or "delete-threshold" in codes
    forced = plan(s.desired, s.observed, replace(options, force=True))
    if "delete-threshold" in codes:
        # Only the destructive actions are held back; everything else still happens.
        assert doomed == 0
        assert p.actions == tuple(a for a in forced.actions if not a.destructive)
        n = sum(1 for a in forced.actions if a.destructive)
        assert n * 100 > options.max_delete_percent * managed
    else:
        assert p.actions == forced.actions


# -- e. unreachable pools -----------------------------------------------------------------


def wanted_pools(s: Scenario, r: Roles, options: PlanOptions) -> set[str]:
    """Pools the planner needs to look into for this scenario."""
    want: set[str] = set()
    for inst in r.live.values():
        names = {d.spec.name for d in inst.disks}
        for d in inst.disks:
            recs = records_of(s.world, inst.instance, d.spec.name)
            if len(recs) > 1:
                continue  # record-conflict: the disk is not looked at
            if d.spec.pool in s.unusable:
                want.add(d.spec.pool)
            else:
                want.update(x.pool for x in recs)
        want.update(x.pool for x in records_of(s.world, inst.instance) if x.disk not in names)
    for i in r.tombstoned:
        want.update(x.pool for x in records_of(s.world, i))
    for i in r.orphans:
        for x in records_of(s.world, i):
            unfinished = x.state in (RecordState.CREATING, RecordState.DELETING)
            if unfinished or (options.prune and r.unknown_failed == 0):
                want.add(x.pool)
    return want


@SETTINGS
@given(scenarios(unreachable=True), options_any)
def test_unreachable_pools(s: Scenario, options: PlanOptions) -> None:
    p = plan(s.desired, s.observed, options)
    for a in p.actions:
        assert a.pool not in s.unusable, a
        assert a.replaces is None or a.replaces[0] not in s.unusable, a
    reported = unreachable_errors(p)
    assert reported <= s.unusable
    assert wanted_pools(s, roles(s), options) & s.unusable <= reported, p.errors


# -- the model itself ---------------------------------------------------------------------


def test_model_refuses_a_stale_precondition() -> None:
    spec = make_spec("disk", "flat", "raw", "pool0", MiB, {"template": "blank"})
    inst = make_instance(uuids(1), [spec])
    w = World({"pool0": set()})
    p = plan(Desired((inst,)), w.observed())
    w.pools["pool0"] = {inst.disks[0].volume}  # someone made it meanwhile
    with pytest.raises(ModelViolation, match="precondition"):
        apply_plan(w, p)


# -- planner bugs found by the properties (minimal examples) ------------------------------


def _moved_disk(state: RecordState, *, old_exists: bool, new_taken: bool) -> tuple[Desired, World]:
    """One disk made in pool0 whose manifest now says pool1."""
    i = uuids(1)
    before = make_spec("disk", "flat", "raw", "pool0", MiB, {"template": "blank"})
    now = make_spec("disk", "flat", "raw", "pool1", MiB, {"template": "blank"})
    w = World({"pool0": set(), "pool1": set()})
    w = apply_plan(w, plan(Desired((make_instance(i, [before]),)), w.observed()))
    vol = volume_name(i, "disk")
    w.records[("pool0", vol)] = w.records[("pool0", vol)].model_copy(update={"state": state})
    if not old_exists:
        w.volumes("pool0").discard(vol)
    if new_taken:
        w.volumes("pool1").add(vol)  # made by someone else: no record
    return Desired((make_instance(i, [now]),)), w


@pytest.mark.parametrize("state", [RecordState.CREATING, RecordState.DELETING])
def test_unfinished_record_in_old_pool_is_not_stranded(state: RecordState) -> None:
    desired, w = _moved_disk(state, old_exists=False, new_taken=False)
    p = plan(desired, w.observed())
    after = apply_plan(w, p)
    assert disk_converged(after, desired.instances[0].disks[0])
    assert plan(desired, after.observed()).actions == ()


@pytest.mark.parametrize(
    ("state", "options"),
    [
        (RecordState.READY, PlanOptions(allow_replace=True, force=True)),
        (RecordState.CREATING, PlanOptions()),
    ],
    ids=["ready-allow-replace", "creating-default"],
)
def test_move_onto_unmanaged_volume_is_refused(state: RecordState, options: PlanOptions) -> None:
    desired, w = _moved_disk(state, old_exists=True, new_taken=True)
    vol = desired.instances[0].disks[0].volume
    p = plan(desired, w.observed(), options)
    assert not [a for a in p.actions if (a.pool, a.volume) == ("pool1", vol)], p.actions
    assert any(e.code == "unmanaged-volume" and e.pool == "pool1" for e in p.errors), p.errors
