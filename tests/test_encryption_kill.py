"""SIGKILL at the named boundaries of encrypted creates and deletes on rbd (keys through a
KMS's command) and LVM (keys in a key directory): after the record, after the key is
stored, after the secret is defined, after the first volume step; in a delete, after the
volume, after the secret, after the stored key. Each kill is checked at once (no secret
and no stored key without a record naming it; no ready record without its secret, held
with its value, and its stored key), then the next run must converge to the same.
(tests/test_encryption.py kills a file pool at every boundary.)"""

from __future__ import annotations

import contextlib
import signal
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from reconciler.drivers.host import keys
from reconciler.drivers.rbd.cluster import RbdRecordStore
from reconciler.model.record import DiskRecord, RecordState
from tests.conftest import Pools, make_lvm_env
from tests.conftest_ceph import Ceph
from tests.conftest_lvm import VolumeGroup, spare_vg
from tests.env import Env, disk
from tests.killpoints import at_each, at_each_with
from tests.rbdsite import RbdSite, rbd_site
from tests.test_encryption import encrypted, records
from tests.test_key_sources import kms

pytestmark = pytest.mark.libvirtd

NS = "ckill"
# The boundaries killed at, by name; and the step after the last of CREATE (the first
# volume step) and the one before the first of DELETE (the volume removed).
# (`secret.marked`, between the secret's define and its value, is killed at in
# tests/test_encryption.py's every-boundary test and tests/test_key_sources.py's restore:
# each kill point here costs an encrypted create, seconds of qemu-img's PBKDF timing.)
CREATE = ["record.creating", "key.stored", "secret.defined"]
DELETE = ["secret.undefined", "key.deleted"]


def named_points(create: list[str], delete: list[str]) -> list[tuple[str, int, str]]:
    """(run, kill point (1-based), what it is) for the create's and the delete's named
    boundaries, from the steps of each traced run."""
    points = [("create", create.index(n) + 1, n) for n in CREATE]
    defined = create.index("secret.defined")
    points.append(("create", defined + 2, f"first volume step ({create[defined + 1]})"))
    undefined = delete.index("secret.undefined")
    points.append(("delete", undefined, f"volume removed ({delete[undefined - 1]})"))
    points += [("delete", delete.index(n) + 1, n) for n in DELETE]
    assert len(set(points)) == 7, (points, create, delete)
    return points


def our_secrets(uri: str, instances: list[str]) -> dict[str, bool]:
    """The reconciler's secrets of these instances' volumes: UUID -> held (not unset)."""
    conn = libvirt.open(uri)
    try:
        out = {}
        for sec in conn.listAllSecrets(0):
            try:
                root = ET.fromstring(sec.XMLDesc(0))
            except libvirt.libvirtError:  # another test's, undefined since it was listed
                continue
            desc = root.findtext("description") or ""
            usage = root.findtext("usage/volume") or ""
            if desc.startswith(keys.DESCRIPTION_PREFIX) and any(i in usage for i in instances):
                out[sec.UUIDString()] = not desc.endswith(keys.UNSET)
        return out
    finally:
        conn.close()


def undefine_all(uri: str, uuids: list[str]) -> None:
    conn = libvirt.open(uri)
    try:
        for u in uuids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.secretLookupByUUIDString(u).undefine()
    finally:
        conn.close()


def check_keys(recs: list[DiskRecord], defined: dict[str, bool], stored: set[str]) -> None:
    named = {r.encryption.secret: r for r in recs if r.encryption is not None}
    assert set(defined) <= set(named), ("secrets without a record", set(defined) - set(named))
    assert stored <= set(named), ("stored keys without a record", stored - set(named))
    for s, r in named.items():
        if r.state is RecordState.READY:
            assert defined.get(s), ("a ready record whose secret is not held", r.volume)
            assert s in stored, ("a ready record whose stored key is gone", r.volume)


def stored_keys(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if not p.name.startswith(".tmp-")}


def scenario(env: Env, run: str, disk_args: dict[str, str]) -> str:
    """The instance of a run to kill: `create` makes one encrypted disk; `delete` removes
    one made before it. A UUID of its own: kill points share one daemon, where the
    secrets name their volumes."""
    inst = str(uuid.uuid4())
    env.manifest("vm", [encrypted(disk("d", size="4MiB", **disk_args))], instance=inst)
    if run == "delete":
        res = env.subprocess()
        assert res.returncode == 0, res.stdout + res.stderr
        env.manifest("vm", [], instance=inst, deleted=True)
    return inst


def traced(env: Env, disk_args: dict[str, str]) -> tuple[list[str], list[str]]:
    """The steps of a create and of a delete of one encrypted disk (one create: it is
    seconds of qemu-img's PBKDF timing, more under load)."""
    inst = scenario(env, "create", disk_args)
    create = env.traced_steps("--jobs", "1")
    env.manifest("vm", [], instance=inst, deleted=True)
    delete = env.traced_steps("--jobs", "1")
    return create, delete


def kill_and_converge(
    env: Env,
    run: str,
    k: int,
    what: str,
    inst: str,
    records: Callable[[], list[DiskRecord]],
    stored: Callable[[], set[str]],
    volumes: Callable[[], set[str]],
) -> None:
    killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
    assert killed.returncode == -signal.SIGKILL, f"{k} {what}: {killed.stdout}{killed.stderr}"
    try:
        check_keys(records(), our_secrets(env.uri, [inst]), stored())
    except AssertionError as e:
        raise AssertionError(f"right after the kill in the {run} at {what}: {e}") from None
    res = env.subprocess()
    assert res.returncode == 0, f"{run} {what}: {res.stdout}{res.stderr}"
    assert env.plan_json()["actions"] == [], f"the {run} killed at {what} did not converge"
    recs = records()
    defined = our_secrets(env.uri, [inst])
    check_keys(recs, defined, stored())
    assert all(r.state is RecordState.READY for r in recs), [(r.volume, r.state) for r in recs]
    made = 1 if run == "create" else 0
    assert len(recs) == len(defined) == len(stored()) == made, (run, what, recs, defined)
    assert volumes() == {r.volume for r in recs}
    undefine_all(env.uri, list(defined))


# -- rbd, keys through a KMS's command --------------------------------------------------------


def rbd_env(site: RbdSite, root: Path) -> tuple[Env, Path]:
    """An env of its own host (one Ceph pool for all kill points: each host's records are
    its own), with its own KMS."""
    root.mkdir()
    argv, store = kms(root)
    env = site.env(root / "env", namespace=NS)
    env.extra_pools["ceph"]["keys"] = {"command": argv, "timeout": 30}
    env.host = f"host-{root.name}"
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    return env, store


def rbd_records(site: RbdSite, host: str) -> list[DiskRecord]:
    s = RbdRecordStore(
        lambda: site.ceph.cluster.open_ioctx(site.pool), site.pool, host=host, namespace=NS
    )
    s.exists = lambda volume: volume in site.images()  # as the driver's store has it
    try:
        recs, bad = s.load_all()
    finally:
        s.close()
    assert not bad, bad
    return list(recs)


RBD = {"backend": "rbd", "pool": "ceph", "template": "blank"}


@pytest.mark.ceph
def test_kill_encrypted_rbd_create_and_delete_with_a_key_command(
    ceph: Ceph, libvirt_uri: str, tmp_path: Path
) -> None:
    with rbd_site(ceph, libvirt_uri) as site:
        env, _ = rbd_env(site, tmp_path / "trace")
        steps = traced(env, RBD)
        points = named_points(*steps)

        def kill_at(i: int) -> None:
            run, k, what = points[i]
            env, store = rbd_env(site, tmp_path / f"k{i}")
            inst = scenario(env, run, RBD)
            kill_and_converge(
                env, run, k, what, inst,
                lambda: rbd_records(site, str(env.host)), lambda: stored_keys(store),
                lambda: {v for v in site.images() if v.startswith(inst)},
            )  # fmt: skip

        at_each(range(len(points)), kill_at)
    print(f"rbd encrypted kill points: {points}; steps {steps}")


# -- LVM, keys in a key directory ----------------------------------------------------------------


@pytest.fixture
def second_vg(lvm_vg: VolumeGroup) -> Iterator[VolumeGroup]:
    with spare_vg(lvm_vg, "y") as vg:
        yield vg


def lvm_kill_env(pools: Pools, root: Path, vg: VolumeGroup) -> tuple[Env, Path]:
    env = make_lvm_env(pools, root, vg)
    key_dir = root / "keys"
    key_dir.mkdir(mode=0o700)
    env.extra_pools = {
        "vg": {
            "uri": env.uri,
            "libvirtPool": env.pools["vg"][0],
            "backends": ["lvm"],
            "lvm": vg.section(),
            "keys": {"directory": str(key_dir)},
        }
    }
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    return env, key_dir


LVM = {"backend": "lvm", "pool": "vg", "fmt": "raw", "template": "blank"}


def test_kill_encrypted_lvm_create_and_delete_with_a_key_directory(
    pools: Pools, tmp_path: Path, lvm_vg: VolumeGroup, second_vg: VolumeGroup
) -> None:
    env, _ = lvm_kill_env(pools, tmp_path / "trace", lvm_vg)
    steps = traced(env, LVM)
    points = named_points(*steps)

    def kill_at(i: int, vg: VolumeGroup) -> None:
        run, k, what = points[i]
        env, key_dir = lvm_kill_env(pools, tmp_path / f"k{i}", vg)
        inst = scenario(env, run, LVM)
        kill_and_converge(
            env, run, k, what, inst,
            lambda: records(env), lambda: stored_keys(key_dir), lambda: set(vg.lvs()),
        )  # fmt: skip

    at_each_with(range(len(points)), [lvm_vg, second_vg], kill_at)
    lvm_vg.reset()
    print(f"lvm encrypted kill points: {points}; steps {steps}")
