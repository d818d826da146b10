"""A real guest (TCG) boots from disks the reconciler made, each attached only by the
`<disk>` element `reconcile disks` (or reconciler.client) gives, and reports on its serial
console what it read on each (tests/guest.py): the image's bytes through a flat raw disk,
a qcow2 overlay, a ploop disk and an rbd clone; the labels and signatures of template
disks in every format. A guest writes a qcow2 header naming a host file onto a raw disk;
the element still says raw, the reconciler plans nothing, and the next boot (from the
overlay, by a compute service's override) reads the header as the disk's own bytes.

LVM disks cannot be activated on this kernel (no device-mapper), so no guest boots from
one here: tests/test_attach.py tests their element's shape and libvirt's schema."""

from __future__ import annotations

import json
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.client import Client
from reconciler.schema.manifest import AttachSpec
from tests.conftest_ceph import Ceph
from tests.env import Env, disk
from tests.guest import GuestImage, GuestReport, boot
from tests.rbdsite import RbdSite, rbd_site

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20


def with_serial(d: dict[str, Any]) -> dict[str, Any]:
    """The disk with its name as the serial the guest reports it by."""
    return {**d, "attach": {"serial": d["name"]}}


def catalog(guest_image: GuestImage, tmp_path: Path) -> dict[str, Any]:
    copy = tmp_path / "images" / "guest.raw"  # never the cached image itself
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest_image.path, copy)
    return {
        "location": f"file://{copy}",
        "format": "raw",
        "sha256": guest_image.sha256,
        "size": guest_image.size,
    }


def emitted(env: Env, instance: str) -> list[str]:
    """The instance's `<disk>` elements as `reconcile disks --output json` gives them."""
    rc, out, err = env.main(
        ["disks", "--config", str(env.config_path), "-m", str(env.manifests),
         "--output", "json", instance]
    )  # fmt: skip
    assert rc == 0, err
    return [d["xml"] for d in json.loads(out)[0]["disks"]]


def booted(uri: str, disks: list[str], timings: dict[str, float], what: str) -> GuestReport:
    start = time.monotonic()
    report = boot(uri, disks, name=f"boot-{uuid.uuid4().hex[:8]}")
    timings[what] = time.monotonic() - start
    assert report.done and report.errors == [], report.console
    return report


def test_a_guest_boots_from_file_disks_and_reads_each(
    env: Env, guest_image: GuestImage, tmp_path: Path
) -> None:
    env.backends = ["flat", "qcow2", "ploop"]
    env.images = {"guest": catalog(guest_image, tmp_path)}
    env.write_config()
    inst = env.manifest(
        "vm",
        [
            with_serial(disk("root", image="guest", size="32MiB")),
            with_serial(disk("over", backend="qcow2", fmt="qcow2", image="guest", size="32MiB")),
            with_serial(disk("pl", backend="ploop", fmt="ploop", image="guest", size="32MiB")),
            with_serial(disk("eph", template="ext4", label="eph0", size="32MiB")),
            with_serial(disk("qswap", backend="qcow2", fmt="qcow2", template="swap", size="16MiB")),
            with_serial(
                disk(
                    "plext",
                    backend="ploop",
                    fmt="ploop",
                    template="ext4",
                    label="plext",
                    size="32MiB",
                )
            ),
            with_serial(disk("cfg", fmt="qcow2", template="vfat", label="CFG", size="32MiB")),
            with_serial(disk("scribble", template="blank", size="8MiB")),
        ],
    )
    assert env.run()[0] == 0
    timings: dict[str, float] = {}
    xml = emitted(env, inst)
    formats = [ET.fromstring(x).find("driver").get("type") for x in xml]  # type: ignore[union-attr]
    assert formats == ["raw", "qcow2", "ploop", "raw", "qcow2", "ploop", "qcow2", "raw"]
    first = booted(env.uri, xml, timings, "file disks")
    seen = first.by_serial
    assert sorted(seen) == sorted(
        ["root", "over", "pl", "eph", "qswap", "plext", "cfg", "scribble"]
    )
    assert seen["root"].dev == "vda" and seen["root"].vfatlabel == guest_image.label
    for name in ("root", "over", "pl"):  # the image's bytes, through each format
        assert (seen[name].sha256, seen[name].size) == (guest_image.sha256, 32 * MiB), name
    assert seen["eph"].ext4label == "eph0" and seen["plext"].ext4label == "plext"
    assert seen["qswap"].swap and seen["qswap"].size == 16 * MiB
    assert seen["cfg"].vfatlabel == "CFG"
    assert first.scribbled == [seen["scribble"].dev]

    # The guest wrote a qcow2 header naming a host file onto a raw disk. Its record still
    # says raw: the plan has nothing to do and the element still says raw.
    scribble = env.volume(inst, "scribble")
    assert scribble.read_bytes()[:4] == b"QFI\xfb"
    assert guest_image.header_backing.encode() in scribble.read_bytes()[:4096]
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []
    with Client(str(env.config_path), [str(env.manifests)]) as c:
        # A compute service's overrides: boot from the overlay this time.
        vda = AttachSpec.model_validate({"target": {"dev": "vda"}})
        vdz = AttachSpec.model_validate({"target": {"dev": "vdz"}})
        again = c.disks(inst, {"over": vda, "root": vdz})
    by_name = {d.name: d for d in again}
    assert by_name["scribble"].element.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    second = booted(env.uri, [d.xml for d in again], timings, "file disks, from the overlay")
    seen = second.by_serial
    assert seen["over"].dev == "vda" and seen["over"].vfatlabel == guest_image.label
    s = seen["scribble"]
    assert s.magic.startswith("514649fb") and s.size == 8 * MiB  # read raw, at its own size
    print(f"boot times: {timings}")


def test_a_guest_boots_from_encrypted_disks(
    env: Env, guest_image: GuestImage, tmp_path: Path
) -> None:
    """A guest boots from a flat raw LUKS root and from a qcow2 overlay with LUKS inside
    (over the plain cache entry), attached only by the emitted elements (libvirt hands
    qemu the key from the private secret); what it reads is the image, and what it writes
    onto an encrypted qcow2 is absent from the file at rest and there through the VM."""
    env.images = {"guest": catalog(guest_image, tmp_path)}
    env.write_config()
    luks = {"encryption": {"format": "luks"}}
    inst = env.manifest(
        "crypt",
        [
            with_serial({**disk("root", image="guest", size="32MiB"), **luks}),
            with_serial(
                {**disk("over", backend="qcow2", fmt="qcow2", image="guest", size="32MiB"), **luks}
            ),
            with_serial({**disk("scribble", fmt="qcow2", template="blank", size="8MiB"), **luks}),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    xml = emitted(env, inst)
    assert [ET.fromstring(x).find("source/encryption") is not None for x in xml] == [True] * 3
    # At rest: the image's boot sector (syslinux's, with its label) is not in the volume.
    boot_sector = guest_image.path.read_bytes()[:512]
    root_file = env.volume(inst, "root").read_bytes()
    assert boot_sector[:64] in guest_image.path.read_bytes()
    assert boot_sector[:64] not in root_file and b"SYSLINUX" not in root_file
    timings: dict[str, float] = {}
    first = booted(env.uri, xml, timings, "encrypted disks")
    seen = first.by_serial
    assert seen["root"].dev == "vda" and seen["root"].vfatlabel == guest_image.label
    for name in ("root", "over"):  # the image's bytes, decrypted by qemu
        assert (seen[name].sha256, seen[name].size) == (guest_image.sha256, 32 * MiB), name
    assert first.scribbled == [seen["scribble"].dev]
    # The header the guest wrote (naming a host file) is not in the file at rest...
    scribble = env.volume(inst, "scribble").read_bytes()
    assert guest_image.header_backing.encode() not in scribble
    # ...and is there through the VM.
    second = booted(env.uri, emitted(env, inst), timings, "encrypted disks, again")
    s = second.by_serial["scribble"]
    assert s.magic.startswith("514649fb") and s.size == 8 * MiB
    assert env.plan_json()["actions"] == []
    print(f"boot times: {timings}")


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def test_a_guest_boots_from_rbd_disks_and_reads_each(
    site: RbdSite, guest_image: GuestImage, tmp_path: Path
) -> None:
    env = site.env(tmp_path / "env")
    env.images = {"guest": catalog(guest_image, tmp_path)}
    env.write_config()
    inst = env.manifest(
        "rvm",
        [
            with_serial(disk("root", backend="rbd", pool="ceph", image="guest", size="32MiB")),
            with_serial(
                disk(
                    "eph", backend="rbd", pool="ceph", template="ext4", label="reph0", size="32MiB"
                )
            ),
            with_serial(disk("swap", backend="rbd", pool="ceph", template="swap", size="16MiB")),
        ],
    )
    assert env.run()[0] == 0
    timings: dict[str, float] = {}
    report = booted(site.uri, emitted(env, inst), timings, "rbd disks")
    seen = report.by_serial
    assert seen["root"].dev == "vda"
    assert (seen["root"].sha256, seen["root"].size) == (guest_image.sha256, 32 * MiB)
    assert seen["eph"].ext4label == "reph0" and seen["swap"].swap
    # The root disk is a clone of the pool's cache entry (librbd reads through to it).
    assert site.parent(f"{inst}_root") is not None
    print(f"boot times: {timings}")


def test_a_guest_boots_from_an_encrypted_rbd_root(
    site: RbdSite, guest_image: GuestImage, tmp_path: Path
) -> None:
    """An encrypted rbd disk is a full copy of the image into a LUKS payload (Pacific's
    librbd cannot encrypt a clone): no parent, the image's boot sector absent from its
    bytes at rest, the image's bytes through the VM (libvirt gives qemu the key); an
    encrypted blank disk the guest scribbles on keeps its header only behind the key."""
    env = site.env(tmp_path / "env")
    env.images = {"guest": catalog(guest_image, tmp_path)}
    env.write_config()
    luks = {"encryption": {"format": "luks"}}
    inst = env.manifest(
        "crvm",
        [
            with_serial(
                {**disk("root", backend="rbd", pool="ceph", image="guest", size="32MiB"), **luks}
            ),
            with_serial(
                {
                    **disk("scribble", backend="rbd", pool="ceph", template="blank", size="8MiB"),
                    **luks,
                }
            ),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    xml = emitted(env, inst)
    uuids = [ET.fromstring(x).find("source/encryption/secret").get("uuid") for x in xml]  # type: ignore[union-attr]
    assert site.parent(f"{inst}_root") is None  # a full copy, not a clone
    at_rest = site.read(f"{inst}_root", site.size(f"{inst}_root"))
    assert len(at_rest) == 2068480 + 32 * MiB  # the LUKS header, then the payload
    assert at_rest[:6] == b"LUKS\xba\xbe"
    assert guest_image.path.read_bytes()[:64] not in at_rest and b"SYSLINUX" not in at_rest
    timings: dict[str, float] = {}
    first = booted(site.uri, xml, timings, "encrypted rbd disks")
    seen = first.by_serial
    assert seen["root"].dev == "vda" and seen["root"].vfatlabel == guest_image.label
    assert (seen["root"].sha256, seen["root"].size) == (guest_image.sha256, 32 * MiB)
    assert first.scribbled == [seen["scribble"].dev]
    scribble = site.read(f"{inst}_scribble", site.size(f"{inst}_scribble"))
    assert guest_image.header_backing.encode() not in scribble
    conn = libvirt.open(site.uri)
    secrets = {u: conn.secretLookupByUUIDString(u).XMLDesc(0) for u in uuids}  # not others'
    assert all("private='yes'" in secrets[u] and "rbd:" in secrets[u] for u in uuids)
    # Deleted: the images go, then their secrets.
    env.manifest("crvm", [], instance=inst, deleted=True)
    rc, out, err = env.run("--force")
    assert rc == 0, out + err
    assert not {f"{inst}_root", f"{inst}_scribble"} & site.images()
    left = {s.UUIDString() for s in conn.listAllSecrets(0)} & set(uuids)
    conn.close()
    assert left == set()  # crypto-erased
    print(f"boot times: {timings}")


def test_an_encrypted_rbd_disk_moves_to_a_host_without_its_secret(
    site: RbdSite, guest_image: GuestImage, tmp_path: Path
) -> None:
    """Host A makes an encrypted rbd root with its key also in the pool's key directory
    (config `keys`) and hands the instance over; host B's daemon has no secret for it
    (A undefined its copy when it handed the disk over, as the key directory keeps the
    key): B's take-over defines it from the key directory, and a guest boots from B's
    element and reads the image."""
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    ns = f"crypt{uuid.uuid4().hex[:6]}"

    def host(name: str) -> Env:
        env = site.env(tmp_path / name, namespace=ns)
        env.extra_pools["ceph"]["keys"] = {"directory": str(key_dir)}
        env.host = name
        env.images = {"guest": catalog(guest_image, tmp_path)}
        env.safety = {"maxDeletePercent": 100}
        env.write_config()
        return env

    a, b = host("host-a"), host("host-b")
    root = {**disk("root", backend="rbd", pool="ceph", image="guest", size="32MiB")}
    disks = [with_serial({**root, "encryption": {"format": "luks"}})]
    inst = a.manifest("vm", disks)
    rc, out, err = a.run()
    assert rc == 0, out + err
    (secret,) = [
        ET.fromstring(x).find("source/encryption/secret").get("uuid")  # type: ignore[union-attr]
        for x in emitted(a, inst)
    ]
    assert (key_dir / str(secret)).stat().st_mode & 0o777 == 0o600
    a.remove_manifest("vm")
    rc, out, err = a.run("--prune")
    assert rc == 0 and "handed over" in out, out + err
    conn = libvirt.open(site.uri)
    with pytest.raises(libvirt.libvirtError):  # A gave its copy up: the directory keeps it
        conn.secretLookupByUUIDString(secret)
    b.manifest("vm", disks, instance=inst)
    rc, out, err = b.run()
    assert rc == 0, out + err
    assert conn.secretLookupByUUIDString(secret).UUIDString() == secret  # from the directory
    rc, out, err = b.run()
    assert rc == 0, out + err
    report = booted(site.uri, emitted(b, inst), {}, "encrypted rbd, taken over")
    seen = report.by_serial["root"]
    assert (seen.sha256, seen.size) == (guest_image.sha256, 32 * MiB)
    b.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = b.run("--force")
    assert rc == 0, out + err
    assert list(key_dir.iterdir()) == []
    with pytest.raises(libvirt.libvirtError):
        conn.secretLookupByUUIDString(secret)
    conn.close()
