"""LVM throughput: 100 disks (LVs) from one cached image, against a bare lvcreate + copy loop.

    .venv/bin/python bench/lvm.py [--disks 100] [--jobs 4] [--image-mib 16] [--disk-mib 32]

In one run, on a private VG over a loop device on a sparse file in --pv-dir (default
/dev/shm; tests/conftest_lvm.py's VG, named apart from the tests' one) and a private
libvirtd (both made and removed here), activation off (this kernel has no device-mapper:
LVs' bytes are reached through their segment maps):
  reconciler  `reconcile --jobs N` applying 100 manifests of one lvm disk each, made from
              an image whose cache entry LV already exists (made by a first run, outside
              the timing): per disk its record written before and after, its lock, the
              lvcreate with its back-pointer tag, the copy of the entry's bytes, the
              record copy tags; planning and observation included;
  baseline    the same 100 LVs in a bare loop: `lvcreate -an -Zn -Wn` with the same
              confinement flags, `lvs --segments` for its extents, and the same byte copy
              (drivers/flows/copy.py's raw_copy into an LV: the entry's bytes, then
              zeros) from an identical entry LV, each fsync'ed.
The two run in ABBA order (half the reconciler's disks, half the baseline's, the other half
of the baseline's, the reconciler's other half), so the host's changing load weighs on
both alike. Target (issue 27): reconciler throughput >= 1.2x the baseline's (the bare
loop is sequential; the reconciler runs 3 LVM commands per disk against its 2). Printed,
not asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RECONCILE, ROOT, start_daemon, stop_daemon, timed
from reconciler.commands.plan import DEFAULT_JOBS
from reconciler.drivers.flows.copy import raw_copy
from reconciler.drivers.lvm.tools import LvData, Lvm, PiecesSink, PiecesSource, read_all
from reconciler.schema.config import LvmConfig
from tests.conftest_lvm import make_vg, not_available

MiB = 1 << 20
TARGET_RATIO = 1.2


def manifest(d: Path, i: int, disk_size: int) -> None:
    doc = {
        "apiVersion": "reconciler/v1",
        "kind": "InstanceStorage",
        "instance": str(uuid.UUID(int=i + 1)),
        "disks": [
            {
                "name": "root",
                "backend": "lvm",
                "pool": "bench",
                "format": "raw",
                "size": disk_size,
                "source": {"image": "img"},
            }
        ],
    }
    (d / f"vm{i:05d}.yaml").write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    ap.add_argument("--image-mib", type=int, default=16)
    ap.add_argument("--disk-mib", type=int, default=32)
    ap.add_argument(
        "--pv-dir",
        default="/dev/shm",
        help="where the PV's sparse file lives (default /dev/shm: in RAM, so the figure is "
        "the reconciler's own cost rather than the host disk's fsync time, which varies "
        "with other load by more than the difference measured; /tmp puts it on disk)",
    )
    args = ap.parse_args()
    why = not_available()
    if why:
        sys.exit(f"bench: {why}")
    n, disk_size = args.disks, args.disk_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="rcl-lvmbench-", dir="/tmp"))
    vg_name = "rclbench" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
    pv_size = (2 * n + 8) * disk_size + (1 << 30)
    daemon = work / "d"
    pv_dir: Path | None = None
    try:
        pv_dir = Path(tempfile.mkdtemp(prefix="rcl-lvmbench-pv-", dir=args.pv_dir))
        with make_vg(pv_dir, vg_name, pv_size) as vg:
            os.environ["LVM_SYSTEM_DIR"] = str(vg.sysdir)
            uri = start_daemon(daemon).replace("storage+unix://", "qemu+unix://", 1)
            conn = libvirt.open(uri)
            conn.storagePoolDefineXML(
                f"<pool type='logical'><name>bench</name><source><name>{vg.vg}</name>"
                f"<format type='lvm2'/></source><target><path>/dev/{vg.vg}</path></target></pool>"
            )
            conn.close()

            image = work / "image.raw"
            block = hashlib.sha256(b"bench").digest() * (MiB // 32)
            image.write_bytes(block * args.image_mib)
            data = image.read_bytes()
            section = vg.section()
            config = {
                "apiVersion": "reconciler/v1",
                "kind": "Config",
                "state": {"dir": str(work / "state")},
                "pools": {
                    "bench": {
                        "uri": uri,
                        "libvirtPool": "bench",
                        "backends": ["lvm"],
                        "lvm": section,
                    }
                },
                "images": {
                    "img": {
                        "location": f"file://{image}",
                        "format": "raw",
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                    }
                },
            }
            cfg = work / "config.yaml"
            cfg.write_text(json.dumps(config))
            mdir = work / "manifests"
            mdir.mkdir()
            # The cache entry (and one disk), outside the timing; the baseline's identical
            # entry LV likewise.
            manifest(mdir, n, disk_size)
            timed([str(RECONCILE), "--config", str(cfg), str(mdir)])
            lvm = Lvm("bench", LvmConfig.model_validate(section))
            opened = LvData(lvm)
            lvm.run(
                "lvcreate", "-an", "-Zn", "-Wn", "-L", f"{len(data)}b", "-n", "bare_entry", vg.vg
            )
            with opened.open("bare_entry", len(data), write=True) as pieces:
                sink = PiecesSink(pieces, "bare_entry")
                sink.write(data, 0)
                sink.finish()

            def reconciler(first: int, last: int) -> float:
                for i in range(first, last):
                    manifest(mdir, i, disk_size)
                took, out = timed(
                    [str(RECONCILE), "--config", str(cfg), "--jobs", str(args.jobs), str(mdir)]
                )
                made = out.count("\ncreated ")
                if made != last - first:
                    sys.exit(f"bench: the reconciler made {made} disks, not {last - first}")
                return took

            def bare(first: int, last: int) -> float:
                t = time.perf_counter()
                for i in range(first, last):
                    name = f"bare_{i:05d}"
                    lvm.run(
                        "lvcreate", "-an", "-Zn", "-Wn", "-L", f"{disk_size}b", "-n", name, vg.vg
                    )
                    sizes = {"bare_entry": len(data), name: None}
                    with opened.open_many(sizes, write=True) as maps:
                        raw_copy(
                            PiecesSource(maps["bare_entry"], "bare_entry", len(data)),
                            PiecesSink(maps[name], name),
                        )
                return time.perf_counter() - t

            # ABBA: each side makes half the disks before and half after the other's, so
            # a change of the host's load during the run weighs on both alike.
            half = n // 2
            rec_a = reconciler(0, half)
            bare_a = bare(0, half)
            bare_b = bare(half, n)
            rec_b = reconciler(half, n)
            rec_s, bare_s = rec_a + rec_b, bare_a + bare_b
            noop_s, _ = timed([str(RECONCILE), "--config", str(cfg), str(mdir)])

            # Every disk holds the image, then zeros (checked outside the timing).
            want = data + bytes(disk_size - len(data))
            for i in range(0, n, max(1, n // 10)):
                lv = f"{uuid.UUID(int=i + 1)}_root"
                with opened.open(lv, disk_size, write=False) as pieces:
                    if read_all(pieces) != want:
                        sys.exit(f"bench: {lv} does not hold the image's bytes")

            ratio = (n / rec_s) / (n / bare_s)
            print(
                f"{n} disks of {args.disk_mib} MiB from a {args.image_mib} MiB image, "
                f"PV in {args.pv_dir}"
            )
            print(f"{'':<28}{'seconds':>10}{'disks/s':>10}")
            label = f"reconciler --jobs {args.jobs}"
            print(f"{label:<28}{rec_s:>10.2f}{n / rec_s:>10.1f}")
            print(f"{'bare lvcreate + copy':<28}{bare_s:>10.2f}{n / bare_s:>10.1f}")
            print(f"{'reconciler no-op re-run':<28}{noop_s:>10.2f}   (a fixed cost of each run)")
            print(
                f"each half alone (the same disks on both sides): {bare_a / rec_a:.2f}x, "
                f"{bare_b / rec_b:.2f}x"
            )
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
            print(
                f"target: throughput against bare lvcreate + copy: {ratio:.2f}x "
                f"(want >= {TARGET_RATIO:.1f}x) -> {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}"
            )
    finally:
        stop_daemon(daemon)
        shutil.rmtree(work, ignore_errors=True)
        if pv_dir is not None:
            shutil.rmtree(pv_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
