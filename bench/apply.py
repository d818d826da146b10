"""Apply throughput: 500 qcow2 disks from one template cache entry, against bare libvirt.

    .venv/bin/python bench/apply.py [--disks 500] [--jobs 4] [--apply-rounds 3]

In one run, on one private libvirtd (started and stopped here):
  reconciler  `reconcile --jobs N` (default 4, as the CLI's) applying 500 manifests'
              qcow2-backend ext4 disks end to end, into an empty pool and state: one
              cache entry made (mkfs, once), then 500 overlays, each with its record written
              before and after, its volume lock, planning and observation included;
  baseline    the same 500 overlays on an identical entry through bare libvirt
              createXML calls in a sequential loop (the plain libvirt way to make them:
              libvirtd runs one qemu-img per overlay), into an emptied pool. The
              reconciler no longer asks libvirt for qcow2 overlays: it has libvirt make a
              raw volume and writes the overlay's bytes, made once a run by qemu-img
              (drivers/file/disks.py, overlay_image);
              the two alternate in --apply-rounds rounds (ABBA: odd rounds reversed), each
              side's median and range reported, the ratio of the medians judged;
  no-op       `reconcile` run again right after: it must plan nothing. Then --rounds
              rounds (ABBA: odd rounds reversed) of the no-op re-run, `reconcile --version`
              (interpreter start and imports: what a no-op cannot avoid) and the floor, in
              this process: one read of the 500 manifests (PyYAML's CSafeLoader), one
              listing of the pool (refresh + list) and one SELECT of the records.
Targets (issue 27): reconciler throughput >= 1.8x the sequential baseline's (two cores;
the bare loop is sequential); no-op re-run <= 0.40 s (one listing, one read of the
records), medians. Figures are printed, not asserted; a loaded machine inflates the
no-op's absolute time, and the --version and floor figures of the same rounds say by how
much.

The checkout's own modules are byte-compiled first (compile_checkout), as any install
(pip, uv --compile-bytecode, a Debian package) leaves them: an editable install does not,
and where PYTHONDONTWRITEBYTECODE is set every `reconcile` compiled some 85 modules anew
(0.17 s of CPU a run, measured), a cost of this checkout that no installed reconciler pays.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import libvirt
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RECONCILE, ROOT, SCRIPT, make_pool, start_daemon, timed
from reconciler.commands.plan import DEFAULT_JOBS

SIZE = 256 << 20
TARGET_NOOP_S = 0.40
TARGET_RATIO = 1.8


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


def compile_checkout() -> None:
    """Byte-compile reconciler/ into its __pycache__ directories (ignored by git; a module
    changed later is compiled again as it is imported, as without them)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "reconciler")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def floor(work: Path, uri: str) -> float:
    """The bare work of a no-op, sequential: read every manifest, list the pool (refresh
    + list), one SELECT of the records."""
    t = time.perf_counter()
    with os.scandir(work / "manifests") as it:
        files = sorted(e.path for e in it if e.name.endswith(".yaml"))
    for f in files:
        with open(f, "rb") as fh:
            yaml.load(fh.read().decode(), Loader=yaml.CSafeLoader)
    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName("bench-rec")
        pool.refresh(0)
        names = [v.name() for v in pool.listAllVolumes(0)]
    finally:
        conn.close()
    db = sqlite3.connect(str(work / "state" / "records.sqlite"))
    try:
        rows = db.execute("SELECT * FROM records").fetchall()
    finally:
        db.close()
    if not names or not rows:
        sys.exit("bench: the floor saw no volumes or no records")
    return time.perf_counter() - t


def empty_pool(pool: libvirt.virStoragePool, d: Path, keep: str | None = None) -> None:
    """Remove every file under `d` (but `keep`), then let libvirt re-read it (untimed)."""
    for p in d.iterdir():
        if p.name == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    pool.refresh(0)


def reconciler_round(argv: list[str], n: int, pool: libvirt.virStoragePool, work: Path) -> float:
    """One apply of the `n` manifests into an empty pool and state: seconds."""
    empty_pool(pool, work / "rec")
    shutil.rmtree(work / "state", ignore_errors=True)
    took, out = timed(argv)
    made = out.count("\ncreated ")
    if made != n:
        sys.exit(f"bench: the reconciler made {made} disks, expected {n}")
    return took


def bare_round(pool: libvirt.virStoragePool, work: Path, entry: Path, n: int) -> float:
    """`n` overlays on `entry` by sequential createXML into an emptied pool: seconds."""
    empty_pool(pool, work / "bare", keep=entry.name)
    t = time.perf_counter()
    for i in range(n):
        pool.createXML(
            f"<volume><name>vm{i:05d}</name><capacity unit='bytes'>{SIZE}</capacity>"
            "<allocation>0</allocation><target><format type='qcow2'/><compat>1.1</compat>"
            f"</target><backingStore><path>{entry}</path><format type='raw'/>"
            "</backingStore></volume>",
            0,
        )
    return time.perf_counter() - t


def spread(v: list[float]) -> str:
    return f"{statistics.median(v):>10.2f}  [{min(v):.2f}-{max(v):.2f}]"


def noop_rounds(rounds: int, noop_argv: list[str], work: Path, uri: str) -> dict[str, list[float]]:
    """The no-op re-run, `reconcile --version` and the floor, in ABBA order, `rounds`
    times after one warm-up round."""
    steps: list[tuple[str, Callable[[], float]]] = [
        ("no-op", lambda: timed(noop_argv)[0]),
        ("--version", lambda: timed([str(RECONCILE), "--version"])[0]),
        ("floor", lambda: floor(work, uri)),
    ]
    out: dict[str, list[float]] = {name: [] for name, _ in steps}
    for i in range(rounds + 1):
        for name, fn in steps if i % 2 == 0 else steps[::-1]:
            took = fn()
            if i > 0:
                out[name].append(took)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    ap.add_argument("--rounds", type=int, default=7, help="no-op rounds (default 7)")
    ap.add_argument(
        "--apply-rounds", type=int, default=3, help="throughput rounds, ABBA (default 3)"
    )
    ap.add_argument("--keep", action="store_true", help="leave the daemon and files (debug)")
    args = ap.parse_args()
    n = args.disks
    compile_checkout()
    work = Path(tempfile.mkdtemp(prefix="rcl-bench-", dir="/tmp"))
    daemon = work / "d"
    try:
        uri = start_daemon(daemon)
        conn = libvirt.open(uri)
        rec_pool = make_pool(conn, "bench-rec", work / "rec")
        bare_pool = make_pool(conn, "bench-bare", work / "bare")

        config = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "state": {"dir": str(work / "state")},
            "pools": {"bench": {"uri": uri, "libvirtPool": "bench-rec", "backends": ["qcow2"]}},
        }
        cfg = work / "config.yaml"
        cfg.write_text(json.dumps(config))
        write_manifests(work / "manifests", n)
        apply_argv = [
            str(RECONCILE),
            "--config",
            str(cfg),
            "--jobs",
            str(args.jobs),
            str(work / "manifests"),
        ]
        # The baseline's entry, identical to the reconciler's, made once outside the timing.
        entry = work / "bare" / "entry.raw"
        with open(entry, "wb") as f:
            f.truncate(SIZE)
        subprocess.run(
            ["mkfs.ext4", "-F", "-q", "-E", "nodiscard", "-L", "eph0", str(entry)], check=True
        )
        # Throughput, ABBA (each round reverses the one before), ending with the
        # reconciler's round, whose disks the no-op part below re-plans.
        rec_times: list[float] = []
        bare_times: list[float] = []
        for r in range(args.apply_rounds):
            sides = ["bare", "rec"] if (args.apply_rounds - 1 - r) % 2 == 0 else ["rec", "bare"]
            for side in sides:
                if side == "rec":
                    rec_times.append(reconciler_round(apply_argv, n, rec_pool, work))
                else:
                    bare_times.append(bare_round(bare_pool, work, entry, n))
        conn.close()

        noop_argv = [str(RECONCILE), "--config", str(cfg), str(work / "manifests")]
        _, out = timed(noop_argv)
        if "No changes." not in out:
            sys.exit(f"bench: the re-run planned changes:\n{out[-2000:]}")
        noop = noop_rounds(args.rounds, noop_argv, work, uri)

        rec_s, bare_s = statistics.median(rec_times), statistics.median(bare_times)
        ratio = bare_s / rec_s
        print(
            f"{'':<28}{'seconds':>10}  [range]     {'disks/s':>8}  "
            f"({args.apply_rounds} rounds, ABBA)"
        )
        label = f"reconciler --jobs {args.jobs}"
        print(f"{label:<28}{spread(rec_times)}  {n / rec_s:>8.1f}")
        print(f"{'bare libvirt createXML':<28}{spread(bare_times)}  {n / bare_s:>8.1f}")
        per_round = [b / a for a, b in zip(rec_times, bare_times, strict=True)]
        print(
            f"{'ratio of each round':<28}{statistics.median(per_round):>10.2f}x "
            f"[{min(per_round):.2f}-{max(per_round):.2f}]"
        )
        print(f"load average after the throughput rounds: {os.getloadavg()[0]:.2f}")
        for name in ("no-op", "--version", "floor"):
            v = noop[name]
            print(
                f"{name + ' (' + str(len(v)) + ' rounds)':<28}{statistics.median(v):>10.3f}"
                f"  [{min(v):.3f}-{max(v):.3f}]"
            )
        own = [a - b for a, b in zip(noop["no-op"], noop["--version"], strict=True)]
        print(
            f"{'no-op minus --version':<28}{statistics.median(own):>10.3f}"
            f"  [{min(own):.3f}-{max(own):.3f}]  (each round's own: the run's work)"
        )
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        print(
            f"target: throughput against bare sequential createXML: {ratio:.2f}x "
            f"(want >= {TARGET_RATIO:.1f}x) -> {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}"
        )
        noop_s = statistics.median(noop["no-op"])
        print(
            f"target: no-op re-run over {n} disks: {noop_s:.3f} s "
            f"(want <= {TARGET_NOOP_S:.2f} s) -> {'PASS' if noop_s <= TARGET_NOOP_S else 'FAIL'}"
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
