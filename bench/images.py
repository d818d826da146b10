"""Disks from one image: fetches, pool space and time, against Nova's pattern.

    .venv/bin/python bench/images.py [--instances 200] [--image-mib 1024] [--jobs 4] [--rounds 3]

In one run, on one private libvirtd and a 127.0.0.1 HTTP server (both started here):
  reconciler  `reconcile --jobs N` makes 200 instances' root disks (qcow2 backend) from one
              1 GiB raw image served over HTTP: the image is fetched and checked once into
              the pool's cache, then 200 overlays on it are made. Each run is into an
              empty pool and state, with --jobs N (the default's 4 unless told); one more
              run at the end with --jobs 1, one action at a time, for comparison.
  baseline    Nova's pattern: one download of the image per host into a base file, then
              200 sequential `qemu-img create -f qcow2 -F raw -b BASE` calls (it neither
              checks the image's sha256 nor inspects its format, as the reconciler does).
The two alternate in --rounds rounds (ABBA: each round reverses the one before); medians
and ranges are reported. Targets: HTTP fetches 1 per run; pool space one base plus 200
small overlays (printed); throughput >= 1.8x Nova's pattern (issue 27: one fetch; overlays
are metadata), the ratio of the medians. Figures are printed, not asserted.
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
import urllib.request
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.commands.plan import DEFAULT_JOBS
from tests.httpserver import ImageServer, serve

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "libvirtd.sh"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"
TARGET_RATIO = 1.8


def make_image(path: Path, mib: int) -> str:
    """A raw image: 64 MiB of varied data (an OS), the rest zeros; returns its sha256."""
    h = hashlib.sha256()
    block = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(32768))  # 1 MiB
    zero = bytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            data = block if i < 64 else zero
            f.write(data)
            h.update(data)
    return h.hexdigest()


def used_bytes(d: Path) -> tuple[int, int, int]:
    """Allocated bytes of the cache entries, of everything else, and the number of files."""
    base, rest, files = 0, 0, 0
    for p in d.iterdir():
        if p.is_file() and not p.name.startswith("."):
            used = p.stat().st_blocks * 512
            if p.name.startswith("_cache_") or p.name == "base":
                base += used
            else:
                rest += used
            files += 1
    return base, rest, files


def run_reconciler(
    work: Path,
    conn: libvirt.virConnect,
    uri: str,
    server: ImageServer,
    args: argparse.Namespace,
    sha: str,
    jobs: int,
    tag: str,
) -> tuple[float, int, tuple[int, int, int]]:
    """One reconciler run into a new pool and state: seconds, fetches, pool space."""
    n, size = args.instances, args.image_mib << 20
    run = work / f"rec-{tag}"
    pool_dir = run / "pool"
    pool_dir.mkdir(parents=True)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>bench-img-{tag}</name><target><path>{pool_dir}</path>"
        "</target></pool>"
    )
    pool.create(0)
    cfg = {
        "apiVersion": "reconciler/v1",
        "kind": "Config",
        "state": {"dir": str(run / "state")},
        "pools": {"local": {"uri": uri, "libvirtPool": f"bench-img-{tag}", "backends": ["qcow2"]}},
        "images": {
            "base": {
                "location": server.url("base.raw"),
                "format": "raw",
                "sha256": sha,
                "size": size,
            }
        },
    }
    (run / "config.yaml").write_text(json.dumps(cfg))
    mdir = run / "manifests"
    mdir.mkdir()
    for i in range(n):
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": str(uuid.UUID(int=i + 1)),
            "disks": [
                {
                    "name": "disk",
                    "backend": "qcow2",
                    "pool": "local",
                    "format": "qcow2",
                    "size": 2 * size,
                    "source": {"image": "base"},
                }
            ],
        }
        (mdir / f"vm{i:04d}.yaml").write_text(json.dumps(doc))
    before = server.gets["base.raw"]
    argv = [str(RECONCILE), "--config", str(run / "config.yaml"), "--jobs", str(jobs), str(mdir)]
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0 or res.stdout.count("\ncreated ") != n:
        sys.exit(f"bench: reconcile failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return took, server.gets["base.raw"] - before, used_bytes(pool_dir)


def nova_pattern(
    work: Path, server: ImageServer, n: int, size: int, tag: str
) -> tuple[float, Path]:
    """One fetch per host into a base file, then qemu-img per disk, one after another."""
    nova = work / f"nova-{tag}"
    nova.mkdir()
    t = time.perf_counter()
    with (
        urllib.request.urlopen(server.url("base.raw"), timeout=60) as r,
        open(nova / "base", "wb") as f,
    ):
        shutil.copyfileobj(r, f, 1 << 20)
    for i in range(n):
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(nova / "base"),
                str(nova / f"disk{i:04d}"),
                str(2 * size),
            ],
            check=True,
        )
    return time.perf_counter() - t, nova


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (default 3)")
    args = ap.parse_args()
    n = args.instances
    size = args.image_mib << 20
    work = Path(tempfile.mkdtemp(prefix="rcl-bimg-", dir="/tmp"))
    daemon = work / "d"
    try:
        images = work / "images"
        images.mkdir()
        sha = make_image(images / "base.raw", args.image_mib)
        uri = (
            subprocess.run(
                [str(SCRIPT), "start", str(daemon)], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        conn = libvirt.open(uri)
        rec_times: list[float] = []
        nova_times: list[float] = []
        fetch_counts: list[int] = []
        with serve(images) as server:
            for r in range(args.rounds):
                for side in ("rec", "nova") if r % 2 == 0 else ("nova", "rec"):
                    if side == "rec":
                        took, fetches, space = run_reconciler(
                            work, conn, uri, server, args, sha, args.jobs, f"r{r}"
                        )
                        rec_times.append(took)
                        fetch_counts.append(fetches)
                        rec_base, rec_rest, rec_files = space
                    else:
                        took, nova = nova_pattern(work, server, n, size, f"r{r}")
                        nova_times.append(took)
                        nova_base, nova_rest, _ = used_bytes(nova)
                        shutil.rmtree(nova)
            one_s, one_fetches, _ = run_reconciler(work, conn, uri, server, args, sha, 1, "one")
        conn.close()
        fetch_counts.append(one_fetches)
        rec_s, nova_s = statistics.median(rec_times), statistics.median(nova_times)

        mib = 1 << 20
        print(f"instances: {n}, image: {args.image_mib} MiB raw over HTTP on 127.0.0.1")
        print(
            f"pool space used: {(rec_base + rec_rest) / mib:.1f} MiB in {rec_files} files = "
            f"one base ({size / mib:.0f} MiB image, {rec_base / mib:.1f} MiB allocated: its "
            f"zeros are not stored) + {n} overlays of {rec_rest / n / 1024:.0f} KiB on average"
        )
        print(
            f"Nova's pattern: {(nova_base + nova_rest) / mib:.1f} MiB (base "
            f"{nova_base / mib:.1f} MiB + overlays {nova_rest / mib:.1f} MiB)"
        )

        def spread(v: list[float]) -> str:
            return f"{statistics.median(v):>10.2f}  [{min(v):.2f}-{max(v):.2f}]"

        label = f"reconciler --jobs {args.jobs}"
        print(f"{'':<32}{'seconds':>10}  [range]     {'disks/s':>8}  ({args.rounds} rounds, ABBA)")
        print(f"{label:<32}{spread(rec_times)}  {n / rec_s:>8.1f}")
        print(f"{'nova pattern (fetch+qemu-img)':<32}{spread(nova_times)}  {n / nova_s:>8.1f}")
        print(f"{'reconciler --jobs 1 (once)':<32}{one_s:>10.2f}  {'':<14}{n / one_s:>8.1f}")
        per_round = [b / a for a, b in zip(rec_times, nova_times, strict=True)]
        print(
            f"{'ratio of each round':<32}{statistics.median(per_round):>10.2f}x "
            f"[{min(per_round):.2f}-{max(per_round):.2f}]"
        )
        print(f"throughput ratio reconciler/nova with --jobs 1: {nova_s / one_s:.2f}")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        ratio = nova_s / rec_s
        one = set(fetch_counts) == {1}
        print(
            f"target: fetches per image: {'/'.join(map(str, fetch_counts))} in the "
            f"{len(fetch_counts)} runs (want 1 each) -> {'PASS' if one else 'FAIL'}"
        )
        print(
            f"target: throughput against Nova's pattern, --jobs {args.jobs}: {ratio:.2f}x "
            f"(want >= {TARGET_RATIO:.1f}x) -> {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}"
        )
    finally:
        subprocess.run([str(SCRIPT), "stop", str(daemon)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        if os.path.exists(work):
            print(f"bench: could not remove {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
