"""A real guest boots on the private libvirtd (TCG) from hand-written disk XML and reports
what it saw on each disk (tests/guest.py): the image's bytes on its root disk, an ext4
label, and a raw disk into which it wrote a qcow2 header that names a host file. The raw
disk stays raw for qemu when the XML says so: a second boot reads the header as the raw
disk's own bytes, at the disk's own size. Also the same boot from an rbd image."""

from __future__ import annotations

import glob
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import DirPool, Pools
from tests.conftest_ceph import Ceph, unique
from tests.guest import GuestImage, boot, escape, file_disk_xml
from tests.rbdsite import rbd_site

pytestmark = pytest.mark.libvirtd

MiB = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_guest_reports_its_disks_and_a_scribbled_raw_disk_stays_raw(
    guest_image: GuestImage, pools: Pools, dir_pool: DirPool
) -> None:
    root = dir_pool.path / "root.img"
    root.write_bytes(guest_image.path.read_bytes())
    eph = sparse(dir_pool.path / "eph.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "eph0", str(eph)], check=True)
    scribble = sparse(dir_pool.path / "scribble.img", 8 * MiB)
    pool = pools.conn.storagePoolLookupByName(dir_pool.name)
    pool.refresh(0)
    assert sorted(pool.listVolumes()) == ["eph.img", "root.img", "scribble.img"]

    disks = [
        file_disk_xml(root, "vda", "root"),
        file_disk_xml(eph, "vdb", "eph"),
        file_disk_xml(scribble, "vdc", "scribble"),
    ]
    name = f"guest-{uuid.uuid4().hex[:8]}"
    first = boot(pools.conn, disks, name=name)
    assert first.errors == [], first.console
    assert [d.serial for d in first.disks] == ["root", "eph", "scribble"], first.console
    r = first.disk("root")
    assert (r.dev, r.size, r.sha256) == ("vda", guest_image.size, guest_image.sha256)
    assert r.vfatlabel == guest_image.label and r.ext4label is None and not r.swap
    e = first.disk("eph")
    assert (e.size, e.ext4label, e.vfatlabel, e.swap) == (64 * MiB, "eph0", None, False)
    s = first.disk("scribble")
    assert (s.size, s.magic) == (8 * MiB, "00" * 8)
    assert first.scribbled == ["vdc"]

    # The guest's write reached the file: a qcow2 header naming a host file.
    head = scribble.read_bytes()[: 64 * 1024]
    assert head.startswith(QCOW2_MAGIC)
    assert guest_image.header_backing.encode() in head
    # libvirt now probes the raw file as qcow2 (what a reconciler must never believe) ...
    pool.refresh(0)
    assert "<format type='qcow2'/>" in pool.storageVolLookupByName("scribble.img").XMLDesc(0)

    # ... while the domain XML saying raw keeps it raw: the guest boots again and reads the
    # header as the disk's own bytes, at the file's size (not the header's 1 MiB).
    second = boot(pools.conn, disks, name=name)
    assert second.errors == [], second.console
    s2 = second.disk("scribble")
    assert s2.magic.startswith("514649fb") and s2.size == 8 * MiB, second.console
    assert second.disk("root").sha256 == guest_image.sha256
    assert second.disk("eph").ext4label == "eph0"


def test_a_guest_that_does_not_finish_fails_with_its_console(
    guest_image: GuestImage, pools: Pools, dir_pool: DirPool
) -> None:
    """A root disk that is not the guest (blank) boots nothing: boot() fails at its
    deadline, saying how far the boot got and naming the console, and leaves no domain
    behind."""
    blank = sparse(dir_pool.path / "blank.img", 4 * MiB)
    name = f"guest-{uuid.uuid4().hex[:8]}"
    with pytest.raises(pytest.fail.Exception) as failed:
        boot(pools.conn, [file_disk_xml(blank, "vda", "root")], name=name, timeout=5)
    msg = str(failed.value)
    assert msg.startswith(f"guest {name} did not reach REPORT done within 5 s (nothing booted"), msg
    assert f"{name}.console" in msg and "qemu log" in msg, msg
    assert name not in [d.name() for d in pools.conn.listAllDomains(0)]


@pytest.mark.ceph
def test_guest_boots_from_an_rbd_image(
    guest_image: GuestImage, ceph: Ceph, libvirt_uri: str
) -> None:
    """qemu opens an rbd disk itself (qemu-block-extra), authenticated by the libvirt
    secret holding client.admin's key; the guest reads the imported image's bytes."""
    if not glob.glob("/usr/lib/*/qemu/block-rbd.so"):
        pytest.fail(
            "qemu has no rbd driver: install Debian's qemu-block-extra (scripts/setup.sh does)"
        )
    with rbd_site(ceph, libvirt_uri) as site:
        image = unique("guest")
        subprocess.run(
            [
                "rbd",
                "-c",
                str(ceph.conf),
                "import",
                "--no-progress",
                str(guest_image.path),
                f"{site.pool}/{image}",
            ],
            check=True,
            capture_output=True,
        )
        disk = (
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            f"<source protocol='rbd' name='{escape(site.pool)}/{escape(image)}'>"
            f"<host name='127.0.0.1' port='{ceph.mon_v1_port()}'/></source>"
            f"<auth username='admin'><secret type='ceph' uuid='{site.secret}'/></auth>"
            "<target dev='vda' bus='virtio'/><serial>root</serial></disk>"
        )
        # The domain names the pool, so rbd_site's cleanup would undefine it too.
        report = boot(libvirt_uri, [disk], name=f"guest-{image}")
        r = report.disk("root")
        assert (r.dev, r.size, r.sha256) == ("vda", guest_image.size, guest_image.sha256)
        assert report.errors == []
