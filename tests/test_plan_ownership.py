"""The planner on a pool many hosts share: a disk another host holds is taken over only
when it is free, reported otherwise; a disk whose manifest is gone here is handed over,
never deleted, and only when every manifest was read. Pure: no cluster needed (the
store's side is tests/test_rados_records.py, the hosts' side tests/test_rbd_hosts.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from reconciler.diff import PlanOptions, plan
from reconciler.model import Observed, ObservedPool
from reconciler.model.desired import Desired
from reconciler.model.observed import Holder
from reconciler.model.plan import ActionKind
from reconciler.schema.config import Config
from reconciler.schema.load import load_config
from reconciler.schema.manifest import EncryptionSpec
from tests.helpers import converged, desired_from, observed

CORPUS = Path(__file__).resolve().parent / "corpus"
DB = str(CORPUS / "valid" / "db.yaml")
POOLS = ("local", "fast", "ceph", "vg")


@pytest.fixture(scope="module")
def corpus_config() -> Config:
    return load_config(str(CORPUS / "config.yaml"))


def ceph_disk(desired: Desired) -> tuple[str, str]:
    (inst,) = [i for i in desired.instances if not i.deleted]
    (d,) = [d for d in inst.disks if d.spec.pool == "ceph"]
    return inst.instance, d.volume


def shared(obs: Observed, **held: Holder) -> Observed:
    pools = dict(obs.pools)
    pools["ceph"] = dataclasses.replace(pools["ceph"], shared=True, held=held)
    return Observed(pools, obs.records, obs.bad_records)


def test_a_disk_held_by_a_live_host_is_a_warning_and_nothing_else(corpus_config: Config) -> None:
    """A live owner is the normal state while an instance moves: a warning (a one-shot
    run or cron here exits 0), and nothing is planned for the disk."""
    desired = desired_from([DB], corpus_config)
    _, volume = ceph_disk(desired)
    records, vols = converged(desired, POOLS)
    mine = [r for r in records if r.volume != volume]
    obs = shared(
        observed(mine, vols),
        **{volume: Holder("host-a", 4, False, "host host-a (heartbeat 3 s ago)")},
    )
    p = plan(desired, obs)
    assert [a for a in p.actions if a.volume == volume] == []
    assert p.errors == ()
    (w,) = [w for w in p.warnings if w.volume == volume]
    assert w.code == "owned-elsewhere" and "host host-a (heartbeat 3 s ago)" in w.message
    # Not an unmanaged volume: another host's record explains it.
    assert not any(volume in w.message for w in p.warnings)


def test_a_disk_without_a_record_of_an_instance_a_live_host_claimed_is_not_created(
    corpus_config: Config,
) -> None:
    """A disk no host has made yet, of an instance another live host has claimed (its
    siblings are that host's): planned `owned-elsewhere` like them, never a create that
    apply would refuse (the claim is checked when a record is first written)."""
    desired = desired_from([DB], corpus_config)
    inst, volume = ceph_disk(desired)
    records, vols = converged(desired, POOLS)
    mine = [r for r in records if r.volume != volume]
    vols["ceph"].discard(volume)
    why = f"host host-a (heartbeat 3 s ago), which has claimed instance {inst}"
    p = plan(desired, observed(mine, vols))
    assert [a.action for a in p.actions if a.volume == volume] == [ActionKind.CREATE]
    p = plan(desired, shared(observed(mine, vols), **{volume: Holder("host-a", 0, False, why)}))
    assert [a for a in p.actions if a.volume == volume] == [] and p.errors == ()
    (w,) = [w for w in p.warnings if w.volume == volume]
    assert w.code == "owned-elsewhere" and why in w.message


def test_a_free_disk_is_taken_over_and_not_touched(corpus_config: Config) -> None:
    desired = desired_from([DB], corpus_config)
    _, volume = ceph_disk(desired)
    records, vols = converged(desired, POOLS)
    mine = [r for r in records if r.volume != volume]
    why = "host host-a, whose heartbeat expired 400 s ago (limit 300 s)"
    obs = shared(observed(mine, vols), **{volume: Holder("host-a", 4, True, why)})
    p = plan(desired, obs)
    assert p.errors == ()
    (a,) = p.actions
    assert (a.action, a.volume, a.holder, a.destructive) == (
        ActionKind.TAKE_OVER,
        volume,
        "host-a",
        False,
    )
    assert a.precondition.record_generation == 4 and a.precondition.volume_exists
    assert why in a.reason
    # A saved plan keeps who it is taken from, for apply to compare with a fresh plan's.
    assert a.to_json()["holder"] == "host-a"


def test_an_orphan_in_a_shared_pool_is_handed_over_never_pruned(corpus_config: Config) -> None:
    desired = desired_from([DB], corpus_config)
    _, volume = ceph_disk(desired)
    records, vols = converged(desired, POOLS)
    obs = shared(observed(records, vols))
    nothing = Desired(())
    # Without --prune: kept, and it stays this host's.
    p = plan(nothing, obs)
    assert p.actions == () or all(a.pool != "ceph" for a in p.actions)
    (w,) = [w for w in p.warnings if w.volume == volume]
    assert w.code == "orphaned-record" and "hand it over" in w.message
    # With --prune: handed over; the file pools' orphans are deleted as before.
    p = plan(nothing, obs, PlanOptions(prune=True, force=True))
    by_pool = {a.pool: a.action for a in p.actions}
    assert by_pool["ceph"] is ActionKind.HAND_OVER
    assert by_pool["local"] is ActionKind.DELETE
    (h,) = [a for a in p.actions if a.pool == "ceph"]
    assert not h.destructive and h.precondition.record_generation == 1
    # The loop (every manifest read, no --prune): handed over, nothing deleted.
    p = plan(nothing, obs, PlanOptions(hand_over=True, force=True))
    assert [(a.pool, a.action) for a in p.actions] == [("ceph", ActionKind.HAND_OVER)]


def test_no_hand_over_while_a_manifest_failed_to_load(
    corpus_config: Config, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: [\n")
    desired = desired_from([DB], corpus_config)
    records, vols = converged(desired, POOLS)
    obs = shared(observed(records, vols))
    broken = desired_from([str(bad)], corpus_config)
    p = plan(broken, obs, PlanOptions(prune=True, force=True))
    assert not [a for a in p.actions if a.action is ActionKind.HAND_OVER]
    assert any(e.code == "prune-refused" and e.pool == "ceph" for e in p.errors)
    p = plan(broken, obs, PlanOptions(hand_over=True, force=True))
    assert p.actions == ()


def test_a_file_pool_is_never_shared(corpus_config: Config) -> None:
    desired = desired_from([DB], corpus_config)
    records, vols = converged(desired, POOLS)
    p = plan(Desired(()), observed(records, vols), PlanOptions(hand_over=True, force=True))
    assert p.actions == ()  # hand-over alone deletes nothing and hands nothing over
    assert ObservedPool("x", frozenset()).shared is False


def test_an_encrypted_disk_held_elsewhere_is_not_taken_over(corpus_config: Config) -> None:
    """Its key is only in the other host's private libvirt secret: a plan error, not a
    take-over that would leave a disk no domain here can open (key sources: README)."""
    desired = desired_from([DB], corpus_config)
    inst, volume = ceph_disk(desired)
    records, vols = converged(desired, POOLS)
    mine = [r for r in records if r.volume != volume]
    (i,) = [i for i in desired.instances if i.instance == inst]
    disks = tuple(
        dataclasses.replace(
            d,
            spec=d.spec.model_copy(update={"encryption": EncryptionSpec(format="luks")}),
        )
        if d.volume == volume
        else d
        for d in i.disks
    )
    desired = dataclasses.replace(
        desired,
        instances=tuple(
            dataclasses.replace(i, disks=disks) if x is i else x for x in desired.instances
        ),
    )
    why = "host host-a, whose heartbeat expired 400 s ago (limit 300 s)"
    obs = shared(observed(mine, vols), **{volume: Holder("host-a", 4, True, why)})
    p = plan(desired, obs)
    assert p.actions == ()
    (e,) = p.errors
    assert (e.code, e.volume) == ("encryption-unsupported", volume)
    assert "taking over an encrypted disk needs its key" in e.message
