"""An idle `reconcile watch` on a shared Ceph pool: the RADOS operations it sends per
minute must not grow with the instances it keeps (issue 27: "heartbeats are per host, not
per instance").

    .venv/bin/python bench/watch_rados.py [--small 100] [--large 1000] [--windows 4]

In one run, on this checkout's Ceph cluster and private libvirtd (started if needed):
  small    a host with --small instances (one 4 MiB blank rbd disk each) in a Ceph pool of
           its own, made by its own `reconcile --jobs 8`;
  large    the same with --large instances.
Then one `reconcile watch` per host runs at the same time, idle (nothing to do), each with a
client admin socket of its own (a copy of the cluster's conf naming it), and the OSD
operations its librados client sends (the objecter's `op` counter: every read, write and
omap call to an OSD; monitor commands are not RADOS operations) are counted over --windows
windows, each from just after one resync to just after the --resyncs-th next (the same
number of resyncs in every window), once each watch has finished two resyncs. The loop's
periods are shortened so a window sees several of each: --resync-interval (default 10 s)
and ownership.heartbeatExpiry (default 40 s: a heartbeat every 10 s); the figure is given
per minute. Reported: the median and range of each host's
operations per minute; the target is that the large host's figure is the small one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory would hide Debian's `rbd` module (bench/rbd.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.rbd import drop_pool, mon_v1_port, new_pool, start_daemons  # noqa: E402
from bench.rbd_hosts import write_manifests  # noqa: E402

ROOT = _HERE.parent
# $BENCH_RECONCILE: another reconciler's command line (e.g. a baseline checkout's).
RECONCILE = os.environ.get("BENCH_RECONCILE", str(ROOT / ".venv" / "bin" / "reconcile")).split()
MiB = 1 << 20


def asok_command(path: str, prefix: str) -> Any:
    """One admin socket command (the `ceph daemon` protocol: a JSON command, NUL; the
    reply is a big-endian u32 length and that many bytes of JSON)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps({"prefix": prefix}).encode() + b"\0")
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                raise OSError(f"{path}: closed")
            head += chunk
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                raise OSError(f"{path}: closed")
            body += chunk
    return json.loads(body)


class Host:
    def __init__(self, work: Path, label: str, instances: int) -> None:
        self.label = label
        self.name = f"watch-{label}"
        self.instances = instances
        self.work = work / label
        self.manifests = self.work / "manifests"
        write_manifests(self.manifests, self.name, instances)
        self.asok = str(self.work / "client.asok")
        self.proc: subprocess.Popen[str] | None = None
        self.log = self.work / "watch.log"

    def configure(self, uri: str, conf: str, pool: str, lv_pool: str, expiry: float) -> None:
        # The cluster's conf, with a client admin socket of this host's own.
        text = Path(conf).read_text().replace("admin_socket =\n", f"admin_socket = {self.asok}\n")
        if f"admin_socket = {self.asok}" not in text:
            raise SystemExit(f"{conf}: no `admin_socket =` line to replace")
        own = self.work / "ceph.conf"
        own.write_text(text)
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "host": self.name,
            "state": {"dir": str(self.work / "state")},
            "safety": {"maxDeletePercent": 100},
            "ownership": {"heartbeatExpiry": expiry},
            "pools": {
                "ceph": {
                    "uri": uri,
                    "libvirtPool": lv_pool,
                    "backends": ["rbd"],
                    "ceph": {"conf": str(own), "pool": pool},
                }
            },
        }
        self.config = self.work / "config.yaml"
        self.config.write_text(json.dumps(cfg))

    def populate(self) -> float:
        t = time.monotonic()
        res = subprocess.run(
            [*RECONCILE, "--config", str(self.config), "--jobs", "8", str(self.manifests)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if res.returncode != 0 or res.stdout.count("created ") < self.instances:
            raise SystemExit(f"{self.name}: populating failed:\n{res.stdout[-2000:]}{res.stderr}")
        if os.path.exists(self.asok):
            os.unlink(self.asok)  # the one-shot run's socket, left behind by its fast exit
        return time.monotonic() - t

    def start(self, resync: float) -> None:
        self.out = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                *RECONCILE,
                "--config",
                str(self.config),
                "watch",
                "--resync-interval",
                str(resync),
                str(self.manifests),
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )

    def resyncs(self) -> int:
        n = 0
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "resync":
                n += 1
        return n

    def wait_resyncs(self, n: int) -> int:
        """Wait until the watch has logged `n` resyncs; how many it has."""
        deadline = time.monotonic() + 600
        while (got := self.resyncs()) < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: watch exited:\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: no resync in 600 s")
            time.sleep(0.05)  # polling a log file a process writes: nothing to wait on
        return got

    def ops(self) -> int:
        dump = asok_command(self.asok, "perf dump")
        return int(dump["objecter"]["op"])

    def check_idle(self) -> None:
        """The watch did nothing but observe: no action was applied."""
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "action":
                raise SystemExit(f"{self.name}: the watch was not idle: {line}")
            if doc.get("event") == "resync" and doc.get("queued"):
                raise SystemExit(f"{self.name}: a resync queued work: {line}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.out.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--large", type=int, default=1000)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--resyncs", type=int, default=4, help="resyncs per window")
    p.add_argument("--resync-interval", type=float, default=10.0)
    p.add_argument("--heartbeat-expiry", type=float, default=40.0)
    args = p.parse_args()
    import libvirt
    import rados

    conf, uri = start_daemons()
    cluster = rados.Rados(conffile=conf, name="client.admin")
    cluster.connect()
    conn = libvirt.open(uri)
    made: list[tuple[str, Any, Any]] = []
    hosts: list[Host] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        for label, n in (("small", args.small), ("large", args.large)):
            pool, io = new_pool(cluster)
            lv = conn.storagePoolDefineXML(
                f"<pool type='rbd'><name>lv-{pool}</name><source><name>{pool}</name>"
                f"<host name='127.0.0.1' port='{mon_v1_port(cluster)}'/></source></pool>"
            )
            made.append((pool, io, lv))
            h = Host(tmp, label, n)
            h.configure(uri, conf, pool, f"lv-{pool}", args.heartbeat_expiry)
            took = h.populate()
            print(f"{h.name}: {n} instances made in {took:.1f} s", flush=True)
            hosts.append(h)
        for h in hosts:
            h.start(args.resync_interval)
        deadline = time.monotonic() + 600
        while any(h.resyncs() < 2 for h in hosts):  # the first resync and one idle one
            for h in hosts:
                if h.proc is not None and h.proc.poll() is not None:
                    raise SystemExit(f"{h.name}: watch exited:\n{h.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("the watches did not finish two resyncs in 600 s")
            time.sleep(0.5)  # polling a log file a process writes: nothing to wait on
        per_min: dict[str, list[float]] = {h.label: [] for h in hosts}
        per_resync: dict[str, list[float]] = {h.label: [] for h in hosts}

        def measure(h: Host) -> None:
            # Each window runs from just after one resync to just after the --resyncs-th
            # next one, so every window holds the same number of resyncs.
            for _ in range(args.windows):
                first = h.wait_resyncs(h.resyncs() + 1)
                start, t0 = h.ops(), time.monotonic()
                h.wait_resyncs(first + args.resyncs)
                took = time.monotonic() - t0
                ops = h.ops() - start
                per_min[h.label].append(ops * 60.0 / took)
                per_resync[h.label].append(ops / args.resyncs)

        threads = [threading.Thread(target=measure, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(len(v) < args.windows for v in per_min.values()):
            raise SystemExit("a measurement failed (see above)")
        for h in hosts:
            h.check_idle()
        load = os.getloadavg()
        print(
            f"idle watch, resync every {args.resync_interval:g} s, heartbeat every "
            f"{args.heartbeat_expiry / 4:g} s, {args.windows} windows of {args.resyncs} resyncs "
            f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}):"
        )
        med = {}
        for h in hosts:
            xs = per_min[h.label]
            med[h.label] = statistics.median(xs)
            print(
                f"  {h.name}: {h.instances} instances: {med[h.label]:.1f} RADOS ops/min "
                f"[{min(xs):.1f}-{max(xs):.1f}], "
                f"{statistics.median(per_resync[h.label]):.1f} per resync with its heartbeats"
            )
        ratio = med["large"] / med["small"] if med["small"] else float("inf")
        # "The same": within one heartbeat's or one resync's jitter of a window, 10 %.
        verdict = "PASS" if ratio <= 1.1 else "FAIL"
        print(
            f"target: idle watch RADOS ops/min at {args.large} vs {args.small} instances: "
            f"{med['large']:.1f} vs {med['small']:.1f} = {ratio:.2f}x (want the same, "
            f"<= 1.1x) -> {verdict}"
        )
    finally:
        for h in hosts:
            h.stop()
        for pool, io, lv in made:
            lv.undefine()
            drop_pool(cluster, pool, io)
        conn.close()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
