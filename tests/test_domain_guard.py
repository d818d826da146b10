"""A domain defined between plan and apply keeps its disk (DESIGN invariant 4).

The plan checks which domains use a volume, but a plan can be old by the time it is
applied (a saved plan, a run that waited for a lock). Every step that destroys a volume
asks libvirt again, under the volume's lock, right before it destroys: a replace at the
same location, the redo of an interrupted delete (made again, or finished), the removal
or replacement of a migration's old volume. On the real private libvirtd, with the plan
made first, the domain defined next, and the old plan applied: the step fails naming the
domain, and the volume (its inode and bytes) and its record are as they were. File pools
for every step; rbd (a network disk naming pool/image) and LVM (a block disk naming
/dev/VG/LV) for the replace and the redo of a delete.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt
import pytest

from reconciler.control.session import Session
from reconciler.diff import PlanOptions
from reconciler.model.plan import Plan
from reconciler.model.record import DiskRecord, MigrationPhase, RecordState
from reconciler.schema.load import load_config
from tests.conftest import Pools
from tests.conftest_ceph import Ceph
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, cli, disk
from tests.rbdsite import rbd_site
from tests.test_lvm import lvm
from tests.test_migrate import files, record, two_pools
from tests.test_rbd import rdisk

pytestmark = pytest.mark.libvirtd


@contextmanager
def domain_using(env: Env, vol: Path, name: str) -> Iterator[str]:
    """A domain defined (never started) whose disk is the file `vol`; undefined after."""
    with defined(
        env.uri,
        name,
        f"""<disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{vol}'/><target dev='vda' bus='virtio'/></disk>""",
    ):
        yield name


@contextmanager
def defined(uri: str, name: str, disk_xml: str) -> Iterator[None]:
    """Domain `name` (unique to its test: other files' tests define domains at once)."""
    conn = libvirt.open(uri)
    dom = conn.defineXML(
        f"""<domain type='qemu'><name>{name}</name><memory>65536</memory>
        <os><type arch='x86_64'>hvm</type></os><devices>{disk_xml}</devices></domain>"""
    )
    try:
        assert not dom.isActive()
        yield
    finally:
        dom.undefine()
        conn.close()


def fingerprint(vol: Path) -> tuple[int, str]:
    return os.stat(vol).st_ino, hashlib.sha256(vol.read_bytes()).hexdigest()


def mark(vol: Path) -> None:
    """Guest data, so that a volume made again would differ."""
    with open(vol, "r+b") as f:
        f.write(b"the guest's data " * 64)


def plan_now(env: Env, *, allow_replace: bool = False) -> Plan:
    config = load_config(str(env.config_path))
    options = PlanOptions(allow_replace, max_delete_percent=config.safety.max_delete_percent)
    with Session(config, options) as s:
        return s.plan(s.load_and_observe([str(env.manifests)]))


def apply_old(env: Env, p: Plan) -> list[tuple[str, str]]:
    """Apply `p` as it was planned (a saved plan: exactly, or not at all)."""
    with Session(load_config(str(env.config_path))) as s:
        result = s.executor(saved=True).apply(p.actions)
    return [(o.status, o.message) for o in result.outcomes]


def record_of(env: Env, pool: str, volume: str) -> DiskRecord | None:
    """The record as the reconciler reads it (the host's database, or RADOS)."""
    with Session(load_config(str(env.config_path))) as s:
        return s.store.get(pool, volume)


def set_state(env: Env, pool: str, volume: str, state: RecordState) -> DiskRecord:
    """As a run stopped in that state left it."""
    with Session(load_config(str(env.config_path))) as s:
        rec = s.store.get(pool, volume)
        assert rec is not None
        new = rec.model_copy(update={"state": state, "generation": rec.generation + 1})
        s.store.put(new, rec.generation)
        return new


def no_limit(env: Env) -> None:
    """One disk is all a test has: the share of disks a plan may destroy is not tested here."""
    env.safety = {"maxDeletePercent": 100}
    env.write_config()


def ok(env: Env, *flags: str) -> None:
    rc, out, err = env.run(*flags)
    assert rc == 0, out + err


def test_a_replace_at_the_same_location_keeps_a_disk_a_domain_now_uses(
    env: Env, tmp_path: Path
) -> None:
    no_limit(env)
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    ok(env)
    vol = env.volume(inst, "d")
    mark(vol)
    before = fingerprint(vol)
    env.manifest("vm", [disk("d", size="1MiB", template="swap")], instance=inst)
    saved = tmp_path / "plan.json"
    res = env.subprocess("--dry-run", "--allow-replace", "--plan-out", str(saved))
    assert res.returncode == 0, res.stdout + res.stderr
    p = plan_now(env, allow_replace=True)
    (a,) = p.actions
    assert a.action.value == "replace" and a.destructive and a.replaces == ("local", vol.name)
    rec = record(env, "local", vol.name)

    with domain_using(env, vol, f"late-{inst[:8]}-{uuid.uuid4().hex[:8]}") as dom:
        ((status, msg),) = apply_old(env, p)
        assert status == "failed", msg
        assert f"not replacing local/{vol.name}" in msg and dom in msg, msg
        assert "nothing was destroyed" in msg
        # The saved plan, through the CLI: refused the same way, in one line.
        res = cli(
            "apply",
            str(saved),
            "--config",
            str(env.config_path),
            "--allow-replace",
            str(env.manifests),
        )
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        assert dom in res.stdout + res.stderr
        assert fingerprint(vol) == before
        assert record(env, "local", vol.name) == rec  # not even marked `deleting`

    # Once no domain uses it, the same replace is carried out.
    ok(env, "--allow-replace")
    assert fingerprint(vol) != before


@pytest.mark.parametrize("manifest", ["kept", "tombstone"])
def test_the_redo_of_an_interrupted_delete_keeps_a_disk_a_domain_now_uses(
    env: Env, manifest: str
) -> None:
    """A record left `deleting`: with the disk still in its manifest the plan makes it
    again (destroying what is there), with the instance deleted it finishes the delete."""
    no_limit(env)
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    ok(env)
    vol = env.volume(inst, "d")
    mark(vol)
    before = fingerprint(vol)
    rec = set_state(env, "local", vol.name, RecordState.DELETING)
    if manifest == "tombstone":
        env.manifest("vm", [], instance=inst, deleted=True)
    p = plan_now(env)
    (a,) = p.actions
    assert a.destructive and a.action.value == ("create" if manifest == "kept" else "delete")

    with domain_using(env, vol, f"late-{inst[:8]}-{uuid.uuid4().hex[:8]}") as dom:
        ((status, msg),) = apply_old(env, p)
        assert status == "failed", msg
        doing = "making again" if manifest == "kept" else "deleting"
        assert f"not {doing} local/{vol.name}" in msg and dom in msg, msg
        assert fingerprint(vol) == before
        assert record(env, "local", vol.name) == rec

    ok(env)
    if manifest == "kept":
        assert fingerprint(vol) != before
        now = record(env, "local", vol.name)
        assert now is not None and now.state is RecordState.READY
    else:
        assert not vol.exists() and record(env, "local", vol.name) is None


# The step boundary (faults.point) of a one-disk migration that ends with the record
# saying `switched` (migrating, copy made, copied, verified, switched): killed there, the
# copy is the disk and the old volume is still there. Checked below, not assumed.
SWITCHED_AT = 5


@pytest.mark.parametrize("target", ["same-pool", "other-pool"])
def test_a_migrations_old_volume_is_kept_while_a_domain_now_uses_it(
    pools: Pools, tmp_path: Path, target: str
) -> None:
    env = two_pools(pools, tmp_path)
    no_limit(env)
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    ok(env)
    vol = env.volume(inst, "d")
    mark(vol)
    before = fingerprint(vol)
    new = (
        disk("d", backend="qcow2", fmt="qcow2", size="1MiB")
        if target == "same-pool"
        else disk("d", size="1MiB", pool="fast")
    )
    env.manifest("vm", [new], instance=inst)
    res = env.subprocess(env={"RECONCILER_CRASH_AT": str(SWITCHED_AT)})
    assert res.returncode == -9, res.stdout + res.stderr
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.migration is not None
    assert rec.migration.phase is MigrationPhase.SWITCHED, rec.migration
    assert fingerprint(vol) == before
    fast = files(env, "fast")
    p = plan_now(env)
    (a,) = p.actions
    assert a.action.value == "migrate"

    with domain_using(env, vol, f"late-{inst[:8]}-{uuid.uuid4().hex[:8]}") as dom:
        ((status, msg),) = apply_old(env, p)
        assert status == "failed", msg
        assert f"not migrating local/{vol.name}" in msg and dom in msg, msg
        assert fingerprint(vol) == before
        assert record(env, "local", vol.name) == rec
        assert files(env, "fast") == fast
        if target == "other-pool":
            assert record(env, "fast", vol.name) is None  # the record did not move either

    ok(env)
    if target == "same-pool":
        assert fingerprint(vol) != before  # the name now holds the copy
        done = record(env, "local", vol.name)
        assert done is not None and done.migration is None and done.format.value == "qcow2"
    else:
        assert not vol.exists() and record(env, "local", vol.name) is None
        assert env.volume(inst, "d", "fast").exists()


@pytest.mark.ceph
@pytest.mark.parametrize("step", ["replace", "redo-delete"])
def test_an_rbd_disk_a_domain_now_uses_is_kept(
    ceph: Ceph, libvirt_uri: str, tmp_path: Path, step: str
) -> None:
    """The same on a Ceph pool, the domain naming the image as an rbd network disk."""
    with rbd_site(ceph, libvirt_uri) as site:
        env = site.env(tmp_path / "env", namespace="guard")
        no_limit(env)
        inst = env.manifest("vm", [rdisk("d", size="4MiB", template="blank")])
        ok(env)
        vol = f"{inst}_d"
        site.write(vol, b"the guest's data " * 64)
        before = site.digests({vol: None})
        if step == "replace":
            env.manifest("vm", [rdisk("d", size="4MiB", template="swap")], instance=inst)
        else:
            set_state(env, "ceph", vol, RecordState.DELETING)
        rec = record_of(env, "ceph", vol)
        p = plan_now(env, allow_replace=True)
        (a,) = p.actions
        assert a.destructive and a.action.value == ("replace" if step == "replace" else "create")
        name = f"late-{inst[:8]}-{uuid.uuid4().hex[:8]}"
        with defined(
            site.uri,
            name,
            f"""<disk type='network' device='disk'><driver name='qemu' type='raw'/>
            <source protocol='rbd' name='{site.pool}/{vol}'>
              <host name='127.0.0.1' port='{site.ceph.mon_v1_port()}'/></source>
            <auth username='admin'><secret type='ceph' uuid='{site.secret}'/></auth>
            <target dev='vda' bus='virtio'/></disk>""",
        ):
            ((status, msg),) = apply_old(env, p)
            assert status == "failed", msg
            doing = "replacing" if step == "replace" else "making again"
            assert f"not {doing} ceph/{vol}" in msg and name in msg, msg
            assert site.digests({vol: None}) == before
            assert record_of(env, "ceph", vol) == rec
        ok(env, "--allow-replace")
        assert site.digests({vol: None}) != before


@pytest.mark.parametrize("step", ["replace", "redo-delete"])
def test_an_lv_a_domain_now_uses_is_kept(lvm_env: Env, lvm_vg: VolumeGroup, step: str) -> None:
    """The same on an LVM pool, the domain naming the LV by its /dev path."""
    env = lvm_env
    no_limit(env)
    inst = env.manifest("vm", [lvm("d", size="8MiB")])
    ok(env)
    name = f"{inst}_d"

    def lv_uuid() -> str | None:
        rows = lvm_vg.report("lvs", "lv_name,lv_uuid", lvm_vg.vg)
        return next((r["lv_uuid"] for r in rows if r["lv_name"] == name), None)

    before = lv_uuid()
    assert before is not None
    if step == "replace":
        env.manifest("vm", [lvm("d", size="8MiB", template="swap")], instance=inst)
    else:
        set_state(env, "vg", name, RecordState.DELETING)
    rec = record_of(env, "vg", name)
    p = plan_now(env, allow_replace=True)
    (a,) = p.actions
    assert a.destructive and a.action.value == ("replace" if step == "replace" else "create")
    dom = f"late-{inst[:8]}-{uuid.uuid4().hex[:8]}"
    with defined(
        env.uri,
        dom,
        f"""<disk type='block' device='disk'><driver name='qemu' type='raw'/>
        <source dev='/dev/{lvm_vg.vg}/{name}'/><target dev='vda' bus='virtio'/></disk>""",
    ):
        ((status, msg),) = apply_old(env, p)
        assert status == "failed", msg
        doing = "replacing" if step == "replace" else "making again"
        assert f"not {doing} vg/{name}" in msg and dom in msg, msg
        assert lv_uuid() == before
        assert record_of(env, "vg", name) == rec
    ok(env, "--allow-replace")
    assert lv_uuid() not in (None, before)
