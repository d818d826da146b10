"""The control loop's speed: `reconcile watch` over 10,000 converged instances.

    .venv/bin/python bench/loop.py [--instances 10000] [--manifests 100] [--idle 20]

In one run, on one private libvirtd (started and stopped here):
  state      N instances, each one raw 1 MiB blank disk, converged: manifests, sparse
             volumes in a dir pool and a READY record each (written directly, as apply
             would leave them);
  loop       `reconcile watch` started over them; its first full read and resync, and
             the first periodic resync (after the idle window), are timed from its own
             log, with the libvirt calls each made;
  idle       its CPU time (utime + stime from /proc) over --idle seconds with nothing to
             do, and its memory (VmRSS, VmHWM) with the N instances loaded;
  latency    M new manifests written one at a time (temp file + rename), each timed until
             its volume exists, against a baseline measured in the same run: the same
             create through bare libvirt createXML.
Targets (issue "The control loop"): latency minus the bare create under 0.2 s, median and
p95; idle CPU under 1% of one core. Memory and the resync are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.drivers.host.store import open_store
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.manifest import DiskSpec
from reconciler.schema.write import write_atomic

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "libvirtd.sh"
SIZE = 1 << 20
TARGET_LATENCY = 0.2
TARGET_IDLE_CPU = 1.0  # percent of one core
CLK_TCK = os.sysconf("SC_CLK_TCK")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def manifest(inst: str) -> dict[str, Any]:
    return {
        "apiVersion": "reconciler/v1",
        "kind": "InstanceStorage",
        "instance": inst,
        "disks": [
            {
                "name": "disk",
                "backend": "flat",
                "pool": "bench",
                "format": "raw",
                "size": SIZE,
                "source": {"template": "blank"},
            }
        ],
    }


def build(work: Path, n: int) -> None:
    """N converged instances: manifests, sparse volumes and READY records."""
    mdir, pool, state = work / "manifests", work / "pool", work / "state"
    mdir.mkdir()
    store = open_store(state)
    try:
        for i in range(n):
            inst = str(uuid.UUID(int=i + 1))
            doc = manifest(inst)
            (mdir / f"vm{i:05d}.yaml").write_text(json.dumps(doc))
            spec = DiskSpec.model_validate(doc["disks"][0]).spec_dict()
            vol = volume_name(inst, "disk")
            with open(pool / vol, "wb") as f:
                f.truncate(SIZE)
            store.put(
                DiskRecord(
                    kind=RecordKind.DISK,
                    backend="flat",
                    pool="bench",
                    volume=vol,
                    instance=inst,
                    disk="disk",
                    format="raw",
                    virtual_size=SIZE,
                    spec=spec,
                    source=dict(spec["source"]),
                    state=RecordState.READY,
                    generation=2,
                ),
                None,
                durable=False,
            )
        store.sync()
    finally:
        store.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


class Log:
    """The loop's JSON log lines, read on a thread; wait for an event with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"event": "text", "text": raw.rstrip()}
            with self.cond:
                self.lines.append(doc)
                self.cond.notify_all()
        with self.cond:
            self.lines.append({"event": "exited"})
            self.cond.notify_all()

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        return self.wait_nth(event, 1, timeout)

    def wait_nth(self, event: str, nth: int, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                seen = 0
                for doc in self.lines:
                    if doc.get("event") == event:
                        seen += 1
                        if seen == nth:
                            return doc
                    if doc.get("event") == "exited":
                        sys.exit(f"bench: the loop exited: {self.lines[-20:]}")
                left = end - time.monotonic()
                if left <= 0:
                    sys.exit(f"bench: no {event!r} from the loop in {timeout} s")
                self.cond.wait(left)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--manifests", type=int, default=100)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle measured")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rcl-loop-", dir="/tmp"))
    daemon = work / "d"
    proc: subprocess.Popen[str] | None = None
    try:
        uri = subprocess.run(
            [str(SCRIPT), "start", str(daemon)], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        conn = libvirt.open(uri)
        for name in ("pool", "bare"):
            (work / name).mkdir()
            conn.storagePoolDefineXML(
                f"<pool type='dir'><name>bench-{name}</name><target><path>{work / name}"
                "</path></target></pool>"
            ).create(0)
        t = time.perf_counter()
        build(work, args.instances)
        print(f"built {args.instances} converged instances in {time.perf_counter() - t:.1f} s")
        cfg = work / "config.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "apiVersion": "reconciler/v1",
                    "kind": "Config",
                    "state": {"dir": str(work / "state")},
                    "pools": {
                        "bench": {"uri": uri, "libvirtPool": "bench-pool", "backends": ["flat"]}
                    },
                }
            )
        )
        started = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reconciler",
                "watch",
                "--config",
                str(cfg),
                "--resync-interval",
                str(args.idle + 3),
                str(work / "manifests"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        log = Log(proc)
        resync = log.wait("resync", timeout=600)
        log.wait("ready", timeout=600)
        to_ready = time.perf_counter() - started

        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        threading.Event().wait(args.idle)  # the idle period being measured
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        idle_pct = 100 * (cpu1 - cpu0) / (t1 - t0)
        mem = memory(proc.pid)
        # The first periodic resync comes after the idle window: the steady-state one.
        again = log.wait_nth("resync", 2, timeout=600)

        # Baseline: the same create through bare libvirt.
        bare_pool = conn.storagePoolLookupByName("bench-bare")
        bare = []
        for i in range(args.manifests):
            t = time.perf_counter()
            bare_pool.createXML(
                f"<volume><name>b{i}</name><capacity unit='bytes'>{SIZE}</capacity>"
                "<allocation>0</allocation><target><format type='raw'/></target></volume>",
                0,
            )
            bare.append(time.perf_counter() - t)
        bare_median = statistics.median(bare)

        latencies = []
        mdir = work / "manifests"
        for i in range(args.manifests):
            inst = str(uuid.UUID(int=10**9 + i))
            vol = work / "pool" / volume_name(inst, "disk")
            t = time.perf_counter()
            write_atomic(str(mdir / f"new{i:03d}.yaml"), json.dumps(manifest(inst)))
            end = t + 30
            while not vol.exists():
                if time.perf_counter() > end:
                    sys.exit(f"bench: {vol.name} not made within 30 s")
                time.sleep(0.0005)  # polling the pool for the result being timed
            latencies.append(time.perf_counter() - t)
        lat = sorted(x - bare_median for x in latencies)
        median = statistics.median(lat)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        conn.close()

        n = args.instances
        print(f"loop ready over {n} instances in {to_ready:.2f} s (process start included)")
        print(
            f"first resync: {resync['seconds']:.2f} s over {resync['instances']} instances, "
            f"{resync['libvirt_calls']} libvirt calls"
        )
        print(
            f"periodic resync (steady state): {again['seconds']:.2f} s over "
            f"{again['instances']} instances, {again['libvirt_calls']} libvirt calls"
        )
        print(f"memory with {n} instances: VmRSS {mem['VmRSS']} MiB, VmHWM {mem['VmHWM']} MiB")
        print(f"idle CPU over {t1 - t0:.1f} s: {idle_pct:.2f}% of one core")
        print(
            f"bare createXML: median {bare_median * 1000:.1f} ms; manifest -> volume minus it: "
            f"median {median * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms over {len(lat)}"
        )
        print(
            f"target: latency minus bare create, median: {median:.3f} s "
            f"(want < {TARGET_LATENCY} s) -> {verdict(median < TARGET_LATENCY)}"
        )
        print(
            f"target: latency minus bare create, p95: {p95:.3f} s "
            f"(want < {TARGET_LATENCY} s) -> {verdict(p95 < TARGET_LATENCY)}"
        )
        print(
            f"target: idle CPU over {n} converged instances: {idle_pct:.2f}% of one core "
            f"(want < {TARGET_IDLE_CPU}%) -> {verdict(idle_pct < TARGET_IDLE_CPU)}"
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"kept: {work}")
        else:
            subprocess.run([str(SCRIPT), "stop", str(daemon)], check=False)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
