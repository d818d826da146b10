"""Apply throughput: 500 qcow2 disks from one template cache entry, against bare libvirt.

    .venv/bin/python bench/apply.py [--disks 500] [--jobs 4]

In one run, on one private libvirtd (started and stopped here):
  reconciler  `reconcile --jobs N` (default 4, as the CLI's) applying 500 manifests'
              qcow2-backend ext4 disks end to end: one
              cache entry made (mkfs, once), then 500 overlays, each with its record written
              before and after, its volume lock, planning and observation included;
  baseline    the same 500 overlays on an identical entry through bare libvirt
              createXML calls in a loop (what the reconciler does, minus everything else);
  no-op       `reconcile` run again right after: it must plan nothing.
Targets (issue "Apply on file pools"): reconciler throughput >= 0.8x the baseline's, no-op
re-run under 1 s. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RECONCILE, SCRIPT, make_pool, start_daemon, timed
from reconciler.commands.plan import DEFAULT_JOBS

SIZE = 256 << 20


def write_manifests(d: Path, n: int) -> None:
    d.mkdir(parents=True)
    for i in range(n):
        inst = str(uuid.UUID(int=i + 1))
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": inst,
            "disks": [
                {
                    "name": "eph0",
                    "backend": "qcow2",
                    "pool": "bench",
                    "format": "qcow2",
                    "size": SIZE,
                    "source": {"template": "ext4", "label": "eph0"},
                }
            ],
        }
        (d / f"vm{i:05d}.yaml").write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    ap.add_argument("--keep", action="store_true", help="leave the daemon and files (debug)")
    args = ap.parse_args()
    n = args.disks
    work = Path(tempfile.mkdtemp(prefix="rcl-bench-", dir="/tmp"))
    daemon = work / "d"
    try:
        uri = start_daemon(daemon)
        conn = libvirt.open(uri)
        make_pool(conn, "bench-rec", work / "rec")
        bare_pool = make_pool(conn, "bench-bare", work / "bare")

        # --- reconciler
        config = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "state": {"dir": str(work / "state")},
            "pools": {"bench": {"uri": uri, "libvirtPool": "bench-rec", "backends": ["qcow2"]}},
        }
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps(config))
        write_manifests(work / "manifests", n)
        rec_s, out = timed(
            [
                str(RECONCILE),
                "--config",
                str(cfg),
                "--jobs",
                str(args.jobs),
                str(work / "manifests"),
            ]
        )
        made = out.count("\ncreated ")
        if made != n:
            sys.exit(f"bench: the reconciler made {made} disks, expected {n}")
        noop_s, out = timed([str(RECONCILE), "--config", str(cfg), str(work / "manifests")])
        if "No changes." not in out:
            sys.exit(f"bench: the re-run planned changes:\n{out[-2000:]}")

        # --- baseline: an identical entry (made outside the timing), then bare createXML
        entry = work / "bare" / "entry.raw"
        with open(entry, "wb") as f:
            f.truncate(SIZE)
        subprocess.run(
            ["mkfs.ext4", "-F", "-q", "-E", "nodiscard", "-L", "eph0", str(entry)], check=True
        )
        bare_pool.refresh(0)
        t = time.perf_counter()
        for i in range(n):
            bare_pool.createXML(
                f"<volume><name>vm{i:05d}</name><capacity unit='bytes'>{SIZE}</capacity>"
                "<allocation>0</allocation><target><format type='qcow2'/><compat>1.1</compat>"
                f"</target><backingStore><path>{entry}</path><format type='raw'/>"
                "</backingStore></volume>",
                0,
            )
        bare_s = time.perf_counter() - t
        conn.close()

        ratio = (n / rec_s) / (n / bare_s)
        print(f"{'':<28}{'seconds':>10}{'disks/s':>10}")
        label = f"reconciler --jobs {args.jobs}"
        print(f"{label:<28}{rec_s:>10.2f}{n / rec_s:>10.1f}")
        print(f"{'bare libvirt createXML':<28}{bare_s:>10.2f}{n / bare_s:>10.1f}")
        print(
            f"target: throughput against bare createXML: {ratio:.2f}x (want >= 0.80x) -> "
            f"{'PASS' if ratio >= 0.8 else 'FAIL'}"
        )
        print(
            f"target: no-op re-run over {n} disks: {noop_s:.2f} s (want < 1 s) -> "
            f"{'PASS' if noop_s < 1 else 'FAIL'}"
        )
    finally:
        if args.keep:
            print(f"kept: {work} (config {work / 'config.yaml'})")
        else:
            subprocess.run([str(SCRIPT), "stop", str(daemon)], check=False)
            shutil.rmtree(work, ignore_errors=True)
            if os.path.exists(work):
                subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


if __name__ == "__main__":
    main()
