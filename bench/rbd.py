"""Disks cloned from one cached image on an rbd pool, against a bare python-rbd loop.

    .venv/bin/python bench/rbd.py [--disks 200] [--jobs 8] [--rounds 2]

In one run, on this checkout's Ceph test cluster (scripts/ceph.sh) and its private libvirtd
(scripts/libvirtd.sh), each phase in a Ceph pool of its own, `rounds` pairs of baseline and
reconciler in ABBA order (odd rounds reversed):
  baseline    a bare python-rbd loop, sequential: one 64 MiB image with data and a
              snapshot, then for each disk `RBD.clone` (v2) + open + `resize` to 128 MiB +
              close. Nothing else: no records, no locks, no checks.
  reconciler  the image is imported into the pool's cache by a first `reconcile` run (one
              disk), then `reconcile --jobs N` makes the other disks: each a record
              written before and after, a reference on the entry, a lease, the clone, the
              grow and the image's record copy.
  no-op       `reconcile` again over the same manifests, NOOP_ROUNDS times after each
              reconciler round: it must plan nothing, take at most 0.40 s (the median),
              and make no mutating call: every RADOS object of the pool (images,
              records, locks, heartbeats; all namespaces) has the same version before
              and after (a run that changes nothing renews this host's heartbeat only
              once it is a quarter of ownership.heartbeatExpiry old).
Reported: the throughput ratio of the median times (reconciler disks/s over baseline
disks/s, want >= 1.5: issue 27, every Ceph call a round trip, overlapped), with the range
of the rounds' own ratios; the no-op time (median and range over every round's no-ops)
and the objects they changed (in any round); `target:` lines at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# Run as a script, this file's directory is first on sys.path, where this file would hide
# Debian's `rbd` module: put the repository there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


ROOT = Path(__file__).resolve().parent.parent
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"
MiB = 1 << 20
NOOP_ROUNDS = 5  # no-op runs, one after another (the median and range are reported)


def script(*args: str) -> str:
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        check=True,
    )
    return res.stdout.strip().splitlines()[-1]


def compile_checkout() -> None:
    """Byte-compile reconciler/ (as setup and an install do), so a run times the code, not
    compiling a module changed since setup (this environment writes no bytecode itself)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "reconciler")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def start_daemons() -> tuple[str, str]:
    """This checkout's Ceph cluster and libvirtd, started unless they run: (its ceph.conf,
    the daemon's qemu URI)."""
    conf = script("ceph.sh", "start", script("ceph-dir.sh"))
    uri = script("libvirtd.sh", "start", script("libvirt-dir.sh"))
    return conf, uri.replace("storage+unix://", "qemu+unix://", 1)


def mon(cluster: Any, prefix: str, **args: Any) -> None:
    ret, _, err = cluster.mon_command(json.dumps({"prefix": prefix, **args}), b"")
    if ret != 0:
        raise SystemExit(f"{prefix}: {ret} {err}")


def new_pool(cluster: Any) -> tuple[str, Any]:
    import rbd

    name = f"bench-{uuid.uuid4().hex[:8]}"
    mon(cluster, "osd pool create", pool=name, pg_num=8, pgp_num=8)
    io = cluster.open_ioctx(name)
    rbd.RBD().pool_init(io, False)
    return name, io


def drop_pool(cluster: Any, name: str, io: Any) -> None:
    io.close()
    mon(
        cluster,
        "osd pool delete",
        pool=name,
        pool2=name,
        yes_i_really_really_mean_it=True,
    )


def image_bytes() -> bytes:
    return b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(32768 * 4))  # 4 MiB


def baseline(cluster: Any, disks: int) -> float:
    import rbd

    name, io = new_pool(cluster)
    try:
        r = rbd.RBD()
        r.create(io, "base", 64 * MiB, old_format=False)
        with rbd.Image(io, "base") as img:
            img.write(image_bytes(), 0)
            img.create_snap("s")
        start = time.monotonic()
        for i in range(disks):
            r.clone(io, "base", "s", io, f"disk-{i}")
            with rbd.Image(io, f"disk-{i}") as img:
                img.resize(128 * MiB)
        return time.monotonic() - start
    finally:
        drop_pool(cluster, name, io)


def object_versions(cluster: Any, pool: str) -> dict[tuple[str, str], int]:
    import rados

    io = cluster.open_ioctx(pool)
    try:
        io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
        names = [(o.nspace, o.key) for o in io.list_objects()]
        out = {}
        for ns, key in names:
            io.set_namespace(ns)
            io.stat(key)
            out[(ns, key)] = io.get_last_version()
        return out
    finally:
        io.close()


def reconciler(
    cluster: Any, conf: str, uri: str, disks: int, jobs: int, work: Path
) -> tuple[float, list[float], int, list[tuple[str, str]]]:
    """(time to make the disks, each no-op's time, no-op actions, objects the no-ops
    changed)."""
    import libvirt

    name, io = new_pool(cluster)
    conn = libvirt.open(uri)
    lv = None
    try:
        lv = conn.storagePoolDefineXML(
            f"<pool type='rbd'><name>lv-{name}</name><source><name>{name}</name>"
            f"<host name='127.0.0.1' port='{mon_v1_port(cluster)}'/></source></pool>"
        )
        img = work / "image.raw"
        data = image_bytes()
        img.write_bytes(data)
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "host": "bench",
            "state": {"dir": str(work / "state")},
            "safety": {"maxDeletePercent": 100},
            "pools": {
                "ceph": {
                    "uri": uri,
                    "libvirtPool": f"lv-{name}",
                    "backends": ["rbd"],
                    "ceph": {"conf": conf, "pool": name},
                }
            },
            "images": {
                "img": {
                    "location": f"file://{img}",
                    "format": "raw",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                }
            },
        }
        config = work / "config.yaml"
        config.write_text(json.dumps(cfg))
        manifests = work / "manifests"
        manifests.mkdir()

        def manifest(i: int) -> None:
            doc = {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"bench{i}")),
                "disks": [
                    {
                        "name": "root",
                        "backend": "rbd",
                        "pool": "ceph",
                        "format": "raw",
                        "size": 128 * MiB,
                        "source": {"image": "img"},
                    }
                ],
            }
            (manifests / f"vm{i}.yaml").write_text(json.dumps(doc))

        def reconcile(*args: str) -> tuple[float, str]:
            t = time.monotonic()
            res = subprocess.run(
                [str(RECONCILE), "--config", str(config), *args, str(manifests)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            took = time.monotonic() - t
            if res.returncode != 0:
                raise SystemExit(f"reconcile failed:\n{res.stdout}{res.stderr}")
            return took, res.stdout

        manifest(0)  # the first disk imports the image into the cache
        reconcile()
        for i in range(1, disks + 1):
            manifest(i)
        made, out = reconcile("--jobs", str(jobs))
        if out.count("\ncreated ") + out.startswith("created ") != disks:
            raise SystemExit(f"expected {disks} disks created:\n{out}")
        before = object_versions(cluster, name)
        noops = [reconcile("--jobs", str(jobs))[0] for _ in range(NOOP_ROUNDS)]
        after = object_versions(cluster, name)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        plan_json = subprocess.run(
            [
                str(RECONCILE),
                "--config",
                str(config),
                "--dry-run",
                "--output",
                "json",
                str(manifests),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        actions = len(json.loads(plan_json.stdout)["actions"])
        return made, noops, actions, changed
    finally:
        if lv is not None:
            lv.undefine()
        conn.close()
        drop_pool(cluster, name, io)


def mon_v1_port(cluster: Any) -> int:
    import re

    m = re.search(r"v1:127\.0\.0\.1:(\d+)", cluster.conf_get("mon_host"))
    assert m
    return int(m[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--disks", type=int, default=200)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="pairs of phases, ABBA order")
    args = p.parse_args()
    import rados

    compile_checkout()
    conf, uri = start_daemons()
    cluster = rados.Rados(conffile=conf, name="client.admin")
    cluster.connect()
    bases: list[float] = []
    mades: list[float] = []
    noops: list[float] = []
    actions = 0
    changed: set[tuple[str, str]] = set()
    try:
        for r in range(args.rounds):
            for phase in "ab" if r % 2 == 0 else "ba":
                if phase == "a":
                    bases.append(baseline(cluster, args.disks))
                    continue
                with tempfile.TemporaryDirectory(prefix="bench-rbd-") as tmp:
                    made, nos, acts, ch = reconciler(
                        cluster, conf, uri, args.disks, args.jobs, Path(tmp)
                    )
                mades.append(made)
                noops.extend(nos)
                actions = max(actions, acts)
                changed.update(ch)
    finally:
        cluster.shutdown()
    n = args.disks
    base, made, noop = (statistics.median(v) for v in (bases, mades, noops))
    ratio = base / made
    ratios = sorted(b / m for b, m in zip(bases, mades, strict=True))

    def span(v: list[float]) -> str:
        return f"[{min(v):.2f}-{max(v):.2f}]"

    print(
        f"{args.rounds} rounds (ABBA), medians [ranges]; load average "
        f"{os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs"
    )
    print(
        f"baseline   python-rbd clone+resize, sequential: {n} disks in {base:.2f} s "
        f"{span(bases)} ({n / base:.1f} disks/s)"
    )
    print(
        f"reconciler reconcile --jobs {args.jobs}: {n} disks in {made:.2f} s {span(mades)} "
        f"({n / made:.1f} disks/s, the whole CLI run)"
    )
    # The heartbeat counts like any write: fresh from the run before, it is not renewed.
    others = sorted(changed)
    noop = statistics.median(noops)
    load = os.getloadavg()
    print(
        f"no-op      reconcile again, {len(noops)} times: {noop:.2f} s "
        f"[{min(noops):.2f}-{max(noops):.2f}], {actions} action(s) planned, "
        f"{len(others)} RADOS object(s) changed {others[:5]} "
        f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )
    verdict = "PASS" if ratio >= 1.5 else "FAIL"
    print(
        f"target: clone throughput vs bare python-rbd: {ratio:.2f}x "
        f"[{ratios[0]:.2f}-{ratios[-1]:.2f}] (want >= 1.5x) -> {verdict}"
    )
    verdict = "PASS" if noop <= 0.40 else "FAIL"
    print(f"target: no-op re-run over {n} disks: {noop:.2f} s (want <= 0.40 s) -> {verdict}")
    verdict = "PASS" if not others and actions == 0 else "FAIL"
    print(f"target: no-op mutating calls: {len(others)} (want 0) -> {verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
