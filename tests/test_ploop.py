"""The ploop backend on a real libvirtd: parallels images written by qemu-img, never grown.

libvirt 9 cannot make (`ploop init`) or remove (it deletes a directory tree) a ploop volume
here, so the driver writes and unlinks the file itself; these tests hold it to the same
cycle as the other file backends: create from an image and each template with the image's
data, refuse to grow, delete, tombstone, Retain, cache gc, hostile input, and SIGKILL at
every step boundary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.diff import plan
from reconciler.model.record import RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.load import load_config
from tests.conftest import Pools
from tests.env import Env, disk
from tests.helpers import desired_from, observed, record_for
from tests.killpoints import at_each
from tests.test_images import catalog_entry, hostile_refused, pool_contents, qemu_img, records
from tests.test_images import same_data as same_raw_data

PARALLELS_MAGIC = b"WithouFreSpacExt"


def ploop(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="ploop", fmt="ploop", **kw)


def same_data(disk_path: Path, raw: Path) -> bool:
    """The ploop disk holds `raw`'s bytes (and zeros beyond them), read as parallels."""
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "parallels", "-F", "raw", str(disk_path), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0


def info(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-f", "parallels", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def libvirt_volume_xml(env: Env, name: str) -> str:
    conn = libvirt.open(env.uri)
    try:
        pool = conn.storagePoolLookupByName(env.pools["local"][0])
        pool.refresh(0)
        xml: str = pool.storageVolLookupByName(name).XMLDesc(0)
        return xml
    finally:
        conn.close()


@pytest.fixture
def ploop_env(env: Env) -> Env:
    env.backends = ["flat", "qcow2", "ploop"]
    env.write_config()
    return env


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw image of recognisable content (2 MiB)."""
    d = tmp_path / "images"
    d.mkdir()
    raw = d / "good.raw"
    raw.write_bytes(b"".join(i.to_bytes(4, "little") * 256 for i in range(2048)))
    return raw


# -- the planner (pure) ---------------------------------------------------------------


def test_planner_refuses_to_grow_a_ploop_disk(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        json.dumps(
            {
                "apiVersion": "reconciler/v1",
                "kind": "Config",
                "state": {"dir": str(tmp_path / "state")},
                "pools": {
                    "local": {"uri": "test:///default", "libvirtPool": "p", "backends": ["ploop"]}
                },
            }
        )
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vm.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01",
                "disks": [ploop("d", size="32MiB")],
            }
        )
    )
    d = desired_from([str(tmp_path / "m")], load_config(str(cfg)))
    assert not d.failed
    (inst,) = d.instances
    (dd,) = inst.disks
    rec = record_for(inst.instance, dd.spec, dd.volume, size=16 << 20)
    p = plan(d, observed([rec], {"local": {dd.volume}}))
    assert p.actions == ()
    (err,) = p.errors
    assert err.code == "resize-unsupported"
    assert "qemu-img cannot resize parallels (ploop) images" in err.message
    assert "make a new disk" in err.message
    # The same size is converged; a smaller one is still a shrink, refused as such.
    same = record_for(inst.instance, dd.spec, dd.volume)
    assert plan(d, observed([same], {"local": {dd.volume}})).errors == ()
    big = record_for(inst.instance, dd.spec, dd.volume, size=64 << 20)
    assert [e.code for e in plan(d, observed([big], {"local": {dd.volume}})).errors] == [
        "shrink-refused"
    ]


# -- against the real daemon ----------------------------------------------------------


@pytest.mark.libvirtd
def test_ploop_disks_from_an_image_and_every_template(ploop_env: Env, image: Path) -> None:
    env = ploop_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    sizes = {"img": 16 << 20, "blank": 8 << 20, "swap": 8 << 20, "ext4": 16 << 20}
    sizes |= {"xfs": 320 << 20, "vfat": 8 << 20}
    disks = [ploop("img", size=sizes["img"], image="img", template=None)]
    for kind in ("blank", "swap", "ext4", "xfs", "vfat"):
        label = {"ext4": "root", "xfs": "data", "vfat": "CFG"}.get(kind)
        disks.append(ploop(kind, size=sizes[kind], template=kind, label=label))
    inst = env.manifest("vm", disks)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert "Apply: 6 done, 0 skipped, 0 failed." in out

    recs = {r.volume: r for r in records(env)}
    entries = {
        r.spec.get("template", "img"): r.volume for r in recs.values() if r.kind is RecordKind.CACHE
    }
    assert set(entries) == {"img", "swap", "ext4", "xfs", "vfat"}
    zeros = env.root / "zeros.raw"
    zeros.write_bytes(b"")
    for name, size in sizes.items():
        vol = env.volume(inst, name)
        rec = recs[vol.name]
        assert (rec.backend, rec.format, rec.state) == (
            Backend.PLOOP,
            DiskFormat.PLOOP,
            RecordState.READY,
        )
        assert rec.backing is None  # a copy: it depends on no cache entry once made
        assert vol.read_bytes()[:16] == PARALLELS_MAGIC
        meta = info(vol)
        assert (meta["format"], meta["virtual-size"]) == ("parallels", size)
        assert "backing-filename" not in meta
        source = image if name == "img" else zeros
        if name in entries and name != "img":
            source = env.pool_dir() / entries[name]
        assert same_data(vol, source), name
        # The volume carries its record (the executor's copy works on this file too).
        copy = json.loads(os.getxattr(vol, "trusted.reconciler.record"))
        assert copy["format"] == "ploop" and copy["state"] == "ready"
        # libvirt lists it as a ploop volume (a file, which it probed as parallels).
        assert "<format type='ploop'/>" in libvirt_volume_xml(env, vol.name)
    assert same_raw_data(env.pool_dir() / entries["img"], "raw", image)
    # Converged: no action, and a healthy ploop header gives no format-mismatch warning.
    again = env.plan_json("--detailed-exitcode")
    assert again["actions"] == [] and again["errors"] == [] and again["warnings"] == []
    assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(".reconciler-tmp-")]


@pytest.mark.libvirtd
def test_growing_a_ploop_disk_is_an_error_and_nothing_changes(ploop_env: Env) -> None:
    env = ploop_env
    inst = env.manifest("vm", [ploop("d", size="8MiB", template="ext4", label="d")])
    assert env.run()[0] == 0
    vol = env.volume(inst, "d")
    before = vol.read_bytes()
    (rec_before,) = [r for r in records(env) if r.kind is RecordKind.DISK]
    env.manifest("vm", [ploop("d", size="16MiB", template="ext4", label="d")], instance=inst)

    p = env.plan_json()
    assert p["actions"] == []
    assert [(e["code"], e["volume"]) for e in p["errors"]] == [("resize-unsupported", vol.name)]
    rc, out, _ = env.run("--dry-run")
    assert rc == 1 and "qemu-img cannot resize parallels (ploop) images" in out
    rc, out, err = env.run()
    assert rc == 1, out + err
    assert "qemu-img cannot resize parallels (ploop) images" in out + err
    assert vol.read_bytes() == before
    assert info(vol)["virtual-size"] == 8 << 20
    (rec_after,) = [r for r in records(env) if r.kind is RecordKind.DISK]
    assert rec_after == rec_before


@pytest.mark.libvirtd
def test_the_drivers_resize_refuses_ploop_if_ever_reached(ploop_env: Env) -> None:
    from reconciler.drivers.file.pool import FilePoolDriver
    from reconciler.drivers.host.libvirt import Connections
    from reconciler.model.errors import ReconcileError

    env = ploop_env
    inst = env.manifest("vm", [ploop("d", size="8MiB")])
    assert env.run()[0] == 0
    (rec,) = [r for r in records(env) if r.kind is RecordKind.DISK]
    cfg = load_config(str(env.config_path))
    drv = FilePoolDriver("local", cfg.pools["local"], Connections())
    with pytest.raises(ReconcileError, match="cannot resize parallels"):
        drv.resize(rec, 16 << 20)
    assert info(env.volume(inst, "d"))["virtual-size"] == 8 << 20


@pytest.mark.libvirtd
def test_delete_tombstone_and_retain(ploop_env: Env) -> None:
    env = ploop_env
    for i in range(20):  # so deleting a few stays under the 10% safety limit
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest(
        "old",
        [
            ploop("gone", size="8MiB"),
            ploop("disk", size="8MiB", template="vfat"),
            ploop("data", size="8MiB", policy="Retain"),
        ],
    )
    assert env.run()[0] == 0
    # A disk dropped from the manifest is deleted (libvirt's vol delete would fail on it).
    env.manifest(
        "old",
        [ploop("disk", size="8MiB", template="vfat"), ploop("data", size="8MiB", policy="Retain")],
        instance=inst,
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not env.volume(inst, "gone").exists()
    conn = libvirt.open(env.uri)
    pool = conn.storagePoolLookupByName(env.pools["local"][0])
    assert env.volume(inst, "gone").name not in {v.name() for v in pool.listAllVolumes(0)}
    conn.close()

    env.manifest("old", [], instance=inst, deleted=True)
    p = env.plan_json()
    kinds = {a["disk"]: (a["action"], a["destructive"]) for a in p["actions"]}
    assert kinds == {"disk": ("delete", True), "data": ("release", False)}
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not env.volume(inst, "disk").exists()
    assert env.volume(inst, "data").read_bytes()[:16] == PARALLELS_MAGIC  # kept, unmanaged
    assert [r for r in records(env) if r.instance == inst] == []
    assert env.plan_json()["actions"] == []


@pytest.mark.libvirtd
def test_raw_disk_whose_guest_wrote_the_parallels_magic_is_still_deleted(env: Env) -> None:
    """libvirt types such a raw file as ploop and its vol delete then fails on it."""
    for i in range(20):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest("vm", [disk("d", size="4MiB")])
    assert env.run()[0] == 0
    vol = env.volume(inst, "d")
    with open(vol, "r+b") as f:
        f.write(PARALLELS_MAGIC + bytes(48))
    assert "<format type='ploop'/>" in libvirt_volume_xml(env, vol.name)
    p = env.plan_json()
    assert [(w["code"], w["volume"]) for w in p["warnings"]] == [("format-mismatch", vol.name)]
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not vol.exists()
    assert [r for r in records(env) if r.instance == inst] == []


@pytest.mark.libvirtd
def test_cache_gc_spares_the_entry_a_ploop_disk_is_being_made_from(
    ploop_env: Env, image: Path, tmp_path: Path
) -> None:
    env = ploop_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    env.manifest("vm", [ploop("root", size="16MiB", image="img", template=None)])
    assert env.run()[0] == 0  # the entry is made and ready; the disk is a copy of it
    # Trace a second disk's create from the ready entry, then stop a third one's at the
    # boundary where its bytes are written but it has no volume name yet.
    env.manifest("vm2", [ploop("root", size="16MiB", image="img", template=None)])
    steps = env.traced_steps()
    assert steps[:4] == ["record.creating", "volume.filled", "volume.created", "record.ready"]
    inst = env.manifest("vm3", [ploop("root", size="16MiB", image="img", template=None)])
    killed = env.subprocess(env={"RECONCILER_CRASH_AT": str(steps.index("volume.filled") + 1)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (env.pool_dir() / f".reconciler-tmp-{env.volume(inst, 'root').name}").exists()
    for r in records(env):
        if r.kind is RecordKind.DISK and r.state is RecordState.READY:
            assert r.backing is None  # ready ploop disks are copies
    (disk_rec,) = [r for r in records(env) if r.instance == inst]
    assert disk_rec.state is RecordState.CREATING and disk_rec.backing is not None
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert rc == 0 and "0 removed, 1 kept" in out and "used by 1 disk(s)" in out, out
    assert any(r.kind is RecordKind.CACHE for r in records(env))

    # A normal run finishes it; the ready ploop disk is a copy, so gc may now remove it.
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert same_data(env.volume(inst, "root"), image)
    assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(".reconciler-tmp-")]
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert rc == 0 and "1 removed, 0 kept" in out, out
    assert [r for r in records(env) if r.kind is RecordKind.CACHE] == []
    assert same_data(env.volume(inst, "root"), image)  # the copy does not need it


def qcow2_header_naming(target: Path, tmp_path: Path) -> bytes:
    img = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(target), str(img), "1G")
    return img.read_bytes()[:65536]


@pytest.mark.libvirtd
def test_guest_written_qcow2_header_is_never_followed(ploop_env: Env, tmp_path: Path) -> None:
    env = ploop_env
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host secret\n" * 100)
    for i in range(20):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest("vm", [ploop("guest", size="8MiB"), ploop("host", size="8MiB")])
    assert env.run()[0] == 0
    header = qcow2_header_naming(secret, tmp_path)
    hdr = tmp_path / "hdr.bin"
    hdr.write_bytes(header)
    # The guest writes the header into its disk (its first guest-visible bytes, which are
    # in the image's data area) ...
    guest = env.volume(inst, "guest")
    subprocess.run(
        ["qemu-io", "-f", "parallels", "-c", f"write -s {hdr} 0 {len(header)}", str(guest)],
        check=True,
        capture_output=True,
    )
    # ... and, worse than any guest can, over the file's own first bytes.
    host = env.volume(inst, "host")
    with open(host, "r+b") as f:
        f.write(header)
    recs_before = {r.volume: r for r in records(env)}
    assert "<format type='ploop'/>" in libvirt_volume_xml(env, guest.name)
    assert str(secret) in libvirt_volume_xml(env, host.name)  # libvirt follows the header

    p = env.plan_json()
    assert p["actions"] == [] and p["errors"] == []
    assert [(w["code"], w["volume"]) for w in p["warnings"]] == [("format-mismatch", host.name)]
    assert str(secret) not in json.dumps(p)
    assert {r.volume: r for r in records(env)} == recs_before
    assert "backing-filename" not in info(guest)

    # Deleting goes by the record: both files go, the host file stays as it was.
    before = secret.stat()
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not guest.exists() and not host.exists()
    after = secret.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert str(secret) not in out + err


@pytest.mark.libvirtd
def test_hostile_images_for_ploop_disks_are_refused_and_leave_nothing(
    ploop_env: Env, image: Path, tmp_path: Path
) -> None:
    env = ploop_env
    hostile_refused(
        env,
        image.parent,
        tmp_path,
        lambda name: ploop("d", size="16MiB", image=name, template=None),
    )
    assert pool_contents(env) == []
    assert records(env) == []


# -- SIGKILL at every step boundary ---------------------------------------------------

FILLER = 24


def crash_before(env: Env, image: Path) -> None:
    env.backends = ["flat", "qcow2", "ploop"]
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    for i in range(FILLER):
        env.manifest(f"filler{i}", [disk("d", size="1MiB")])
    env.manifest("doomed", [ploop("d", size="4MiB", template="vfat", label="DOOMED")])
    env.manifest("stable", [ploop("d", size="8MiB", template="ext4", label="stable")])


def crash_after(env: Env, ids: dict[str, str]) -> None:
    env.manifest("doomed", [], instance=ids["doomed"], deleted=True)
    env.manifest(
        "fresh",
        [
            ploop("a", size="16MiB", image="img", template=None),
            ploop("b", size="8MiB", template="swap"),
            ploop("c", size="8MiB"),
        ],
    )


def crash_env(pools: Pools, root: Path, image: Path) -> tuple[Env, dict[str, str]]:
    pool = pools.make(root / "pool")
    env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
    crash_before(env, image)
    rc, out, err = env.run()
    assert rc == 0, out + err
    ids = {p.stem: json.loads(p.read_text())["instance"] for p in env.manifests.glob("*.yaml")}
    return env, ids


def check_consistent(env: Env) -> None:
    store = env.store()
    recs, bad = store.load_all()
    store.close()
    assert not bad
    assert all(r.state is RecordState.READY for r in recs), [
        (r.volume, r.state) for r in recs if r.state is not RecordState.READY
    ]
    present = {p.name for p in env.pool_dir().iterdir() if p.name != ".reconciler"}
    assert present == {r.volume for r in recs}


@pytest.mark.libvirtd
def test_kill_at_every_step_boundary_of_ploop_creates_and_deletes(
    pools: Pools, tmp_path: Path, image: Path
) -> None:
    env, ids = crash_env(pools, tmp_path / "trace", image)
    crash_after(env, ids)
    steps = env.traced_steps("--jobs", "1")
    names = set(steps)
    assert {"record.creating", "volume.filled", "volume.created", "record.deleted"} <= names
    check_consistent(env)

    def kill_at(k: int) -> None:
        env, ids = crash_env(pools, tmp_path / f"k{k}", image)
        stable = env.volume(ids["stable"], "d")
        stable_bytes = stable.read_bytes()
        crash_after(env, ids)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, (
            f"kill point {k}:\n{killed.stdout}\n{killed.stderr}"
        )
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        assert env.plan_json()["actions"] == [], f"kill point {k} did not converge"
        check_consistent(env)
        assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(".reconciler-tmp-")]
        assert not env.volume(ids["doomed"], "d").exists()
        assert stable.read_bytes() == stable_bytes
        fresh = json.loads((env.manifests / "fresh.yaml").read_text())["instance"]
        assert same_data(env.volume(fresh, "a"), image), k
        assert info(env.volume(fresh, "c"))["virtual-size"] == 8 << 20

    at_each(range(1, len(steps) + 1), kill_at)  # two at a time: each its own dir pool and env
