"""Snapshots and restores: 100 of each through `reconcile`, on an rbd pool and on a file
pool, against bare loops of the same work measured in the same run.

    .venv/bin/python bench/snapshot.py [--disks 100] [--rounds 4] [--jobs 8] [--only rbd|file]

On this checkout's Ceph test cluster (scripts/ceph.sh; a Ceph pool of its own) and a
private libvirtd (a dir pool under a temporary directory, on whatever file system TMPDIR
is: `cp --reflink=auto` and the file driver reflink only where it shares blocks):

  rbd  reconciler  `reconcile --jobs N` over N instances of one 64 MiB rbd disk (cloned
                   from a cached image, 16 MiB of data written by the first run): a round
                   adds snapshot `rR` to every disk's `snapshots` (N `snapshot` actions:
                   each a record written `creating`, the RBD snapshot, its record copy,
                   the record `ready`), then N new instances whose disk has
                   `source: {snapshot: INSTANCE/root@rR}` (N restores: record, clone v2,
                   record copy, grow, `ready`). Planning and observing included.
       baseline    a bare sequential python-rbd loop over N identical clones: per image
                   `create_snap`; then per image `RBD.clone` (v2) of that snapshot +
                   open + `resize` + close. No records, locks or checks.
  file reconciler  the same on a dir pool (flat raw disks of the image).
       baseline    `cp --reflink=auto` of each disk file (the snapshot), then of each copy
                   (the restore): one process per copy.

Rounds alternate the order (ABBA: reconciler first in rounds 0 and 3, the baseline first
in 1 and 2, and so on), so the machine's changing load weighs on both. Reported: the
median time of each phase over the rounds with its range, and per phase the throughput
ratio (baseline time / reconciler time, from the medians); `target:` lines at the end
(want >= 0.8x). Printed, not asserted; not part of the test suite.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's directory is first on sys.path, where bench/rbd.py would
# hide Debian's `rbd` module: put the repository there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import RECONCILE, ROOT  # noqa: E402
from bench.rbd import drop_pool, mon_v1_port, new_pool, start_daemons  # noqa: E402

MiB = 1 << 20
DISK = 64 * MiB
DATA = 16 * MiB


def image_bytes() -> bytes:
    return b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(DATA // 32))


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (range {min(xs):.2f}-{max(xs):.2f})"


class Reconciler:
    """`reconcile` over one config and one manifest directory."""

    def __init__(self, work: Path, pool: dict[str, Any], image: Path, backend: str) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.backend = backend
        data = image.read_bytes()
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "host": "bench",
            "state": {"dir": str(work / "state")},
            "safety": {"maxDeletePercent": 100},
            "pools": {"p": pool},
            "images": {
                "img": {
                    "location": f"file://{image}",
                    "format": "raw",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                }
            },
        }
        self.config = work / "config.yaml"
        self.config.write_text(json.dumps(cfg))
        self.manifests = work / "manifests"
        self.manifests.mkdir()

    def manifest(self, name: str, instance: str, source: dict[str, Any], snaps: list[str]) -> None:
        d: dict[str, Any] = {
            "name": "root",
            "backend": self.backend,
            "pool": "p",
            "format": "raw",
            "size": DISK,
            "source": source,
        }
        if snaps:
            d["snapshots"] = snaps
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": instance,
            "disks": [d],
        }
        (self.manifests / f"{name}.yaml").write_text(json.dumps(doc))

    def run(self, jobs: int, want: str, count: int) -> float:
        argv = [str(RECONCILE), "--config", str(self.config), "--jobs", str(jobs)]
        t = time.perf_counter()
        res = subprocess.run(
            [*argv, str(self.manifests)], capture_output=True, text=True, cwd=ROOT, check=False
        )
        took = time.perf_counter() - t
        if res.returncode != 0:
            sys.exit(f"bench: reconcile failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        got = sum(1 for line in res.stdout.splitlines() if line.startswith(want))
        if got != count:
            sys.exit(f"bench: expected {count} lines {want!r}, got {got}:\n{res.stdout[-3000:]}")
        return took


class Side:
    """One backend's two contenders, each a callable of the round that times its phases."""

    reconciler: Callable[[int], None]
    baseline: Callable[[int], None]
    close: Callable[[], None]

    def __init__(self, name: str) -> None:
        self.name = name
        self.times: dict[str, list[float]] = {}

    def note(self, phase: str, took: float) -> None:
        self.times.setdefault(phase, []).append(took)


def reconciler_round(rc: Reconciler, side: Side, ids: list[str], jobs: int, rnd: int) -> None:
    """One round of the reconciler's side, the same on every backend: each instance's
    manifest lists one snapshot more (`r{rnd}`), then a new instance per disk restores it."""
    n = len(ids)
    snaps = [f"r{k}" for k in range(rnd + 1)]
    for i, inst in enumerate(ids):
        rc.manifest(f"vm{i}", inst, {"image": "img"}, snaps)
    side.note("snapshot reconciler", rc.run(jobs, "snapshot ", n))
    for i, inst in enumerate(ids):
        rc.manifest(
            f"r{rnd}-{i}",
            str(uuid.UUID(int=(rnd + 1) * 100000 + i)),
            {"snapshot": f"{inst}/root@r{rnd}"},
            [],
        )
    side.note("restore reconciler", rc.run(jobs, "created ", n))


def rbd_side(conf: str, uri: str, cluster: Any, n: int, jobs: int, work: Path) -> Side:
    import libvirt
    import rbd

    side = Side("rbd")
    name, io = new_pool(cluster)
    conn = libvirt.open(uri)
    lv = conn.storagePoolDefineXML(
        f"<pool type='rbd'><name>lv-{name}</name><source><name>{name}</name>"
        f"<host name='127.0.0.1' port='{mon_v1_port(cluster)}'/></source></pool>"
    )
    try:
        img = work / "image.raw"
        img.write_bytes(image_bytes())
        rc = Reconciler(
            work / "rbd",
            {
                "uri": uri,
                "libvirtPool": f"lv-{name}",
                "backends": ["rbd"],
                "ceph": {"conf": conf, "pool": name},
            },
            img,
            "rbd",
        )
        ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
        for i, inst in enumerate(ids):
            rc.manifest(f"vm{i}", inst, {"image": "img"}, [])
        rc.run(jobs, "created ", n)  # untimed: the cache entry and the disks

        # The baseline's images: clones of a base with the same data, as the disks are.
        r = rbd.RBD()
        r.create(io, "bare-base", DISK, old_format=False)
        with rbd.Image(io, "bare-base") as b:
            b.write(img.read_bytes(), 0)
            b.create_snap("base")
        for i in range(n):
            r.clone(io, "bare-base", "base", io, f"bare-{i}")

        def reconciler(rnd: int) -> None:
            reconciler_round(rc, side, ids, jobs, rnd)

        def baseline(rnd: int) -> None:
            t = time.perf_counter()
            for i in range(n):
                with rbd.Image(io, f"bare-{i}") as im:
                    im.create_snap(f"r{rnd}")
            side.note("snapshot baseline", time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(n):
                r.clone(io, f"bare-{i}", f"r{rnd}", io, f"bare-r{rnd}-{i}")
                with rbd.Image(io, f"bare-r{rnd}-{i}") as im:
                    im.resize(DISK)
            side.note("restore baseline", time.perf_counter() - t)

        def close() -> None:
            lv.undefine()
            conn.close()
            drop_pool(cluster, name, io)

        side.reconciler, side.baseline, side.close = reconciler, baseline, close
        return side
    except BaseException:
        lv.undefine()
        conn.close()
        drop_pool(cluster, name, io)
        raise


def file_side(uri: str, n: int, jobs: int, work: Path) -> Side:
    import libvirt

    side = Side("file")
    conn = libvirt.open(uri)
    pname = f"bench-snap-{uuid.uuid4().hex[:8]}"
    pdir = work / "pool"
    pdir.mkdir()
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{pname}</name><target><path>{pdir}</path></target></pool>"
    )
    pool.create(0)
    img = work / "image.raw"
    img.write_bytes(image_bytes())
    rc = Reconciler(
        work / "file", {"uri": uri, "libvirtPool": pname, "backends": ["flat"]}, img, "flat"
    )
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    for i, inst in enumerate(ids):
        rc.manifest(f"vm{i}", inst, {"image": "img"}, [])
    rc.run(jobs, "created ", n)
    bare = work / "bare"
    bare.mkdir()
    for i in range(n):
        shutil.copyfile(pdir / f"{ids[0]}_root", bare / f"d{i}")

    def cp(src: Path, dst: Path) -> None:
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)], check=True)

    def reconciler(rnd: int) -> None:
        reconciler_round(rc, side, ids, jobs, rnd)

    def baseline(rnd: int) -> None:
        t = time.perf_counter()
        for i in range(n):
            cp(bare / f"d{i}", bare / f"d{i}+snap-r{rnd}")
            os.chmod(bare / f"d{i}+snap-r{rnd}", 0o400)
        side.note("snapshot baseline", time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            cp(bare / f"d{i}+snap-r{rnd}", bare / f"r{rnd}-{i}")
        side.note("restore baseline", time.perf_counter() - t)

    def close() -> None:
        pool.destroy()
        pool.undefine()
        conn.close()

    side.reconciler, side.baseline, side.close = reconciler, baseline, close
    return side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--disks", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--only", choices=["rbd", "file"])
    args = p.parse_args()
    import rados

    conf, uri = start_daemons()
    cluster = rados.Rados(conffile=conf, name="client.admin")
    cluster.connect()
    sides: list[Side] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
            work = Path(tmp)
            if args.only in (None, "rbd"):
                (work / "r").mkdir()
                sides.append(rbd_side(conf, uri, cluster, args.disks, args.jobs, work / "r"))
            if args.only in (None, "file"):
                (work / "f").mkdir()
                sides.append(file_side(uri, args.disks, args.jobs, work / "f"))
            try:
                for rnd in range(args.rounds):
                    first_reconciler = rnd % 4 in (0, 3)  # ABBA
                    for side in sides:
                        order = [side.reconciler, side.baseline]
                        if not first_reconciler:
                            order.reverse()
                        for step in order:
                            step(rnd)
                    print(f"round {rnd} done", file=sys.stderr, flush=True)
            finally:
                for side in sides:
                    side.close()
    finally:
        cluster.shutdown()
    n = args.disks
    load = os.getloadavg()[0]
    print(f"{n} disks per phase, {args.rounds} rounds (ABBA), --jobs {args.jobs}, load {load:.1f}")
    targets = []
    for side in sides:
        for what in ("snapshot", "restore"):
            rec = side.times[f"{what} reconciler"]
            base = side.times[f"{what} baseline"]
            print(f"{side.name:4} {what:8} reconciler {median_range(rec)}")
            print(f"{side.name:4} {what:8} baseline   {median_range(base)}")
            ratio = statistics.median(base) / statistics.median(rec)
            verdict = "PASS" if ratio >= 0.8 else "FAIL"
            targets.append(
                f"target: {side.name} {what} throughput vs bare: {ratio:.2f}x "
                f"(want >= 0.8x) -> {verdict}"
            )
    for line in targets:
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
