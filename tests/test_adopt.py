"""`reconcile adopt` on a real libvirtd: the declared format is checked, never inferred; a
backing file outside the pool's own cache, or a data file, is refused; a raw disk whose
guest wrote another format's header is adopted as raw, with a warning; then the manifest
owns the disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.model.record import RecordKind
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd


def adopt(
    env: Env, inst: str, name: str, volume: str, fmt: str, *more: str
) -> tuple[int, str, str]:
    return env.main(
        [
            "adopt",
            "--config",
            str(env.config_path),
            "--instance",
            inst,
            "--disk",
            name,
            "--volume",
            f"local/{volume}",
            "--format",
            fmt,
            *more,
            str(env.manifests),
        ]
    )


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def records(env: Env) -> list[str]:
    store = env.store()
    recs, _ = store.load_all()
    store.close()
    return sorted(r.volume for r in recs if r.kind is RecordKind.DISK)


def test_raw_with_a_guest_written_qcow2_header_is_adopted_as_raw(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    vol = env.volume(inst, "d")
    # A raw disk whose guest wrote, at its start, a qcow2 header naming a host file.
    hostile = tmp_path / "hostile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile), "16M")
    vol.write_bytes(hostile.read_bytes()[:65536].ljust(16 << 20, b"\0"))
    plan = env.plan_json()
    assert plan["actions"] == [] and [e["code"] for e in plan["errors"]] == ["unmanaged-volume"]

    rc, out, err = adopt(env, inst, "d", vol.name, "raw", "--dry-run")
    assert rc == 0, err
    assert "would adopt" in out and records(env) == []

    rc, out, err = adopt(env, inst, "d", vol.name, "raw")
    assert rc == 0, err
    assert "look like qcow2" in err and "adopted as the declared raw" in err
    store = env.store()
    rec = store.get("local", vol.name)
    store.close()
    assert rec is not None and rec.format.value == "raw" and rec.backing is None
    assert rec.virtual_size == 16 << 20  # the file's size, not the header's
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []  # the manifest owns it now
    assert [w["code"] for w in plan["warnings"]] == ["format-mismatch"]
    assert env.run()[0] == 0


def test_qcow2_backed_by_a_host_file_is_refused(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", backend="qcow2", fmt="qcow2", size="16MiB")])
    vol = env.volume(inst, "d")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(vol), "16M")
    rc, _, err = adopt(env, inst, "d", vol.name, "qcow2")
    assert rc == 1 and "not a cache entry of pool local" in err
    assert records(env) == []


def test_qcow2_with_a_data_file_is_refused(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", backend="qcow2", fmt="qcow2", size="16MiB")])
    vol = env.volume(inst, "d")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data'}", str(vol), "16M")
    rc, _, err = adopt(env, inst, "d", vol.name, "qcow2")
    assert rc == 1 and "external data file" in err
    assert records(env) == []


def _overlay_candidate(env: Env) -> tuple[str, Path, str]:
    """A managed qcow2 disk over the pool's ext4 template entry, and an unmanaged volume
    of a second instance to adopt: (instance, its volume, the entry it may be backed by)."""
    made = env.manifest(
        "made", [disk("d", backend="qcow2", fmt="qcow2", size="16MiB", template="ext4")]
    )
    assert env.run()[0] == 0
    store = env.store()
    entry = store.get("local", env.volume(made, "d").name)
    store.close()
    assert entry is not None and entry.backing is not None
    inst = env.manifest(
        "vm", [disk("d", backend="qcow2", fmt="qcow2", size="16MiB", template="ext4")]
    )
    return inst, env.volume(inst, "d"), entry.backing


def test_qcow2_over_the_pools_own_cache_entry_is_adopted(env: Env) -> None:
    inst, vol, entry_name = _overlay_candidate(env)
    backing = env.pool_dir() / entry_name
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(vol), "16M")
    rc, out, err = adopt(env, inst, "d", vol.name, "qcow2")
    assert rc == 0, err
    assert f"backed by cache entry {entry_name}" in out
    store = env.store()
    assert store.references("local", entry_name) == 2  # gc keeps it for both
    store.close()
    assert env.plan_json()["actions"] == []


def test_a_backing_entry_without_backing_format_is_refused(env: Env) -> None:
    inst, vol, entry_name = _overlay_candidate(env)
    # qemu-img refuses -b without -F nowadays: make it with one, then end the header's
    # extension list where the backing format extension is (an old image's header).
    backing = str(env.pool_dir() / entry_name)
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(vol), "16M")
    with open(vol, "r+b") as f:
        head = f.read(65536)
        at = int.from_bytes(head[100:104], "big")  # header_length: extensions follow
        while int.from_bytes(head[at : at + 4], "big") not in (0, 0xE2792ACA):
            at += 8 + (int.from_bytes(head[at + 4 : at + 8], "big") + 7) // 8 * 8
        assert int.from_bytes(head[at : at + 4], "big") == 0xE2792ACA
        f.seek(at)
        f.write(b"\0\0\0\0")
    rc, _, err = adopt(env, inst, "d", vol.name, "qcow2")
    assert rc == 1 and "so it would be probed" in err


def test_names_and_records_are_checked(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    other = env.pool_dir() / "somebodys-disk"
    other.write_bytes(b"\0" * 4096)
    rc, _, err = adopt(env, inst, "d", other.name, "raw")
    assert rc == 1 and "rename it to" in err
    rc, _, err = adopt(env, inst, "nosuch", f"{inst}_nosuch", "raw")
    assert rc == 1 and "write its manifest first" in err
    assert env.run()[0] == 0  # the disk is made
    rc, _, err = adopt(env, inst, "d", env.volume(inst, "d").name, "raw")
    assert rc == 1 and "already has a record" in err
    rc, _, err = adopt(env, inst, "d", env.volume(inst, "d").name, "ploop")
    assert rc == 1 and "--backend" in err
    assert other.read_bytes() == b"\0" * 4096
