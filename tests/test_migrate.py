"""Migrating disks between layouts on a real libvirtd, with real qemu-img: the data is the
same after every pair (flat <-> qcow2 in one pool, a qcow2 overlay flattened, one dir pool
to another, ploop out), the old volume goes (or stays, with deletionPolicy Retain), a
domain that uses the disk stops it, and the dry run shows exactly what apply does."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.ingest.headers import file_header_format
from reconciler.model.naming import migration_name, retained_name
from reconciler.model.record import DiskRecord, RecordKind
from tests.conftest import Pools
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd

QEMU_FMT = {"raw": "raw", "qcow2": "qcow2", "ploop": "parallels"}
FILLER = 24  # other disks, so that a plan's deletions stay within the safety limit


def two_pools(pools: Pools, tmp_path: Path) -> Env:
    local = pools.make(tmp_path / "local")
    fast = pools.make(tmp_path / "fast")
    env = Env(
        tmp_path / "env",
        local.uri,
        {"local": (local.name, local.path), "fast": (fast.name, fast.path)},
        backends=["flat", "qcow2", "ploop"],
    )
    env.write_config()
    return env


def write_pattern(path: Path, fmt: str) -> None:
    """Guest data at a few places (the rest stays sparse), through qemu-io."""
    cmds = []
    for i, off in enumerate((0, 1 << 20, 5 << 20, (8 << 20) - 65536)):
        cmds += ["-c", f"write -P {0x11 + i} {off} 65536"]
    subprocess.run(
        ["qemu-io", "-f", QEMU_FMT[fmt], *cmds, str(path)], check=True, capture_output=True
    )


def content(path: Path, fmt: str, tmp: Path) -> str:
    """sha256 of the disk as the guest sees it (through its recorded format): a raw file's
    bytes as they are (what `qemu-img convert -f raw -O raw` would copy, without the
    process), any other format as qemu-img converts it to raw."""
    if fmt == "raw":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp / f"content-{path.name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", QEMU_FMT[fmt], "-O", "raw", str(path), str(out)],
        check=True,
        capture_output=True,
    )
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def record(env: Env, pool: str, volume: str) -> DiskRecord | None:
    store = env.store()
    try:
        return store.get(pool, volume)
    finally:
        store.close()


def files(env: Env, pool: str) -> set[str]:
    return {p.name for p in env.pool_dir(pool).iterdir() if p.name != ".reconciler"}


def apply_ok(env: Env, *flags: str) -> str:
    rc, out, err = env.run(*flags)
    assert rc == 0, out + err
    return out


def migrate_once(env: Env, name: str, inst: str, new: dict[str, Any]) -> dict[str, Any]:
    env.manifest(name, [new], instance=inst)
    plan = env.plan_json()
    assert not plan["errors"], plan["errors"]
    (action,) = plan["actions"]
    assert action["action"] == "migrate" and not action["destructive"]
    out: dict[str, Any] = action
    return out


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("flat", "raw"), ("qcow2", "qcow2")),
        (("flat", "raw"), ("flat", "qcow2")),
        (("flat", "qcow2"), ("flat", "raw")),
        (("ploop", "ploop"), ("flat", "raw")),
        (("flat", "raw"), ("ploop", "ploop")),
    ],
)
def test_layouts_in_one_pool_keep_the_data(
    pools: Pools, tmp_path: Path, first: tuple[str, str], second: tuple[str, str]
) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", backend=first[0], fmt=first[1], size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, first[1])
    want = content(vol, first[1], tmp_path)
    before = files(env, "local")

    migrate_once(env, "vm", inst, disk("d", backend=second[0], fmt=second[1], size="16MiB"))
    out = apply_ok(env)
    assert f"migrated {inst}/d" in out
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.migration is None and rec.schema_version == 1
    assert (rec.backend.value, rec.format.value) == second
    assert file_header_format(str(vol)) == second[1]  # the file really is the new format
    assert content(vol, second[1], tmp_path) == want
    assert files(env, "local") == before  # no copy, no old volume left
    assert env.plan_json()["actions"] == []  # converged


def test_qcow2_overlay_is_flattened(pools: Pools, tmp_path: Path) -> None:
    """A qcow2 disk over its template's cache entry becomes a flat raw disk with both
    layers' data; the entry stays referenced until the overlay is gone, then is not."""
    env = two_pools(pools, tmp_path)
    spec = {"backend": "qcow2", "fmt": "qcow2", "size": "16MiB", "template": "ext4"}
    inst = env.manifest("vm", [disk("d", label="root", **spec)])
    apply_ok(env)
    vol = env.volume(inst, "d")
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.backing is not None
    entry = rec.backing
    write_pattern(vol, "qcow2")
    want = content(vol, "qcow2", tmp_path)  # the ext4 below and the guest's writes above

    migrate_once(env, "vm", inst, disk("d", size="16MiB", template="ext4", label="root"))
    apply_ok(env)
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.backing is None and rec.format.value == "raw"
    assert content(vol, "raw", tmp_path) == want
    store = env.store()
    assert store.references("local", entry) == 0  # now collectable
    store.close()


@pytest.mark.parametrize(("backend", "fmt"), [("flat", "raw"), ("qcow2", "qcow2")])
def test_one_dir_pool_to_another(pools: Pools, tmp_path: Path, backend: str, fmt: str) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", backend=backend, fmt=fmt, size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, fmt)
    want = content(vol, fmt, tmp_path)

    action = migrate_once(
        env, "vm", inst, disk("d", backend=backend, fmt=fmt, size="16MiB", pool="fast")
    )
    assert action["replaces"] == {"pool": "local", "volume": vol.name}
    apply_ok(env)
    assert not vol.exists()
    assert record(env, "local", vol.name) is None
    moved = env.volume(inst, "d", "fast")
    rec = record(env, "fast", moved.name)
    assert rec is not None and rec.pool == "fast" and rec.migration is None
    assert content(moved, fmt, tmp_path) == want
    assert env.plan_json()["actions"] == []


@pytest.mark.parametrize("where", ["data", "hole"])
def test_a_copy_that_differs_is_removed_and_nothing_switched(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A raw file copied to another pool's raw file is compared in this process
    (flows/copy.py files_equal): a copy that reads otherwise than the original, at a byte
    of its data or in one of its holes, is removed, and the disk stays where it was."""
    from reconciler.drivers.file import migrate as file_migrate
    from reconciler.drivers.flows.copy import raw_copy

    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, "raw")
    want = content(vol, "raw", tmp_path)

    def spoiled(src: Any, dst: Any, **kw: Any) -> None:
        raw_copy(src, dst, **kw)
        at = 1 << 20 if where == "data" else 3 << 20  # write_pattern's data, or a hole
        os.pwrite(dst.fd, b"\xee", at)

    monkeypatch.setattr(file_migrate, "raw_copy", spoiled)
    migrate_once(env, "vm", inst, disk("d", size="16MiB", pool="fast"))
    rc, out, err = env.run()
    assert rc == 1 and "differs from the original" in out + err
    assert files(env, "fast") == set()  # the copy is gone
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.migration is None and rec.state.value == "ready"
    assert content(vol, "raw", tmp_path) == want
    monkeypatch.undo()
    apply_ok(env)  # a good copy, next time
    assert not vol.exists() and content(env.volume(inst, "d", "fast"), "raw", tmp_path) == want


def test_a_migration_may_also_grow_the_disk(pools: Pools, tmp_path: Path) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, "raw")
    migrate_once(env, "vm", inst, disk("d", backend="qcow2", fmt="qcow2", size="32MiB"))
    apply_ok(env)
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.virtual_size == 32 << 20
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(vol)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["virtual-size"] == 32 << 20


def test_retain_in_one_pool_keeps_the_old_volume_unmanaged(pools: Pools, tmp_path: Path) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB", policy="Retain")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, "raw")
    want = content(vol, "raw", tmp_path)
    old = record(env, "local", vol.name)
    assert old is not None
    action = migrate_once(
        env, "vm", inst, disk("d", backend="qcow2", fmt="qcow2", size="16MiB", policy="Retain")
    )
    assert "kept" in str(action["reason"])
    out = apply_ok(env)
    kept = env.pool_dir() / retained_name(vol.name, old.generation + 1)
    assert f"kept as local/{kept.name}" in out
    assert content(kept, "raw", tmp_path) == want  # the old disk, as it was
    assert content(vol, "qcow2", tmp_path) == want  # and its copy, now the disk
    assert record(env, "local", kept.name) is None
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [w["code"] for w in plan["warnings"]] == ["unmanaged-volumes"]  # never touched


def test_a_retain_rename_cut_between_link_and_unlink_is_finished(
    pools: Pools, tmp_path: Path
) -> None:
    """Keeping the old volume renames it by link + unlink (never over another volume); a
    run killed between the two, as a SIGKILL of another step under --jobs 4 can, leaves
    both names on the one file. The next run finishes the rename instead of refusing it,
    and a different file at the new name is still refused."""
    old_spec = disk("d", size="16MiB", policy="Retain")
    new_spec = disk("d", backend="qcow2", fmt="qcow2", size="16MiB", policy="Retain")

    def prepared(root: Path) -> tuple[Env, str]:
        env = two_pools(pools, root)
        inst = env.manifest("vm", [old_spec])
        apply_ok(env)
        write_pattern(env.volume(inst, "d"), "raw")
        env.manifest("vm", [new_spec], instance=inst)
        return env, inst

    env, _ = prepared(tmp_path / "trace")
    steps = env.traced_steps("--jobs", "1")
    switched = steps.index("record.switched") + 1

    env, inst = prepared(tmp_path / "cut")
    vol = env.volume(inst, "d")
    want = content(vol, "raw", tmp_path)
    res = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(switched)})
    assert res.returncode == -9, res.stdout + res.stderr
    rec = record(env, "local", vol.name)
    assert rec is not None and rec.migration is not None and rec.migration.retained_as
    kept = env.pool_dir() / rec.migration.retained_as
    kept.hardlink_to(vol)  # the link made, the run killed before the unlink
    out = apply_ok(env)
    assert f"kept as local/{kept.name}" in out
    assert content(kept, "raw", tmp_path) == want
    assert content(vol, "qcow2", tmp_path) == want
    assert kept.stat().st_nlink == 1 and vol.stat().st_ino != kept.stat().st_ino
    assert env.plan_json()["actions"] == []

    from reconciler.drivers.api import VolumeExists
    from reconciler.drivers.file.pool import FilePoolDriver
    from reconciler.drivers.host.libvirt import Connections
    from reconciler.schema.load import load_config

    drv = FilePoolDriver("local", load_config(str(env.config_path)).pools["local"], Connections())
    other = env.pool_dir() / "other"
    other.write_bytes(b"\x42" * 4096)
    with pytest.raises(VolumeExists, match="not renamed over it"):
        drv.rename_volume("other", kept.name, replace=False)
    assert other.read_bytes() == b"\x42" * 4096 and content(kept, "raw", tmp_path) == want


def test_retain_to_another_pool_keeps_the_old_volume(pools: Pools, tmp_path: Path) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB", policy="Retain")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, "raw")
    want = content(vol, "raw", tmp_path)
    migrate_once(env, "vm", inst, disk("d", size="16MiB", pool="fast", policy="Retain"))
    apply_ok(env)
    assert vol.exists() and record(env, "local", vol.name) is None
    assert content(vol, "raw", tmp_path) == want
    assert content(env.volume(inst, "d", "fast"), "raw", tmp_path) == want


def test_a_disk_a_domain_uses_is_not_migrated(pools: Pools, tmp_path: Path) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    conn = libvirt.open(env.uri)
    dom = conn.defineXML(  # a name of its own: other files' tests define domains at once
        f"""<domain type='qemu'><name>guest-{uuid.uuid4().hex[:12]}</name><memory>65536</memory>
        <os><type arch='x86_64'>hvm</type></os><devices>
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{vol}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )
    try:
        env.manifest("vm", [disk("d", size="16MiB", pool="fast")], instance=inst)
        plan = env.plan_json()
        assert plan["actions"] == []
        (err,) = plan["errors"]
        assert err["code"] == "volume-in-use" and "not migrated" in err["message"]
        rc, _out, _ = env.run()
        assert rc == 1 and vol.exists() and files(env, "fast") == set()
    finally:
        dom.undefine()
        conn.close()
    apply_ok(env)
    assert not vol.exists() and env.volume(inst, "d", "fast").exists()


def test_a_domain_defined_while_the_copy_is_made_keeps_the_disk_where_it_is(
    pools: Pools, tmp_path: Path
) -> None:
    """A domain defined while the copy was made (after the check that began the
    migration) stops the move before the record moves: the record stays at the old pool,
    `switched`, no record at the new one, the old volume untouched; the migration is
    finished once the domain is gone."""
    env = two_pools(pools, tmp_path)
    first = env.manifest("first", [disk("d", size="8MiB")])
    second = env.manifest("second", [disk("d", size="8MiB")])
    apply_ok(env)
    # Where a one-disk move pauses after its copy is compared: learnt from the first.
    migrate_once(env, "first", first, disk("d", size="8MiB", pool="fast"))
    steps = env.traced_steps()
    at = steps.index("volume.verified") + 1
    vol = env.volume(second, "d")
    write_pattern(vol, "raw")
    want = content(vol, "raw", tmp_path)
    migrate_once(env, "second", second, disk("d", size="8MiB", pool="fast"))
    flag = tmp_path / "paused"
    p = env.start(env={**os.environ, "RECONCILER_PAUSE_AT": f"{at}:{flag}"})
    conn = libvirt.open(env.uri)
    dom = None
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert time.monotonic() < deadline and p.poll() is None, "the run did not pause"
            time.sleep(0.01)
        dom = conn.defineXML(
            f"""<domain type='qemu'><name>late-{uuid.uuid4().hex[:12]}</name><memory>65536</memory>
            <os><type arch='x86_64'>hvm</type></os><devices>
            <disk type='file' device='disk'><driver name='qemu' type='raw'/>
            <source file='{vol}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
        )
        flag.unlink()
        out, err = p.communicate(timeout=300)
        assert p.returncode == 1, out + err
        assert "Traceback" not in out + err
        assert "it is used by domain(s) late-" in out, out + err
        rec = record(env, "local", vol.name)
        assert rec is not None and rec.migration is not None
        assert rec.migration.phase.value == "switched"
        assert record(env, "fast", vol.name) is None
        assert content(vol, "raw", tmp_path) == want
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if dom is not None:
            dom.undefine()
        conn.close()
    apply_ok(env)
    assert not vol.exists() and record(env, "local", vol.name) is None
    assert content(env.volume(second, "d", "fast"), "raw", tmp_path) == want


def test_a_stranger_where_the_copy_goes_stops_the_migration(pools: Pools, tmp_path: Path) -> None:
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    stranger = env.pool_dir() / migration_name(vol.name)
    stranger.write_bytes(b"someone else's")
    env.manifest("vm", [disk("d", backend="qcow2", fmt="qcow2", size="16MiB")], instance=inst)
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [e["code"] for e in plan["errors"]] == ["unmanaged-volume"]
    assert env.run()[0] == 1
    assert stranger.read_bytes() == b"someone else's"


def test_dry_run_shows_what_apply_does(pools: Pools, tmp_path: Path) -> None:
    """The same state, planned then applied: apply carries out exactly the planned
    actions, and refuses exactly the planned errors."""
    env = two_pools(pools, tmp_path)
    for i in range(FILLER):
        env.manifest(f"filler{i}", [disk("d", size="1MiB")])
    ids = {n: env.manifest(n, [disk("d", size="8MiB")]) for n in ("tier", "fmt", "busy", "shrink")}
    apply_ok(env)
    env.manifest("tier", [disk("d", size="8MiB", pool="fast")], instance=ids["tier"])
    env.manifest("fmt", [disk("d", backend="qcow2", fmt="qcow2", size="8MiB")], instance=ids["fmt"])
    env.manifest(
        "shrink",
        [disk("d", backend="qcow2", fmt="qcow2", size="4MiB")],
        instance=ids["shrink"],
    )
    conn = libvirt.open(env.uri)
    busy = env.volume(ids["busy"], "d")
    dom = conn.defineXML(
        f"""<domain type='qemu'><name>busy-{uuid.uuid4().hex[:12]}</name><memory>65536</memory>
        <os><type arch='x86_64'>hvm</type></os><devices>
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{busy}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )
    try:
        env.manifest("busy", [disk("d", size="8MiB", pool="fast")], instance=ids["busy"])
        plan = env.plan_json()
        planned = sorted((a["action"], a["instance"]) for a in plan["actions"])
        assert planned == sorted([("migrate", ids["tier"]), ("migrate", ids["fmt"])])
        errors = sorted((e["code"], e["instance"]) for e in plan["errors"])
        assert errors == sorted([("volume-in-use", ids["busy"]), ("shrink-refused", ids["shrink"])])
        rc, out, err = env.run()
        assert rc == 1, out + err  # errors make apply exit 1 after doing the rest
        done = sorted(
            line.split()[1].split("/")[0]
            for line in out.splitlines()
            if line.startswith("migrated")
        )
        assert done == sorted([ids["tier"], ids["fmt"]])
        for code, _ in errors:
            assert f"[{code}]" in out + err
        again = env.plan_json()
        assert sorted((e["code"], e["instance"]) for e in again["errors"]) == errors
        assert again["actions"] == []
    finally:
        dom.undefine()
        conn.close()


def test_old_records_without_migration_fields_are_read(pools: Pools, tmp_path: Path) -> None:
    """A version-1 record as an earlier release wrote it (no `migration` key) is read and
    migrated; the disk's record is version 1 again afterwards."""
    env = two_pools(pools, tmp_path)
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    apply_ok(env)
    vol = env.volume(inst, "d")
    store = env.store()
    rec = store.get("local", vol.name)
    assert rec is not None
    raw = json.loads(rec.model_dump_json())
    del raw["migration"]
    store.put_raw("local", vol.name, rec.generation, json.dumps(raw), instance=inst)
    store.close()
    migrate_once(env, "vm", inst, disk("d", size="8MiB", pool="fast"))
    apply_ok(env)
    new = record(env, "fast", vol.name)
    assert new is not None and new.kind is RecordKind.DISK and new.schema_version == 1


def test_ranges_the_kernel_will_not_copy_are_copied_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from reconciler.drivers.flows import copy as flowcopy

    def refuse(*_: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    dst.write_bytes(b"")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        flowcopy.copy_range(s.fileno(), d.fileno(), 4096, len(data), "src")
    assert dst.read_bytes()[4096:] == data[4096:]


def test_every_copied_range_has_its_write_back_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's write-back is started range by range as it is copied (so its fsync has
    less to wait for); where libc has no sync_file_range the copy is made all the same."""
    import os

    from reconciler.drivers.flows import copy as flowcopy

    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    started: list[tuple[int, int]] = []
    real = flowcopy.start_writeback

    def recording(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(flowcopy, "start_writeback", recording)
    dst.write_bytes(b"")
    with open(src, "rb") as s, open(dst, "r+b") as d:
        flowcopy.copy_range(s.fileno(), d.fileno(), 4096, len(data), "src")
    assert dst.read_bytes()[4096:] == data[4096:]
    at = 4096
    for offset, length in started:  # contiguous, covering exactly what was copied
        assert offset == at and length > 0
        at += length
    assert at == len(data)

    monkeypatch.setattr(flowcopy, "start_writeback", real)
    monkeypatch.setattr(flowcopy, "_sync_file_range", lambda: None)
    dst.write_bytes(b"")
    with open(src, "rb") as s, open(dst, "r+b") as d:
        flowcopy.copy_range(s.fileno(), d.fileno(), 0, len(data), "src")
    assert dst.read_bytes() == data


def test_a_removed_volume_is_forgotten_by_libvirt_even_if_a_refresh_races_it(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume is unlinked here and then deleted through libvirt, which finds the file
    gone and forgets the volume: libvirt lists it no more (without a refresh) and a volume
    of the same name can be made at once. A pool refresh between the two (another step's)
    makes libvirt forget it first; the removal still succeeds."""
    import os

    from reconciler.drivers.file.pool import FilePoolDriver
    from reconciler.drivers.host.libvirt import Connections
    from reconciler.schema.load import load_config

    env = two_pools(pools, tmp_path)
    a, b = (
        env.manifest("a", [disk("d", size="16MiB")]),
        env.manifest("b", [disk("d", size="16MiB")]),
    )
    apply_ok(env)
    drv = FilePoolDriver("local", load_config(str(env.config_path)).pools["local"], Connections())
    conn = libvirt.open(env.uri)
    try:
        pool = conn.storagePoolLookupByName(env.pools["local"][0])
        pool.refresh(0)

        def listed() -> set[str]:  # what libvirt lists, without a refresh
            return {v.name() for v in pool.listAllVolumes(0)}

        va, vb = env.volume(a, "d"), env.volume(b, "d")
        assert {va.name, vb.name} <= listed()

        drv.delete_volume(va.name)
        assert not va.exists() and va.name not in listed()
        pool.createXML(
            f"<volume><name>{va.name}</name><capacity>4096</capacity>"
            "<target><format type='raw'/></target></volume>",
            0,
        )
        assert va.exists()

        real_unlink = os.unlink

        def unlink_then_refresh(path: Any, *args: Any, **kwargs: Any) -> None:
            real_unlink(path, *args, **kwargs)
            if str(path) == str(vb):
                pool.refresh(0)  # as another step's refresh would, in between

        monkeypatch.setattr(os, "unlink", unlink_then_refresh)
        drv.delete_volume(vb.name)
        monkeypatch.undo()
        assert not vb.exists() and vb.name not in listed()
    finally:
        conn.close()


def test_a_tombstone_mid_migration_removes_the_disk_and_its_copy(
    pools: Pools, tmp_path: Path
) -> None:
    env = two_pools(pools, tmp_path)
    for i in range(FILLER):
        env.manifest(f"filler{i}", [disk("d", size="1MiB")])
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    apply_ok(env)
    env.manifest("vm", [disk("d", size="8MiB", pool="fast")], instance=inst)
    probe = two_pools(pools, tmp_path / "probe")  # the same run elsewhere, to count steps
    probe_inst = probe.manifest("vm", [disk("d", size="8MiB")])
    apply_ok(probe)
    probe.manifest("vm", [disk("d", size="8MiB", pool="fast")], instance=probe_inst)
    steps = probe.traced_steps()
    at = steps.index("volume.copied") + 1
    res = env.subprocess(env={"RECONCILER_CRASH_AT": str(at)})
    assert res.returncode == -9
    rec = record(env, "local", f"{inst}_d")
    assert rec is not None and rec.migration is not None  # stopped mid-copy
    assert env.volume(inst, "d", "fast").exists()  # the partial copy
    env.manifest("vm", [], instance=inst, deleted=True)
    apply_ok(env)
    assert not env.volume(inst, "d").exists() and not env.volume(inst, "d", "fast").exists()
    assert record(env, "local", f"{inst}_d") is None
