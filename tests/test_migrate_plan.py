"""The planner's view of migrations, on observed states built in memory (no I/O): what is
an action, what is an error, and how an interrupted migration is picked up."""

from __future__ import annotations

from typing import Any

from reconciler.diff import PlanOptions, plan
from reconciler.model import Desired, Observed, ObservedPool
from reconciler.model.desired import DesiredDisk, DesiredInstance
from reconciler.model.keying import PoolKeys
from reconciler.model.naming import migration_name, volume_name
from reconciler.model.record import DiskRecord, Encryption, Migration, MigrationPhase, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import DiskSpec
from tests.helpers import record_for

INST = "11111111-2222-4333-8444-555555555555"
VOL = volume_name(INST, "d")
LAYOUTS = frozenset({"flat/raw", "flat/qcow2", "qcow2/qcow2"})


def spec(**kw: Any) -> DiskSpec:
    d: dict[str, Any] = {
        "name": kw.pop("name", "d"),
        "backend": "flat",
        "pool": "a",
        "format": "raw",
        "size": 1 << 30,
        "source": {"template": "blank"},
    }
    d.update(kw)
    return DiskSpec.model_validate(d)


def desired(*specs: DiskSpec, deleted: bool = False) -> Desired:
    disks = tuple(
        DesiredDisk(INST, s, volume_name(INST, s.name), "vm.yaml", 5 + i)
        for i, s in enumerate(specs)
    )
    return Desired((DesiredInstance(INST, "vm.yaml", deleted, () if deleted else disks),))


def pool(name: str, vols: set[str], **kw: Any) -> ObservedPool:
    kw.setdefault("layouts", LAYOUTS)
    kw.setdefault("available", 100 << 30)
    return ObservedPool(name, frozenset(vols), **kw)


def rec_of(s: DiskSpec, **kw: Any) -> DiskRecord:
    return record_for(INST, s, volume_name(INST, s.name), **kw)


def test_a_layout_change_is_a_migration_without_allow_replace() -> None:
    old = spec()
    p = plan(
        desired(spec(format="qcow2")),
        Observed({"a": pool("a", {VOL})}, (rec_of(old),)),
    )
    (a,) = p.actions
    assert a.action.value == "migrate" and not a.destructive and not p.errors
    assert a.replaces == ("a", VOL)


def test_a_new_source_is_still_a_replace() -> None:
    p = plan(
        desired(spec(format="qcow2", source={"template": "swap"})),
        Observed({"a": pool("a", {VOL})}, (rec_of(spec()),)),
    )
    assert [e.code for e in p.errors] == ["replace-required"]


def test_a_running_domain_is_an_error() -> None:
    running = {VOL: ("vm-1",)}
    p = plan(
        desired(spec(pool="b")),
        Observed(
            {"a": pool("a", {VOL}, running=running, attached=running), "b": pool("b", set())},
            (rec_of(spec()),),
        ),
    )
    assert not p.actions
    (e,) = p.errors
    assert e.code == "volume-in-use" and "running domain(s) vm-1" in e.message
    assert e.file == "vm.yaml" and e.line == 5


def test_space_is_claimed_across_the_plans_migrations() -> None:
    """Two 1 GiB disks (mostly sparse, 100 MiB used each) into a pool with 150 MiB free:
    the first fits, the second does not."""
    one, two = spec(name="d1"), spec(name="d2")
    v1, v2 = volume_name(INST, "d1"), volume_name(INST, "d2")
    src = pool("a", {v1, v2}, allocated={v1: 100 << 20, v2: 100 << 20})
    p = plan(
        desired(spec(name="d1", pool="b"), spec(name="d2", pool="b")),
        Observed(
            {"a": src, "b": pool("b", set(), available=150 << 20)}, (rec_of(one), rec_of(two))
        ),
    )
    assert [(a.action.value, a.disk) for a in p.actions] == [("migrate", "d1")]
    (e,) = p.errors
    assert e.code == "migrate-no-space" and e.disk == "d2" and "beside" in e.message


def test_a_thick_target_counts_the_whole_size_rounded_to_its_unit() -> None:
    """A 1 GiB + 512 bytes disk with 1 MiB of data, into a pool whose copies take their whole
    size in 4 MiB units (an LVM VG): it needs 1 GiB + 4 MiB, whatever its data."""
    one = spec(size=(1 << 30) + 512)
    src = pool("a", {VOL}, allocated={VOL: 1 << 20})
    for free, fits in (((1 << 30) + (4 << 20) - 1, False), ((1 << 30) + (4 << 20), True)):
        dst = pool("b", set(), available=free, thick_unit=4 << 20)
        p = plan(
            desired(spec(pool="b", size=(1 << 30) + 512)),
            Observed({"a": src, "b": dst}, (rec_of(one),)),
        )
        if fits:
            assert [a.action.value for a in p.actions] == ["migrate"] and not p.errors
        else:
            assert not p.actions and [e.code for e in p.errors] == ["migrate-no-space"]


def test_unknown_allocation_counts_the_whole_size() -> None:
    p = plan(
        desired(spec(pool="b")),
        Observed(
            {"a": pool("a", {VOL}), "b": pool("b", set(), available=512 << 20)}, (rec_of(spec()),)
        ),
    )
    assert [e.code for e in p.errors] == ["migrate-no-space"]


def test_a_pair_no_driver_copies_is_an_error_or_with_allow_replace_a_replace() -> None:
    obs = Observed(
        {"a": pool("a", {VOL}), "b": pool("b", set(), layouts=frozenset())}, (rec_of(spec()),)
    )
    p = plan(desired(spec(pool="b")), obs)
    (e,) = p.errors
    assert e.code == "migrate-unsupported" and "pool b's driver" in e.message
    p = plan(desired(spec(pool="b")), obs, PlanOptions(allow_replace=True, force=True))
    assert [(a.action.value, a.destructive) for a in p.actions] == [("replace", True)]


def migrating(old: DiskSpec, new: DiskSpec, phase: MigrationPhase) -> DiskRecord:
    rec = rec_of(old, generation=3)
    same = old.pool == new.pool
    return rec.model_copy(
        update={
            "schema_version": 2,
            "migration": Migration(
                pool=new.pool,
                volume=migration_name(VOL) if same else VOL,
                final_volume=VOL,
                backend=Backend(new.backend),
                format=DiskFormat(new.format),
                virtual_size=new.size,
                spec=new.spec_dict(),
                phase=phase,
            ),
        }
    )


def test_a_switched_migration_to_another_pool_is_one_disk_not_a_conflict() -> None:
    old, new = spec(), spec(pool="b")
    src = migrating(old, new, MigrationPhase.SWITCHED)
    moved = DiskRecord.model_validate({**rec_of(new).model_dump(), "pool": "b"})
    p = plan(
        desired(new),
        Observed({"a": pool("a", {VOL}), "b": pool("b", {VOL})}, (src, moved)),
    )
    assert not p.errors and not p.warnings
    (a,) = p.actions
    assert (a.action.value, a.pool, a.replaces) == ("migrate", "b", ("a", VOL))
    assert "finished" in a.reason and a.precondition.record_generation == 3


def test_a_copy_under_way_is_carried_on_rolled_back_or_refused() -> None:
    old, new = spec(), spec(format="qcow2")
    rec = migrating(old, new, MigrationPhase.COPYING)
    obs = Observed({"a": pool("a", {VOL, migration_name(VOL)})}, (rec,))
    (a,) = plan(desired(new), obs).actions
    assert a.action.value == "migrate" and "carried on" in a.reason
    (a,) = plan(desired(old), obs).actions
    assert a.action.value == "migrate" and "rolled back" in a.reason
    p = plan(desired(spec(backend="qcow2", format="qcow2")), obs)
    assert [e.code for e in p.errors] == ["migration-changed"] and not p.actions
    assert not p.warnings  # the copy is the record's: not an unmanaged volume


def test_a_tombstone_during_a_migration_deletes_the_disk() -> None:
    rec = migrating(spec(), spec(format="qcow2"), MigrationPhase.COPYING)
    p = plan(
        desired(deleted=True),
        Observed({"a": pool("a", {VOL, migration_name(VOL)})}, (rec,)),
        PlanOptions(force=True),
    )
    assert [a.action.value for a in p.actions] == ["delete"]


def test_an_unfinished_resize_is_not_migrated() -> None:
    rec = rec_of(spec(), state=RecordState.RESIZING, pending_size=2 << 30)
    p = plan(desired(spec(format="qcow2", size=2 << 30)), Observed({"a": pool("a", {VOL})}, (rec,)))
    assert [e.code for e in p.errors] == ["replace-required"]


# -- encryption: a change of it, or a move of an encrypted disk, is a migration ----------

LUKS = {"format": "luks"}
SECRET = "0f3c2b1a-1111-4222-8333-944445555666"


def keyed_desired(s: DiskSpec, keys: dict[str, PoolKeys]) -> Desired:
    d = DesiredDisk(
        INST, s, VOL, "vm.yaml", 5, pool_keys=keys, key_source=keys[s.pool].source is not None
    )
    return Desired((DesiredInstance(INST, "vm.yaml", False, (d,)),))


def enc_rec(s: DiskSpec) -> DiskRecord:
    rec = rec_of(s)
    if s.encryption is None:
        return rec
    header = 2068480 if s.format is DiskFormat.RAW else None
    return rec.model_copy(
        update={"encryption": Encryption(format="luks", secret=SECRET, header=header)}
    )


BARE = {"a": PoolKeys("qemu:///a", None), "b": PoolKeys("qemu:///a", None)}
SOURCED = {
    "a": PoolKeys("qemu:///a", '{"directory":"/k"}'),
    "b": PoolKeys("qemu:///a", '{"directory":"/k"}'),
}


def keyed_plan(old: DiskSpec, new: DiskSpec, keys: dict[str, PoolKeys], *flags: bool) -> Any:
    layouts = LAYOUTS | {"lvm/raw"}
    pools = {"a": pool("a", {VOL}, layouts=layouts), "b": pool("b", set(), layouts=layouts)}
    return plan(
        keyed_desired(new, keys),
        Observed(pools, (enc_rec(old),)),
        PlanOptions(allow_replace=bool(flags and flags[0])),
    )


def test_plain_to_luks_is_a_new_key_migration_without_a_key_source() -> None:
    p = keyed_plan(spec(), spec(encryption=LUKS), BARE, True)
    (a,) = p.actions
    assert a.action.value == "migrate" and not p.errors
    assert (
        "key (new)" in a.reason and "the old plain volume is removed, not overwritten" in a.reason
    )


def test_rekey_and_decrypt_need_the_pools_key_source() -> None:
    need = "give pool a a key source (config `keys`) holding the disk's key"
    for new in (
        spec(encryption=LUKS, format="qcow2"),
        spec(),
        spec(encryption=LUKS, pool="b", backend="qcow2", format="qcow2"),
    ):
        p = keyed_plan(spec(encryption=LUKS), new, BARE, True)  # --allow-replace changes nothing
        assert not p.actions and [e.code for e in p.errors] == ["encryption-unsupported"]
        assert need in p.errors[0].message
        p = keyed_plan(spec(encryption=LUKS), new, SOURCED)
        (a,) = p.actions
        assert a.action.value == "migrate" and not p.errors
        assert ("key (decrypt)" if new.encryption is None else "key (rekey)") in a.reason


def test_a_raw_luks_volume_moving_between_raw_layouts_keeps_its_key() -> None:
    p = keyed_plan(spec(encryption=LUKS), spec(encryption=LUKS, pool="b"), BARE)
    (a,) = p.actions
    assert "key (keep)" in a.reason and not p.errors
    # Another daemon: the secret cannot be kept; without a key source it is an error.
    other = {**BARE, "b": PoolKeys("qemu:///b", None)}
    p = keyed_plan(spec(encryption=LUKS), spec(encryption=LUKS, pool="b"), other)
    assert [e.code for e in p.errors] == ["encryption-unsupported"]


def test_retain_is_refused_for_an_encrypted_disk_that_moves() -> None:
    p = keyed_plan(
        spec(encryption=LUKS), spec(encryption=LUKS, pool="b", deletionPolicy="Retain"), SOURCED
    )
    assert not p.actions and "Retain" in p.errors[0].message
    # A plain disk encrypted as it moves keeps its old (plain) volume.
    p = keyed_plan(spec(), spec(encryption=LUKS, pool="b", deletionPolicy="Retain"), BARE)
    assert [a.action.value for a in p.actions] == ["migrate"] and not p.errors


def test_an_encrypted_disk_no_driver_can_copy_is_never_replaced() -> None:
    layouts = frozenset({"flat/raw"})
    pools = {"a": pool("a", {VOL}, layouts=layouts), "b": pool("b", set(), layouts=layouts)}
    p = plan(
        keyed_desired(spec(encryption=LUKS, pool="b", format="qcow2"), SOURCED),
        Observed(pools, (enc_rec(spec(encryption=LUKS)),)),
        PlanOptions(allow_replace=True),
    )
    assert not p.actions and [e.code for e in p.errors] == ["migrate-unsupported"]
    assert "never a replace" in p.errors[0].message


def test_an_encrypted_qcow2_grows_only_with_a_key_source() -> None:
    q = spec(encryption=LUKS, format="qcow2")
    p = keyed_plan(q, spec(encryption=LUKS, format="qcow2", size=2 << 30), BARE)
    assert [e.code for e in p.errors] == ["resize-unsupported"]
    assert "give pool a a key source" in p.errors[0].message
    p = keyed_plan(q, spec(encryption=LUKS, format="qcow2", size=2 << 30), SOURCED)
    assert [a.action.value for a in p.actions] == ["resize"] and not p.errors
