"""Migration throughput: 20 disks of 1 GiB (mostly sparse) moved from one dir pool to
another, against bare qemu-img convert doing the same copies.

    .venv/bin/python bench/migrate.py [--disks 20] [--jobs 4]

In one run, on one private libvirtd (started and stopped here):
  reconciler  `reconcile --jobs N` (default 4, as the CLI's) after the manifests' pool
              changed from `slow` to `fast`: each disk's record written as migrating, the
              copy made (raw to raw: copy_file_range over the data extents), synced,
              compared with the original (qemu-img compare, both formats named), the
              record switched and the old volume removed; the whole process timed.
  baseline    bare `qemu-img convert -f raw -O raw -S 4k` of an identical set of disks
              (same sizes, same data at the same offsets, written the same way just
              before), N at a time like the reconciler: the copies alone, unverified.
  info        the same copies fsync'ed; and the whole move by hand (convert, fsync,
              qemu-img compare, the old volume removed); and a no-op reconcile run, the
              fixed cost of a process (Python start-up and imports, config, observing).
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
from bench.common import RECONCILE, make_pool, start_daemon, stop_daemon, timed
from reconciler.cli import DEFAULT_JOBS

SIZE = 1 << 30
# Data per disk: 16 runs of 1 MiB spread over the disk (mostly sparse, as most are).
RUNS = 16
RUN = 1 << 20


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
        timed(cmd)  # the disks, made blank (sparse), outside the timing
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

        os.sync()  # no dirty page of an earlier phase is written back in this one
        t = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(bare, [d.name for d in disks]))
        bare_s = time.perf_counter() - t

        # Informational, measured after the timed baseline: the same copies made durable
        # (each fsync'ed, as a migration's copy must be before its old volume goes), and
        # the whole verified move by hand: convert, fsync, `qemu-img compare`, and the old
        # volume removed (a third identical set stands for the old volumes).
        gone = work / "bare-old"
        gone.mkdir()
        for i, d in enumerate(disks):
            with open(gone / d.name, "wb") as f:
                f.truncate(SIZE)
            fill(gone / d.name, i, args.data_mib)

        def by_hand(name: str, out: Path, verify: bool) -> None:
            bare_out = out / name
            subprocess.run(
                [
                    *("qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "4k"),
                    *(str(bare_src / name), str(bare_out)),
                ],
                check=True,
            )
            fd = os.open(bare_out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if verify:
                subprocess.run(
                    [
                        *("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw"),
                        *(str(bare_src / name), str(bare_out)),
                    ],
                    check=True,
                )
                os.unlink(gone / name)

        def timed_by_hand(verify: bool) -> float:
            out = work / ("bare-verified" if verify else "bare-durable")
            out.mkdir()
            os.sync()  # no dirty page of an earlier phase is written back in this one
            t = time.perf_counter()
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda name: by_hand(name, out, verify), [d.name for d in disks]))
            took = time.perf_counter() - t
            shutil.rmtree(out)
            return took

        durable_s = timed_by_hand(False)
        verified_s = timed_by_hand(True)
        # The reconciler's fixed cost: a process that plans these manifests and finds
        # nothing to do (startup, loading, observing), measured beside the migration.
        os.sync()  # no dirty page of an earlier phase is written back in this one
        noop_s, _ = timed(cmd)

        write_manifests(manifests, n, "fast")
        os.sync()  # no dirty page of an earlier phase is written back in this one
        rec_s, out = timed(cmd)
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
        print(f"{'':<38}{'seconds':>10}{'GiB/s (virtual)':>17}")
        print(
            f"{'reconciler migrate (copy+verify)':<38}{rec_s:>10.2f}{total / rec_s / 2**30:>17.2f}"
        )
        print(f"{'bare qemu-img convert':<38}{bare_s:>10.2f}{total / bare_s / 2**30:>17.2f}")
        print(
            f"{'bare convert + fsync (info)':<38}{durable_s:>10.2f}"
            f"{total / durable_s / 2**30:>17.2f}"
        )
        print(
            f"{'bare convert+fsync+compare+rm (info)':<38}{verified_s:>10.2f}"
            f"{total / verified_s / 2**30:>17.2f}"
        )
        print(f"{'reconcile no-op run (info)':<38}{noop_s:>10.2f}")
        print(
            f"target: migrate throughput against bare qemu-img convert: {ratio:.2f}x "
            f"(want >= 0.80x) -> {'PASS' if ratio >= 0.8 else 'FAIL'}"
        )
    finally:
        if args.keep:
            print(f"kept: {work} (config {work / 'config.yaml'})")
        else:
            stop_daemon(daemon)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
