"""Migrating disks into, out of and between rbd pools, and adopting an existing RBD image,
against the real Ceph test cluster, a real libvirtd and real qemu-img (which has no rbd
driver here: the driver copies with python-rbd and gives qemu-img local raw exports). An
image's bytes are read back with the tests' own python-rbd client, a file's with qemu-img.

Asserted: the data is the same after file -> rbd (flat raw, qcow2, a qcow2 overlay
flattened), rbd -> file (raw, qcow2; a clone of a cache entry flattened, the entry's
reference dropped once the old image is gone), rbd -> another rbd pool (a flat copy) and
lvm -> rbd -> lvm; SIGKILL at every step boundary of a run migrating one disk file -> rbd
and another rbd -> file leaves one record naming where each disk's data is, and the next
run converges; `reconcile adopt` of an existing image records it raw (a guest-written
qcow2 header only warns; a clone is refused); take_file imports a host file's bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.control.session import Session
from reconciler.drivers.api import VolumeExists, overlays_of
from reconciler.drivers.rbd.cluster import RbdRecordStore
from reconciler.drivers.rbd.copies import RECORD_KEY
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.record import DiskRecord, MigrationPhase, RecordKind, RecordState
from reconciler.schema.load import load_config
from tests.conftest import Pools, make_lvm_env
from tests.conftest_ceph import Ceph
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, disk
from tests.killpoints import at_each
from tests.rbdsite import RbdSite, rbd_site
from tests.test_encryption import encrypted
from tests.test_encryption_migrate import KeySpy, decrypted
from tests.test_migrate import content, files, write_pattern

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20
SIZE = 16 * MiB
NS = "mig"
HOST = "host-m"
PATTERN = (0, 1 * MiB, 5 * MiB, 8 * MiB - 65536)  # where write_pattern writes (64 KiB each)


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def rdisk(name: str, pool: str = "ceph", **kw: Any) -> dict[str, Any]:
    return disk(name, backend="rbd", fmt="raw", pool=pool, **kw)


def make_env(pools: Pools, root: Path, *sites: tuple[str, RbdSite]) -> Env:
    """A dir pool `local` (flat, qcow2) and rbd pools named as given."""
    local = pools.make(root / "local")
    env = Env(root / "env", local.uri, {"local": (local.name, local.path)})
    env.extra_pools = {name: s.pool_config(namespace=NS) for name, s in sites}
    env.host = HOST
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    return env


def store(site: RbdSite) -> RbdRecordStore:
    s = RbdRecordStore(
        lambda: site.ceph.cluster.open_ioctx(site.pool), site.pool, host=HOST, namespace=NS
    )
    s.exists = lambda volume: volume in site.images()  # as the driver's store has it
    return s


def rados_records(site: RbdSite) -> list[DiskRecord]:
    s = store(site)
    try:
        good, bad = s.load_all()
        assert not bad, bad
        return good
    finally:
        s.close()


def local_records(env: Env) -> list[DiskRecord]:
    s = env.store()
    try:
        recs, bad = s.load_all()
        assert not bad
        return recs
    finally:
        s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_sha(site: RbdSite, image: str, length: int = SIZE) -> str:
    return sha(site.read(image, length))


def write_image_pattern(site: RbdSite, image: str) -> None:
    """write_pattern's guest data, written into an image as a guest writes."""
    for i, off in enumerate(PATTERN):
        site.write(image, bytes([0x11 + i]) * 65536, off)


def run_ok(env: Env, *args: str) -> str:
    res = env.subprocess(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def plan(env: Env) -> dict[str, Any]:
    return env.plan_json()


def migrate_once(env: Env, name: str, inst: str, new: dict[str, Any]) -> dict[str, Any]:
    env.manifest(name, [new], instance=inst)
    p = plan(env)
    assert not p["errors"], p["errors"]
    (action,) = p["actions"]
    assert action["action"] == "migrate" and not action["destructive"]
    out: dict[str, Any] = action
    return out


def check_rbd_disk(site: RbdSite, volume: str) -> DiskRecord:
    (rec,) = [r for r in rados_records(site) if r.volume == volume]
    assert rec.migration is None and rec.state is RecordState.READY and rec.schema_version == 1
    assert (rec.backend.value, rec.format.value, rec.backing) == ("rbd", "raw", None)
    assert site.parent(volume) is None  # a plain image, not a clone
    copy = site.metadata(volume, RECORD_KEY)
    assert copy is not None and DiskRecord.model_validate_json(copy).volume == volume
    return rec


# -- file -> rbd --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        disk("d", size="16MiB"),
        disk("d", backend="qcow2", fmt="qcow2", size="16MiB"),
        disk("d", backend="qcow2", fmt="qcow2", size="16MiB", template="ext4", label="r"),
    ],
    ids=["flat-raw", "qcow2", "qcow2-overlay"],
)
def test_file_to_rbd_keeps_the_data(
    pools: Pools, site: RbdSite, tmp_path: Path, first: dict[str, Any]
) -> None:
    env = make_env(pools, tmp_path, ("ceph", site))
    inst = env.manifest("vm", [first])
    run_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, first["format"])
    want = content(vol, first["format"], tmp_path)

    source = dict(first["source"])
    new = rdisk("d", size="16MiB", template=source["template"], label=source.get("label"))
    action = migrate_once(env, "vm", inst, new)
    assert action["replaces"] == {"pool": "local", "volume": vol.name}
    run_ok(env)
    assert not vol.exists()
    assert [r for r in local_records(env) if r.kind is RecordKind.DISK] == []
    check_rbd_disk(site, vol.name)
    assert image_sha(site, vol.name) == want
    assert site.size(vol.name) == SIZE
    assert not {i for i in site.images() if i.startswith(TEMP_PREFIX)}
    assert plan(env)["actions"] == []  # converged


# -- rbd -> file --------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "fmt"), [("flat", "raw"), ("qcow2", "qcow2")])
def test_rbd_to_file_keeps_the_data(
    pools: Pools, site: RbdSite, tmp_path: Path, backend: str, fmt: str
) -> None:
    env = make_env(pools, tmp_path, ("ceph", site))
    inst = env.manifest("vm", [rdisk("d", size="16MiB")])
    run_ok(env)
    image = f"{inst}_d"
    write_image_pattern(site, image)
    want = image_sha(site, image)
    assert want != sha(bytes(SIZE))

    migrate_once(env, "vm", inst, disk("d", backend=backend, fmt=fmt, size="16MiB"))
    run_ok(env)
    assert image not in site.images()
    assert [r for r in rados_records(site) if r.kind is RecordKind.DISK] == []
    (rec,) = local_records(env)
    assert (rec.pool, rec.backend.value, rec.format.value, rec.migration) == (
        "local",
        backend,
        fmt,
        None,
    )
    assert content(env.volume(inst, "d"), fmt, tmp_path) == want
    assert plan(env)["actions"] == []


def test_a_clone_moves_out_flat_and_its_entry_loses_the_reference(
    pools: Pools, site: RbdSite, tmp_path: Path
) -> None:
    env = make_env(pools, tmp_path, ("ceph", site))
    spec = {"size": "16MiB", "template": "ext4", "label": "c"}
    inst = env.manifest("vm", [rdisk("d", **spec)])
    run_ok(env)
    image = f"{inst}_d"
    parent = site.parent(image)
    assert parent is not None
    entry = parent[0]
    write_image_pattern(site, image)  # over the ext4 the entry holds: both must arrive
    want = image_sha(site, image)
    assert want != image_sha(site, entry, site.size(entry))
    s = store(site)
    try:
        assert s.reference_names("ceph", entry) == {image: HOST}

        migrate_once(env, "vm", inst, disk("d", **spec))
        run_ok(env)
        assert image not in site.images()
        assert content(env.volume(inst, "d"), "raw", tmp_path) == want
        (rec,) = local_records(env)
        assert rec.backing is None  # a flat file, standalone
        assert s.reference_names("ceph", entry) == {}  # dropped once the image was gone
        assert s.references("ceph", entry) == 0
    finally:
        s.close()
    assert entry in site.images()  # the entry itself is cache gc's to remove
    assert plan(env)["actions"] == []


# -- rbd -> another rbd pool --------------------------------------------------------------


def test_rbd_to_another_rbd_pool_keeps_the_data_flat(
    pools: Pools, site: RbdSite, ceph: Ceph, libvirt_uri: str, tmp_path: Path
) -> None:
    with rbd_site(ceph, libvirt_uri) as other:
        env = make_env(pools, tmp_path, ("ceph", site), ("ceph2", other))
        spec = {"size": "16MiB", "template": "ext4", "label": "o"}
        inst = env.manifest("vm", [rdisk("d", **spec)])
        run_ok(env)
        image = f"{inst}_d"
        parent = site.parent(image)
        assert parent is not None
        write_image_pattern(site, image)
        want = image_sha(site, image)

        migrate_once(env, "vm", inst, rdisk("d", pool="ceph2", **spec))
        run_ok(env)
        assert image not in site.images()
        assert image in other.images()
        assert image_sha(other, image) == want
        assert other.size(image) == SIZE
        assert [r for r in rados_records(site) if r.kind is RecordKind.DISK] == []
        rec = check_rbd_disk(other, image)
        assert rec.pool == "ceph2"
        s = store(site)
        try:
            assert s.reference_names("ceph", parent[0]) == {}
        finally:
            s.close()
        assert plan(env)["actions"] == []


# -- SIGKILL at every step ----------------------------------------------------------------

FORMAT_BEFORE = {"in": "raw", "out": "raw"}


def crash_setup(
    pools: Pools, site: RbdSite, root: Path
) -> tuple[Env, dict[str, str], dict[str, str]]:
    env = make_env(pools, root, ("ceph", site))
    ids = {
        "in": env.manifest("in", [disk("d", size="16MiB")]),
        "out": env.manifest("out", [rdisk("d", size="16MiB", template="ext4", label="k")]),
    }
    run_ok(env)
    write_pattern(env.volume(ids["in"], "d"), "raw")
    write_image_pattern(site, f"{ids['out']}_d")
    want = {
        "in": content(env.volume(ids["in"], "d"), "raw", root),
        "out": image_sha(site, f"{ids['out']}_d"),
    }
    env.manifest("in", [rdisk("d", size="16MiB")], instance=ids["in"])
    env.manifest(
        "out",
        [disk("d", backend="qcow2", fmt="qcow2", size="16MiB", template="ext4", label="k")],
        instance=ids["out"],
    )
    return env, ids, want


def read_at(env: Env, site: RbdSite, pool: str, volume: str, fmt: str, tmp: Path) -> str:
    if pool == "ceph":
        return image_sha(site, volume)
    return content(env.pool_dir(pool) / volume, fmt, tmp)


def exists(env: Env, site: RbdSite, pool: str, volume: str) -> bool:
    if pool == "ceph":
        return volume in site.images()
    return (env.pool_dir(pool) / volume).exists()


def check_after_kill(
    env: Env, site: RbdSite, ids: dict[str, str], want: dict[str, str], tmp: Path
) -> None:
    """One record per disk says where its data is (the old volume while the copy is made,
    the copy once switched; two only while the old record waits to be removed after the
    new one was written), and the data there is the disk's."""
    recs = [r for r in local_records(env) + rados_records(site) if r.kind is RecordKind.DISK]
    for name, inst in ids.items():
        mine = [r for r in recs if r.instance == inst]
        if len(mine) == 2:
            (rec,) = [r for r in mine if r.migration is not None]
            assert rec.migration is not None
            assert rec.migration.phase is MigrationPhase.SWITCHED, (name, rec)
            assert {r.key() for r in mine} == {rec.key(), rec.migration.target()}
        else:
            (rec,) = mine
        mig = rec.migration
        if mig is not None and mig.phase is MigrationPhase.SWITCHED:
            assert exists(env, site, mig.pool, mig.volume), (name, rec)
            got = read_at(env, site, mig.pool, mig.volume, mig.format.value, tmp)
        else:
            assert rec.state is RecordState.READY, (name, rec)
            assert exists(env, site, rec.pool, rec.volume), (name, rec)
            got = read_at(env, site, rec.pool, rec.volume, rec.format.value, tmp)
        assert got == want[name], (name, rec)


def check_converged(
    env: Env, site: RbdSite, ids: dict[str, str], want: dict[str, str], tmp: Path
) -> None:
    local, remote = local_records(env), rados_records(site)
    assert all(r.state is RecordState.READY and r.migration is None for r in local + remote)
    disks = {r.instance: r for r in local + remote if r.kind is RecordKind.DISK}
    assert len(disks) == 2 and len([r for r in local + remote if r.kind is RecordKind.DISK]) == 2
    assert (disks[ids["in"]].pool, disks[ids["in"]].backend.value) == ("ceph", "rbd")
    assert (disks[ids["out"]].pool, disks[ids["out"]].format.value) == ("local", "qcow2")
    assert image_sha(site, f"{ids['in']}_d") == want["in"]
    assert content(env.volume(ids["out"], "d"), "qcow2", tmp) == want["out"]
    # Nothing else is left: no half copy, no old volume, no temporary image.
    assert files(env, "local") == {r.volume for r in local}
    assert site.images() == {r.volume for r in remote}
    # The cache entry the rbd disk was cloned from has no reference left.
    s = store(site)
    try:
        for r in remote:
            if r.kind is RecordKind.CACHE:
                assert s.references("ceph", r.volume) == 0, r.volume
                assert s.reference_names("ceph", r.volume) == {}
    finally:
        s.close()


def test_kill_at_every_step_of_migrations_into_and_out_of_rbd(
    pools: Pools, ceph: Ceph, libvirt_uri: str, tmp_path: Path
) -> None:
    with rbd_site(ceph, libvirt_uri) as site:
        env, ids, want = crash_setup(pools, site, tmp_path / "trace")
        steps = env.traced_steps("--jobs", "1")
        names = set(steps)
        assert {"record.migrating", "volume.created", "volume.copied", "volume.verified"} <= names
        assert {"record.switched", "record.moved", "volume.deleted", "record.deleted"} <= names
        check_converged(env, site, ids, want, tmp_path)

    def kill_at(n: int) -> None:
        root = tmp_path / f"kill{n}"
        with rbd_site(ceph, libvirt_uri) as site:
            env, ids, want = crash_setup(pools, site, root)
            res = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(n)})
            assert res.returncode == -9, (
                f"kill point {n} ({steps[n - 1]}):\n{res.stdout}\n{res.stderr}"
            )
            check_after_kill(env, site, ids, want, root)
            res = env.subprocess()
            assert res.returncode == 0, (
                f"kill point {n} ({steps[n - 1]}):\n{res.stdout}\n{res.stderr}"
            )
            check_converged(env, site, ids, want, root)
            assert plan(env)["actions"] == [], n

    # Every boundary (--jobs 1), two at a time: each has its own Ceph pool, dir pool and env.
    at_each(range(1, len(steps) + 1), kill_at)


# -- adopt --------------------------------------------------------------------------------


def adopt(env: Env, inst: str, volume: str, *more: str) -> tuple[int, str]:
    from tests.env import cli

    res = cli(
        *("adopt", "--config", str(env.config_path), "--instance", inst, "--disk", "d"),
        *("--volume", f"ceph/{volume}", "--format", "raw", *more, str(env.manifests)),
    )
    return res.returncode, res.stdout + res.stderr


def test_adopt_an_existing_image_as_raw(pools: Pools, site: RbdSite, tmp_path: Path) -> None:
    import rbd

    env = make_env(pools, tmp_path, ("ceph", site))
    inst = env.manifest("vm", [rdisk("d", size="12MiB")])
    image = f"{inst}_d"
    rbd.RBD().create(site.ioctx, image, 12 * MiB)
    # A guest wrote a qcow2 header (naming a host file as backing) into its raw disk.
    site.write(image, b"QFI\xfb\x00\x00\x00\x03" + bytes(8) + b"/etc/shadow", 0)
    site.write(image, b"\x5a" * 65536, 9 * MiB)
    want = image_sha(site, image, 12 * MiB)

    rc, out = adopt(env, inst, image, "--dry-run")
    assert rc == 0, out
    assert [r for r in rados_records(site) if r.kind is RecordKind.DISK] == []
    rc, out = adopt(env, inst, image)
    assert rc == 0, out
    assert "look like qcow2" in out and "adopted as the declared raw" in out
    (rec,) = [r for r in rados_records(site) if r.kind is RecordKind.DISK]
    assert (rec.volume, rec.format.value, rec.virtual_size, rec.backing) == (
        image,
        "raw",
        12 * MiB,
        None,
    )
    copy = site.metadata(image, RECORD_KEY)
    assert copy is not None and DiskRecord.model_validate_json(copy).volume == image
    assert image_sha(site, image, 12 * MiB) == want  # nothing written into its data
    assert plan(env)["actions"] == []  # the manifest's disk, as found
    rc, out = adopt(env, inst, image)
    assert rc != 0 and "already has a record" in out, out


def test_adopting_a_clone_is_refused(pools: Pools, site: RbdSite, tmp_path: Path) -> None:
    import rbd

    env = make_env(pools, tmp_path, ("ceph", site))
    inst = env.manifest("vm", [rdisk("d", size="8MiB")])
    rbd.RBD().create(site.ioctx, "base", 8 * MiB)
    with rbd.Image(site.ioctx, "base") as img:
        img.create_snap("s")
    rbd.RBD().clone(site.ioctx, "base", "s", site.ioctx, f"{inst}_d")
    rc, out = adopt(env, inst, f"{inst}_d")
    assert rc != 0 and "is a clone of" in out, out
    assert [r for r in rados_records(site) if r.kind is RecordKind.DISK] == []


# -- taking in host files (import) --------------------------------------------------------


def test_take_file_fills_a_new_image_and_never_replaces_one(
    pools: Pools, site: RbdSite, tmp_path: Path
) -> None:
    """A host file's bytes, unchanged, into a new image of the file's size (its holes
    read as zeros); an existing name is refused; a temporary image an interrupted import
    left is swept; a rename never takes a name unless told to replace it; no host path is
    an image; an overlay cannot be pointed into it."""
    import rbd

    env = make_env(pools, tmp_path, ("ceph", site))
    src = tmp_path / "nova-disk"
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40000))  # 1.25 MB
    with open(src, "wb") as f:
        f.write(data)
        f.seek(6 * MiB)  # a hole, then data again, ending mid-chunk
        f.write(data[:12345])
    whole = src.read_bytes()
    with Session(load_config(str(env.config_path))) as s:
        drv = s.managing_drivers()["ceph"]
        drv.claim()
        with drv.lock("imported"):
            drv.take_file(str(src), "imported", keep_source=True)
        assert src.exists()
        assert site.size("imported") == len(whole)
        assert site.read("imported", len(whole)) == whole
        with drv.lock("imported"), pytest.raises(VolumeExists, match="exists"):
            drv.take_file(str(src), "imported", keep_source=False)
        assert src.exists() and site.read("imported", len(whole)) == whole
        with drv.lock("other"):
            drv.take_file(str(src), "other", keep_source=False)
        assert not src.exists()
        assert site.read("other", len(whole)) == whole
        assert not {i for i in site.images() if i.startswith(TEMP_PREFIX)}

        rbd.RBD().create(site.ioctx, "x", MiB)
        site.write("x", b"\x77" * 4096)
        with pytest.raises(VolumeExists, match="not renamed over it"):
            drv.rename_volume("x", "other", replace=False)
        assert site.read("other", len(whole)) == whole
        drv.rename_volume("x", "other", replace=True)  # removes `other` first
        assert "x" not in site.images() and site.read("other", 4096) == b"\x77" * 4096

        rbd.RBD().create(site.ioctx, TEMP_PREFIX + "gone", MiB)  # an interrupted import's
        assert drv.sweep_temp() == [TEMP_PREFIX + "gone"]
        assert TEMP_PREFIX + "gone" not in site.images()

        assert drv.volume_at(str(env.pool_dir("local") / "imported")) is None
        assert drv.volume_at("rbd/imported") is None
        with pytest.raises(ReconcileError, match="overlay"):
            overlays_of(drv).point_overlay_at(str(tmp_path / "x.qcow2"), "_cache_x")


# -- lvm <-> rbd ----------------------------------------------------------------------------


def test_lvm_to_rbd_and_back_keeps_the_data(
    pools: Pools, site: RbdSite, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    """Neither driver's own path covers the other: the LV is read by qemu-img (through
    the lvm driver's qemu_image) into raw for python-rbd, and the image's local raw export
    is written into the LV by qemu-img."""
    env = make_lvm_env(pools, tmp_path, lvm_vg)
    env.extra_pools = {"ceph": site.pool_config(namespace=NS)}
    env.host = HOST
    env.write_config()
    try:
        inst = env.manifest("vm", [disk("d", backend="lvm", pool="vg", size="16MiB")])
        run_ok(env)
        lv = f"{inst}_d"
        for i, off in enumerate(PATTERN):
            lvm_vg.write_lv(lv, off, bytes([0x11 + i]) * 65536)
        want = sha(lvm_vg.segment_bytes(lv, SIZE))

        migrate_once(env, "vm", inst, rdisk("d", size="16MiB"))
        run_ok(env)
        assert lv not in lvm_vg.lvs() and image_sha(site, lv) == want
        check_rbd_disk(site, lv)

        migrate_once(env, "vm", inst, disk("d", backend="lvm", pool="vg", size="16MiB"))
        run_ok(env)
        assert lv not in site.images() and sha(lvm_vg.segment_bytes(lv, SIZE)) == want
        assert plan(env)["actions"] == []
    finally:
        lvm_vg.reset()


# -- encryption (model/keying.py) ------------------------------------------------------


def test_encryption_changes_into_and_within_rbd(
    pools: Pools, site: RbdSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one key directory for both pools on one daemon: a raw LUKS file -> rbd is
    copied as it is (keep); a plain image -> luks (a new key); a LUKS file -> a plain
    image, read with its key from the directory (decrypt), its secret and key erased."""
    spy = KeySpy(monkeypatch)
    env = make_env(pools, tmp_path, ("ceph", site))
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    lp, _ = env.pools["local"]
    env.extra_pools["local"] = {
        "uri": env.uri, "libvirtPool": lp, "backends": ["flat", "qcow2"],
        "keys": {"directory": str(key_dir)},
    }  # fmt: skip
    env.extra_pools["ceph"]["keys"] = {"directory": str(key_dir)}
    env.write_config()
    size = 8 * MiB
    inst = env.manifest(
        "vm",
        [
            encrypted(disk("k", size="8MiB")),
            rdisk("n", size="8MiB"),
            encrypted(disk("x", size="8MiB", template="ext4", label="dec")),
        ],
    )
    rc, out, err = env.run()  # in this process: the spy sees the keys
    assert rc == 0, out + err
    before = {r.disk: r for r in local_records(env) if r.instance == inst}
    k_bytes = env.volume(inst, "k").read_bytes()
    write_image_pattern(site, f"{inst}_n")
    n_want = site.read(f"{inst}_n", size)
    x_old = before["x"].encryption
    assert x_old is not None
    x_want = decrypted(env.volume(inst, "x"), before["x"], spy.keys[x_old.secret], tmp_path)

    env.manifest(
        "vm",
        [
            encrypted(rdisk("k", size="8MiB")),
            encrypted(rdisk("n", size="8MiB")),
            rdisk("x", size="8MiB", template="ext4", label="dec"),
        ],
        instance=inst,
    )
    p = plan(env)
    assert not p["errors"], p["errors"]
    reasons = {a["disk"]: a["reason"] for a in p["actions"]}
    assert "key (keep)" in reasons["k"] and "key (new)" in reasons["n"], reasons
    assert "key (decrypt)" in reasons["x"], reasons
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert plan(env)["actions"] == []

    recs = {r.disk: r for r in rados_records(site) if r.instance == inst}
    assert recs["k"].encryption == before["k"].encryption  # kept: the same secret
    assert site.read(f"{inst}_k", len(k_bytes)) == k_bytes
    n = recs["n"]
    assert n.encryption is not None and n.migration is None
    at_rest = site.read(f"{inst}_n", site.size(f"{inst}_n"))
    assert at_rest[:6] == b"LUKS\xba\xbe" and n_want[:65536] not in at_rest
    (tmp_path / "n.img").write_bytes(at_rest)
    assert (
        decrypted(tmp_path / "n.img", n, spy.keys[n.encryption.secret], tmp_path)[:size] == n_want
    )
    assert recs["x"].encryption is None
    assert site.read(f"{inst}_x", size) == x_want[:size]
    assert not (key_dir / x_old.secret).exists()
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(
        [n.encryption.secret, recs["k"].encryption.secret]  # type: ignore[union-attr]
    )
    assert not [i for i in site.images() if i.startswith(inst) and "+" in i]
