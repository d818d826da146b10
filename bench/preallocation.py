"""What each file-pool preallocation costs: a 1 GiB disk's create time and allocated bytes.

    .venv/bin/python bench/preallocation.py [--gib 1] [--rounds 3]

On one private libvirtd (started here), one dir pool per mode (off, metadata, falloc,
full), each serving flat, qcow2 and ploop. A 1 GiB raw image holding 64 MiB of data (the
rest zeros) is cached in each pool first (untimed). Then, per mode and per kind of disk
(flat raw from the image, flat raw blank, qcow2 overlay on the image, qcow2 blank, ploop
from the image, ploop blank), one `reconcile` run makes one new disk of --gib GiB: its
wall time, less the median of a run that makes nothing (start-up, observe, plan), is the
create's cost; the disk's allocated bytes (st_blocks * 512) are what the file system
holds for it. Modes a format cannot take are planned as errors and shown as refused.
Beside them, the bare floor: `qemu-img create -o preallocation=MODE` of the same size and
format, in the same directory. Medians of --rounds; figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RECONCILE, make_pool, start_daemon, stop_daemon

MODES = ("off", "metadata", "falloc", "full")
# kind -> (backend, format, source)
KINDS: dict[str, tuple[str, str, dict[str, str]]] = {
    "raw image": ("flat", "raw", {"image": "base"}),
    "raw blank": ("flat", "raw", {"template": "blank"}),
    "qcow2 overlay": ("qcow2", "qcow2", {"image": "base"}),
    "qcow2 blank": ("qcow2", "qcow2", {"template": "blank"}),
    "ploop image": ("ploop", "ploop", {"image": "base"}),
    "ploop blank": ("ploop", "ploop", {"template": "blank"}),
}
QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "ploop": "parallels"}


def make_image(path: Path, mib: int) -> str:
    """A raw image: 64 MiB of varied data, the rest zeros; its sha256."""
    h = hashlib.sha256()
    block = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(32768))  # 1 MiB
    zero = bytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            data = block if i < 64 else zero
            f.write(data)
            h.update(data)
    return h.hexdigest()


class Pool:
    """One mode's pool, config and manifest directory."""

    def __init__(
        self, work: Path, conn: libvirt.virConnect, uri: str, mode: str, image: dict[str, Any]
    ) -> None:
        self.mode = mode
        self.root = work / mode
        self.dir = self.root / "pool"
        make_pool(conn, f"bench-prealloc-{mode}", self.dir)
        self.manifests = self.root / "manifests"
        self.manifests.mkdir(parents=True)
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "state": {"dir": str(self.root / "state")},
            "pools": {
                "local": {
                    "uri": uri,
                    "libvirtPool": f"bench-prealloc-{mode}",
                    "backends": ["flat", "qcow2", "ploop"],
                    "preallocation": mode,
                }
            },
            "images": {"base": image},
        }
        self.config = self.root / "config.yaml"
        self.config.write_text(json.dumps(cfg))
        self.n = 0

    def add(self, backend: str, fmt: str, source: dict[str, str], size: int) -> Path:
        """A manifest of one new instance with one disk; the volume it names."""
        self.n += 1
        inst = str(uuid.UUID(int=self.n))
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": inst,
            "disks": [
                {
                    "name": "disk",
                    "backend": backend,
                    "pool": "local",
                    "format": fmt,
                    "size": size,
                    "source": source,
                }
            ],
        }
        (self.manifests / f"vm{self.n:04d}.yaml").write_text(json.dumps(doc))
        return self.dir / f"{inst}_disk"

    def drop(self) -> None:
        """Delete the last disk added (a tombstone, applied untimed), to free its space."""
        path = self.manifests / f"vm{self.n:04d}.yaml"
        doc = json.loads(path.read_text())
        doc.pop("disks")
        doc["deleted"] = True
        path.write_text(json.dumps(doc))
        _, rc, out = self.run("--force")
        if rc != 0:
            sys.exit(f"bench: deleting a disk failed:\n{out[-3000:]}")

    def run(self, *flags: str) -> tuple[float, int, str]:
        argv = [str(RECONCILE), "--config", str(self.config), *flags, str(self.manifests)]
        t = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        return time.perf_counter() - t, res.returncode, res.stdout + res.stderr


def bare(work: Path, fmt: str, mode: str, size: int) -> float | None:
    """qemu-img create -o preallocation=MODE of `size` bytes: seconds (None: refused)."""
    path = work / f"bare-{fmt}-{mode}"
    t = time.perf_counter()
    res = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            f"preallocation={mode}",
            str(path),
            str(size),
        ],
        capture_output=True,
        check=False,
    )
    took = time.perf_counter() - t
    path.unlink(missing_ok=True)
    return took if res.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.gib << 30
    work = Path(tempfile.mkdtemp(prefix="rcl-bprealloc-", dir="/var/tmp"))
    daemon = Path(tempfile.mkdtemp(prefix="rcl-bpd-", dir="/tmp"))
    try:
        (work / "images").mkdir()
        img = work / "images" / "base.raw"
        sha = make_image(img, 1024)
        image = {"location": f"file://{img}", "format": "raw", "sha256": sha, "size": 1 << 30}
        uri = start_daemon(daemon)
        conn = libvirt.open(uri)
        results: dict[tuple[str, str], tuple[float, int] | None] = {}
        for mode in MODES:
            pool = Pool(work, conn, uri, mode, image)
            # Fill the cache (untimed) with a disk every mode can make.
            pool.add("qcow2", "qcow2", {"image": "base"}, size)
            took, rc, out = pool.run()
            if rc != 0:
                sys.exit(f"bench: warm-up failed:\n{out[-3000:]}")
            idle = statistics.median(pool.run()[0] for _ in range(3))
            for kind, (backend, fmt, source) in KINDS.items():
                times: list[float] = []
                used = 0
                for _ in range(args.rounds):
                    vol = pool.add(backend, fmt, source, size)
                    took, rc, out = pool.run()
                    if rc != 0:
                        if "preallocation-unsupported" not in out:
                            sys.exit(f"bench: {mode} {kind} failed:\n{out[-3000:]}")
                        times = []
                        (pool.manifests / f"vm{pool.n:04d}.yaml").unlink()
                        break
                    times.append(took - idle)
                    used = os.lstat(vol).st_blocks * 512
                    pool.drop()
                results[(mode, kind)] = (statistics.median(times), used) if times else None
        conn.close()
        floor = {
            (mode, fmt): bare(work, QEMU_FORMAT[fmt], mode, size)
            for mode in MODES
            for fmt in ("raw", "qcow2")
        }
        mib = 1 << 20
        print(
            f"{args.gib} GiB disks; image 1 GiB raw with 64 MiB of data; medians of "
            f"{args.rounds}; create time = run time - a no-op run's"
        )
        print(f"{'mode':9} {'disk':14} {'create s':>9} {'allocated MiB':>14}")
        for (mode, kind), r in results.items():
            if r is None:
                print(f"{mode:9} {kind:14} {'refused (plan error)':>24}")
            else:
                print(f"{mode:9} {kind:14} {r[0]:9.2f} {r[1] / mib:14.1f}")
        print("bare qemu-img create -o preallocation=MODE (same size, same file system):")
        for (mode, fmt), s in floor.items():
            print(f"  {mode:9} {fmt:6} " + ("refused" if s is None else f"{s:.2f} s"))
    finally:
        stop_daemon(daemon)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(daemon, ignore_errors=True)


if __name__ == "__main__":
    main()
