"""Hosts sharing one Ceph pool: a host's no-op plan costs what its own instances cost,
not what the pool holds.

    .venv/bin/python bench/rbd_hosts.py [--hosts 30] [--disks 300] [--rounds 5] [--measure N]

In one run, on this checkout's Ceph cluster and private libvirtd (started if needed):
  shared   one Ceph pool holding the disks of --hosts simulated hosts, --disks each (a
           separate state directory, host identity and manifest directory per host), each
           made by that host's own `reconcile --jobs 8`;
  alone    for each measured host, a Ceph pool of its own holding only that host's disks,
           made the same way (the baseline: the same host planning alone in an otherwise
           empty pool).
Then each measured host's `reconcile --dry-run` over its manifests is timed in the shared
pool and alone, alternating (ABBA), --rounds times each (medians). Every plan must have no
action and no error. --measure N measures the first N hosts only (default: every host); the
shared pool holds every host's disks either way. Targets (issue 27), for every measured
host: shared <= 1.2x alone, and the shared no-op plan <= 0.4 s.
"""

from __future__ import annotations

import argparse
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

# Run as a script, this file's directory would hide Debian's `rbd` module (bench/rbd.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.rbd import (  # noqa: E402
    compile_checkout,
    drop_pool,
    mon_v1_port,
    new_pool,
    start_daemons,
)

ROOT = _HERE.parent
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"
MiB = 1 << 20


def write_manifests(d: Path, host: str, n: int) -> None:
    """`n` manifests in the new directory `d`, one instance each (uuid5 of `host` and its
    number) with a 4 MiB blank raw rbd root disk in pool `ceph`."""
    d.mkdir(parents=True)
    for i in range(n):
        doc = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{host}-vm{i}")),
            "disks": [
                {
                    "name": "root",
                    "backend": "rbd",
                    "pool": "ceph",
                    "format": "raw",
                    "size": 4 * MiB,
                    "source": {"template": "blank"},
                }
            ],
        }
        (d / f"vm{i}.yaml").write_text(json.dumps(doc))


class Host:
    def __init__(self, work: Path, index: int, disks: int) -> None:
        self.name = f"host-{index}"
        self.work = work / self.name
        self.manifests = self.work / "manifests"
        write_manifests(self.manifests, self.name, disks)

    def config(self, variant: str, uri: str, conf: str, pool: str, lv_pool: str) -> Path:
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "host": self.name,
            "state": {"dir": str(self.work / f"state-{variant}")},
            "safety": {"maxDeletePercent": 100},
            "pools": {
                "ceph": {
                    "uri": uri,
                    "libvirtPool": lv_pool,
                    "backends": ["rbd"],
                    "ceph": {"conf": conf, "pool": pool},
                }
            },
        }
        path = self.work / f"config-{variant}.yaml"
        path.write_text(json.dumps(cfg))
        return path

    def run(self, config: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t = time.monotonic()
        res = subprocess.run(
            [str(RECONCILE), "--config", str(config), *args, str(self.manifests)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        return time.monotonic() - t, res


def define_libvirt_pool(conn: Any, name: str, cluster: Any) -> Any:
    lv = conn.storagePoolDefineXML(
        f"<pool type='rbd'><name>lv-{name}</name><source><name>{name}</name>"
        f"<host name='127.0.0.1' port='{mon_v1_port(cluster)}'/></source></pool>"
    )
    return lv


def populate(host: Host, config: Path, disks: int) -> float:
    took, res = host.run(config, "--jobs", "8")
    if res.returncode != 0 or res.stdout.count("created ") < disks:
        raise SystemExit(f"{host.name}: populating failed:\n{res.stdout[-2000:]}{res.stderr}")
    return took


def noop(host: Host, config: Path) -> float:
    took, res = host.run(config, "--dry-run", "--output", "json")
    if res.returncode != 0:
        raise SystemExit(f"{host.name}: the no-op plan failed:\n{res.stdout[-2000:]}{res.stderr}")
    doc = json.loads(res.stdout)
    if doc["actions"] or doc["errors"]:
        raise SystemExit(f"{host.name}: the no-op plan is not empty: {doc['summary']}")
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, default=30)
    p.add_argument("--disks", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--measure", type=int, default=0, help="hosts measured (0: every host)")
    args = p.parse_args()
    import libvirt
    import rados

    compile_checkout()
    conf, uri = start_daemons()
    cluster = rados.Rados(conffile=conf, name="client.admin")
    cluster.connect()
    conn = libvirt.open(uri)
    made: list[tuple[str, Any, Any]] = []  # (Ceph pool, ioctx, libvirt pool)
    try:

        def pool() -> str:
            name, io = new_pool(cluster)
            made.append((name, io, define_libvirt_pool(conn, name, cluster)))
            return name

        with tempfile.TemporaryDirectory(prefix="bench-rbd-hosts-") as tmp:
            hosts = [Host(Path(tmp), i, args.disks) for i in range(args.hosts)]
            shared = pool()
            configs: dict[tuple[str, str], Path] = {}
            for h in hosts:
                configs[(h.name, "shared")] = h.config("shared", uri, conf, shared, f"lv-{shared}")
                took = populate(h, configs[(h.name, "shared")], args.disks)
                print(f"shared pool: {h.name} made {args.disks} disks in {took:.1f} s")
            measured = hosts[: args.measure or len(hosts)]
            for h in measured:
                alone = pool()
                configs[(h.name, "alone")] = h.config("alone", uri, conf, alone, f"lv-{alone}")
                took = populate(h, configs[(h.name, "alone")], args.disks)
                print(f"alone pool:  {h.name} made {args.disks} disks in {took:.1f} s")
            times: dict[tuple[str, str], list[float]] = {
                (h.name, v): [] for h in measured for v in ("shared", "alone")
            }
            for h in measured:  # a warm-up of each, unmeasured (page cache, bytecode)
                noop(h, configs[(h.name, "shared")])
                noop(h, configs[(h.name, "alone")])
            for r in range(args.rounds):
                for h in measured:
                    order = ("alone", "shared") if r % 2 == 0 else ("shared", "alone")
                    for variant in order:
                        times[(h.name, variant)].append(noop(h, configs[(h.name, variant)]))
            load = os.getloadavg()
            print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            lines = []
            for h in measured:
                a = statistics.median(times[(h.name, "alone")])
                s = statistics.median(times[(h.name, "shared")])
                print(
                    f"{h.name}: no-op plan of {args.disks} disks alone {a:.2f} s "
                    f"[{min(times[(h.name, 'alone')]):.2f}-{max(times[(h.name, 'alone')]):.2f}]"
                    f", in the pool of {args.hosts * args.disks} disks {s:.2f} s "
                    f"[{min(times[(h.name, 'shared')]):.2f}-{max(times[(h.name, 'shared')]):.2f}]"
                )
                ratio = s / a
                verdict = "PASS" if ratio <= 1.2 else "FAIL"
                lines.append(
                    f"target: {h.name} no-op plan among {args.hosts} hosts vs alone: "
                    f"{ratio:.2f}x (want <= 1.2x) -> {verdict}"
                )
                verdict = "PASS" if s <= 0.4 else "FAIL"
                lines.append(
                    f"target: {h.name} no-op plan of {args.disks} disks among {args.hosts} "
                    f"hosts: {s:.2f} s (want <= 0.4 s) -> {verdict}"
                )
            print("\n".join(lines))
    finally:
        for name, io, lv in made:
            lv.undefine()
            drop_pool(cluster, name, io)
        conn.close()
        cluster.shutdown()


if __name__ == "__main__":
    main()
