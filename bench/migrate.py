"""Migration throughput: 20 disks of 1 GiB (mostly sparse) moved from one dir pool to
another, against bare qemu-img convert doing the same copies.

    .venv/bin/python bench/migrate.py [--disks 20] [--jobs 4]

In one run, on one private libvirtd (started and stopped here):
  reconciler  `reconcile --jobs N` (default 4, as the CLI's) after the manifests' pool
              changed from `slow` to `fast`: each disk's record written as migrating, the
              copy made (qemu-img convert, both formats named), synced, compared with the
              original (qemu-img compare), the record switched and the old volume removed;
              planning and observation included.
  baseline    bare `qemu-img convert -f raw -O raw -S 4k` of an identical set of disks
              (same sizes, same data at the same offsets, written the same way just
              before), N at a time like the reconciler: the copies alone, unverified.
Target (issue 13): reconciler throughput >= 0.8x the baseline's. Printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.cli import DEFAULT_JOBS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "libvirtd.sh"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"
SIZE = 1 << 30
# Data per disk: 16 runs of 1 MiB spread over the disk (mostly sparse, as most are).
RUNS = 16
RUN = 1 << 20


def start_daemon(d: Path) -> str:
    out = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def make_pool(conn: libvirt.virConnect, name: str, path: Path) -> None:
    path.mkdir(parents=True)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    pool.create(0)


def write_manifests(d: Path, n: int, pool: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": str(uuid.UUID(int=i + 1)),
            "disks": [
                {
                    "name": "data",
                    "backend": "flat",
                    "pool": pool,
                    "format": "raw",
                    "size": SIZE,
                    "source": {"template": "blank"},
                }
            ],
        }
        (d / f"vm{i:03d}.yaml").write_text(json.dumps(doc))


def fill(path: Path, seed: int, runs: int) -> None:
    """The same data for disk `seed` of either set: `runs` runs of RUN bytes."""
    with open(path, "r+b") as f:
        for r in range(runs):
            f.seek((SIZE // runs) * r + (seed % 7) * 4096)
            f.write(random.Random(seed * RUNS + r).randbytes(RUN))
        f.flush()
        os.fsync(f.fileno())


def run(argv: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return took, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    ap.add_argument("--data-mib", type=int, default=RUNS, help="MiB of data per disk")
    ap.add_argument("--keep", action="store_true", help="leave the daemon and files (debug)")
    args = ap.parse_args()
    n = args.disks
    work = Path(tempfile.mkdtemp(prefix="rcl-bench-mig-", dir="/tmp"))
    daemon = work / "d"
    try:
        uri = start_daemon(daemon)
        conn = libvirt.open(uri)
        make_pool(conn, "bench-slow", work / "slow")
        make_pool(conn, "bench-fast", work / "fast")
        conn.close()
        config = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "state": {"dir": str(work / "state")},
            "pools": {
                name: {"uri": uri, "libvirtPool": f"bench-{name}", "backends": ["flat"]}
                for name in ("slow", "fast")
            },
        }
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps(config))
        manifests = work / "manifests"
        write_manifests(manifests, n, "slow")
        cmd = [str(RECONCILE), "--config", str(cfg), "--jobs", str(args.jobs), str(manifests)]
        run(cmd)  # the disks, made blank (sparse), outside the timing
        # The baseline's identical set, written the same way just before the timed copies.
        bare_src, bare_dst = work / "bare-src", work / "bare-dst"
        bare_src.mkdir()
        bare_dst.mkdir()
        disks = sorted((work / "slow").glob("*_data"))
        if len(disks) != n:
            sys.exit(f"bench: {len(disks)} disks made, expected {n}")
        for i, d in enumerate(disks):
            fill(d, i, args.data_mib)
            twin = bare_src / d.name
            with open(twin, "wb") as f:
                f.truncate(SIZE)
            fill(twin, i, args.data_mib)

        def bare(name: str) -> None:
            subprocess.run(
                [
                    *("qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "4k"),
                    *(str(bare_src / name), str(bare_dst / name)),
                ],
                check=True,
            )

        t = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(bare, [d.name for d in disks]))
        bare_s = time.perf_counter() - t

        # Informational: the same copies made durable (each fsync'ed), as a migration's
        # copy must be before its old volume goes; measured after the timed baseline.
        durable_dst = work / "bare-durable"
        durable_dst.mkdir()

        def durable(name: str) -> None:
            out = durable_dst / name
            subprocess.run(
                [
                    *("qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "4k"),
                    *(str(bare_src / name), str(out)),
                ],
                check=True,
            )
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        t = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(durable, [d.name for d in disks]))
        durable_s = time.perf_counter() - t
        shutil.rmtree(durable_dst)
        # The reconciler's fixed cost: a process that plans these manifests and finds
        # nothing to do (startup, loading, observing), measured beside the migration.
        noop_s, _ = run(cmd)

        write_manifests(manifests, n, "fast")
        rec_s, out = run(cmd)
        moved = out.count("\nmigrated ")
        if moved != n:
            sys.exit(f"bench: the reconciler migrated {moved} disks, expected {n}:\n{out[-2000:]}")
        left = sorted(p.name for p in (work / "slow").iterdir() if p.name != ".reconciler")
        if left:
            sys.exit(f"bench: old volumes left in pool slow: {left[:5]}")
        for i, d in enumerate(disks):  # the data arrived (spot check: first and last)
            if i in (0, n - 1):
                res = subprocess.run(
                    [
                        *("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw"),
                        *(str(bare_src / d.name), str(work / "fast" / d.name)),
                    ],
                    check=False,
                )
                if res.returncode != 0:
                    sys.exit(f"bench: {d.name} differs after migration")

        total = n * SIZE
        ratio = bare_s / rec_s
        print(
            f"{n} disks of {SIZE >> 30} GiB ({args.data_mib} MiB of data each), --jobs {args.jobs}"
        )
        print(f"{'':<34}{'seconds':>10}{'GiB/s (virtual)':>17}")
        print(
            f"{'reconciler migrate (copy+verify)':<34}{rec_s:>10.2f}{total / rec_s / 2**30:>17.2f}"
        )
        print(f"{'bare qemu-img convert':<34}{bare_s:>10.2f}{total / bare_s / 2**30:>17.2f}")
        print(
            f"{'bare convert + fsync (info)':<34}{durable_s:>10.2f}"
            f"{total / durable_s / 2**30:>17.2f}"
        )
        print(f"{'reconcile no-op run (info)':<34}{noop_s:>10.2f}")
        print(
            f"target: migrate throughput against bare qemu-img convert: {ratio:.2f}x "
            f"(want >= 0.80x) -> {'PASS' if ratio >= 0.8 else 'FAIL'}"
        )
    finally:
        if args.keep:
            print(f"kept: {work} (config {work / 'config.yaml'})")
        else:
            subprocess.run([str(SCRIPT), "stop", str(daemon)], check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
