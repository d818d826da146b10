"""Observation against a real libvirtd, including a guest-written qcow2 header."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import libvirt
import pytest

from reconciler.drivers.file import volumes as filevolumes
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd


def qcow2_header_naming(target: Path, tmp_path: Path) -> bytes:
    """The first bytes of a qcow2 image whose backing file is `target` (a host file)."""
    img = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(target), str(img), "1G"],
        check=True,
    )
    return img.read_bytes()[:65536]


def test_guest_written_header_is_reported_never_followed(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host secret\n" * 100)
    before = secret.stat()
    for i in range(20):  # other disks, so this test is not about thresholds
        env.manifest(f"other{i}", [disk("d", size="1MiB")])
    inst = env.manifest("victim", [disk("d", size="8MiB")])
    assert env.run()[0] == 0
    vol = env.volume(inst, "d")
    # The guest writes a qcow2 header, naming a host file as its backing file, into its
    # raw disk.
    with open(vol, "r+b") as f:
        f.write(qcow2_header_naming(secret, tmp_path))

    # libvirt probes the header: it now calls the raw volume qcow2 backed by the host file.
    conn = libvirt.open(env.uri)
    pool = conn.storagePoolLookupByName(env.pools["local"][0])
    pool.refresh(0)
    xml = pool.storageVolLookupByName(vol.name).XMLDesc(0)
    conn.close()
    assert "<format type='qcow2'/>" in xml and str(secret) in xml

    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []
    assert [(w["code"], w["volume"]) for w in plan["warnings"]] == [("format-mismatch", vol.name)]
    assert str(secret) not in json.dumps(plan)

    # Growing it works on the recorded raw format: the file is truncated, the header bytes
    # stay the guest's, and nothing reads, copies or writes the host file.
    env.manifest("victim", [disk("d", size="16MiB")], instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert os.stat(vol).st_size == 16 << 20
    with open(vol, "rb") as f:
        assert f.read(4) == b"QFI\xfb"
    # (libvirt itself opens the named file whenever it refreshes the pool, to probe it;
    # that is why nothing here trusts libvirt's view of a volume.)
    after = secret.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert str(secret) not in out + err
    for entry in env.pool_dir().iterdir():
        if entry.is_file():
            assert b"host secret" not in entry.read_bytes(), entry


def test_large_pool_is_listed_beyond_libvirts_rpc_limit(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    insts = [env.manifest(f"vm{i}", [disk("d", size="1MiB")]) for i in range(4)]
    assert env.run()[0] == 0
    # Pretend the pool holds more volumes than libvirt can return in one RPC.
    monkeypatch.setattr(filevolumes, "LIBVIRT_VOL_LIST_MAX", 2)
    env.volume(insts[0], "d").unlink()
    plan = env.plan_json()
    assert [(a["action"], a["instance"]) for a in plan["actions"]] == [("create", insts[0])]
    assert [w["code"] for w in plan["warnings"]] == ["drift"]


def test_missing_and_inactive_pools_are_errors_not_actions(env: Env) -> None:
    env.manifest("vm", [disk("d", size="1MiB")])
    env.pools["ghost"] = ("no-such-pool", Path("/nonexistent"))
    env.write_config()
    env.manifest("vm2", [disk("d", size="1MiB", pool="ghost")])
    plan = env.plan_json()
    assert [a["pool"] for a in plan["actions"]] == ["local"]
    (err,) = plan["errors"]
    assert err["code"] == "pool-unreachable" and err["pool"] == "ghost"
    assert "'no-such-pool' is not defined" in err["message"]

    conn = libvirt.open(env.uri)
    conn.storagePoolLookupByName(env.pools["local"][0]).destroy()
    try:
        plan = env.plan_json()
        assert plan["actions"] == []
        assert {e["pool"] for e in plan["errors"]} == {"ghost", "local"}
        assert any("is not active" in e["message"] for e in plan["errors"])
    finally:
        conn.storagePoolLookupByName(env.pools["local"][0]).create(0)
        conn.close()


def test_unreadable_record_stops_work_on_that_disk(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    assert env.run()[0] == 0
    store = env.store()
    (rec,) = [r for r in store.load_all()[0] if r.instance == inst]
    store.put_raw(
        rec.pool, rec.volume, rec.generation + 1, '{"schema_version": 1, "garbage"', instance=inst
    )
    store.close()
    env.manifest("vm", [disk("d", size="2MiB")], instance=inst)
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [e["code"] for e in plan["errors"]] == ["record-unreadable"]
    assert os.stat(env.volume(inst, "d")).st_size == 1 << 20


def test_attached_volume_is_never_deleted(env: Env) -> None:
    for i in range(20):
        env.manifest(f"other{i}", [disk("d", size="1MiB")])
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    assert env.run()[0] == 0
    vol = env.volume(inst, "d")
    conn = libvirt.open(env.uri)
    name = f"guest-{uuid.uuid4().hex[:12]}"  # unique: other files' tests define domains at once
    dom = conn.defineXML(
        f"""<domain type='qemu'><name>{name}</name><memory>65536</memory>
        <os><type arch='x86_64'>hvm</type></os><devices>
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{vol}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )
    try:
        env.manifest("vm", [], instance=inst, deleted=True)
        plan = env.plan_json()
        assert plan["actions"] == []
        (err,) = plan["errors"]
        assert err["code"] == "volume-in-use" and name in err["message"]
        rc, out, _ = env.run()
        assert rc == 1 and vol.exists()
    finally:
        dom.undefine()
        conn.close()
    rc, out, err_text = env.run()
    assert rc == 0, out + err_text
    assert not vol.exists()


def test_storage_only_connection_refuses_deletes(env: Env) -> None:
    for i in range(20):
        env.manifest(f"other{i}", [disk("d", size="1MiB")])
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    assert env.run()[0] == 0
    env.uri = env.uri.replace("qemu+unix://", "storage+unix://", 1)
    env.write_config()
    env.manifest("vm", [], instance=inst, deleted=True)
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [e["code"] for e in plan["errors"]] == ["attachments-unknown"]
    assert env.volume(inst, "d").exists()


def test_a_domain_undefined_after_the_list_is_taken_uses_no_disk(env: Env) -> None:
    """Other clients undefine domains while a pool is observed: one listed and then gone
    counts as using nothing, and the domains still there are read as before."""
    from reconciler.drivers.host.domains import attachments, domain_xmls

    inst = env.manifest("vm", [disk("d", size="1MiB")])
    assert env.run()[0] == 0
    vol = env.volume(inst, "d")
    conn = libvirt.open(env.uri)
    doms = []
    for n in range(2):
        doms.append(
            conn.defineXML(
                f"""<domain type='qemu'><name>gone-{n}-{uuid.uuid4().hex[:12]}</name>
                <memory>65536</memory><os><type arch='x86_64'>hvm</type></os><devices>
                <disk type='file' device='disk'><driver name='qemu' type='raw'/>
                <source file='{vol}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
            )
        )
    try:
        listed = {d.UUIDString(): d for d in conn.listAllDomains(0)}
        gone, kept = (listed[d.UUIDString()] for d in doms)
        doms[0].undefine()
        assert domain_xmls(gone) is None
        seen = domain_xmls(kept)
        assert seen is not None and seen[0] == doms[1].name() and not seen[1]
        att = attachments(conn, env.pools["local"][0], str(env.pool_dir()))
        assert att.defined[vol.name] == (doms[1].name(),)
    finally:
        doms[1].undefine()
        conn.close()
