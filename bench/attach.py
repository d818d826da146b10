"""Benchmark: the commands a compute service calls, `reconcile disks` and `reconcile wait`,
against bare baselines measured in the same run.

    .venv/bin/python bench/attach.py [--instances 1000] [--rounds 5]

The state is bench/plan.py's (built by its code, in a private libvirtd started here): N
instances, each with a qcow2 root, an ext4 ephemeral and a swap disk in one libvirt dir
pool, every volume made and recorded READY. Each round, in alternating order (ABBA):

  * disks: `reconcile disks --config C -m DIR UUID...` for all N instances, as a new
    process (interpreter start included): their `<disk>` elements as XML;
  * disks floor: the bare work in this process, sequential: one SELECT of the records,
    and for every disk the libvirt lookup a domain's XML is usually built from
    (storageVolLookupByName + path());
  * wait: the first instance's root record is set back to `creating` (as apply leaves it
    while it makes the disk), `reconcile wait --config C -m DIR UUID --timeout 60` is
    started, and once it has looked (its first progress line), after a random pause
    within its 1 s interval, the record is made READY again through the store as apply
    writes it. Timed: from that commit to the wait's exit;
  * wait floor: a bare poll of the same condition started beside it, a process that
    reads the record's state with one SELECT every 10 ms: from the same commit to its exit.

The package is compiled to bytecode first, as an installed one is (compile_bytecode).
Medians over the rounds, with ranges. The targets (issue 27):

  * disks for 1,000 instances < 1.0 s;
  * wait returns within 50 ms of readiness.

Both are absolute: a loaded machine inflates them; the floors, measured in the same
rounds, say by how much. Targets are reported, not asserted (exit 0 unless the run
itself failed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.plan import (
    RECONCILE,
    ROOT,
    BenchError,
    Daemon,
    Setup,
    build,
    instance_uuid,
    log,
    machine_load,
    remove_pool,
    run_child,
)
from reconciler.drivers.host.store import open_store
from reconciler.model.naming import volume_name
from reconciler.model.record import RecordState
from reconciler.schema.load import load_config

ROUNDS = 5
INSTANCES = 1000
TARGET_INSTANCES = 1000
TARGET_DISKS_S = 1.0  # `reconcile disks` for 1,000 instances
TARGET_WAIT_S = 0.050  # from readiness to `reconcile wait`'s exit
WAIT_INTERVAL_S = 1.0  # `reconcile wait`'s default --interval
ROOT_DISK = "disk"  # the first disk of every instance (bench/plan.py's DISKS_YAML)

# The bare poll: the record's state, one SELECT every 10 ms, exit 0 once it is ready.
BARE_POLL = """
import json, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
while True:
    row = db.execute("SELECT data FROM records WHERE pool=? AND volume=?",
                     (sys.argv[2], sys.argv[3])).fetchone()
    if row is not None and json.loads(row[0])["state"] == "ready":
        sys.exit(0)
    time.sleep(0.01)
"""


def disks_argv(s: Setup, instances: list[str]) -> list[str]:
    return [str(RECONCILE), "disks", "--config", str(s.config), "-m", str(s.manifests), *instances]


def run_disks(s: Setup, scratch: Path, instances: list[str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of `reconcile disks`."""
    r = run_child(disks_argv(s, instances), scratch)
    if r.exit_code != 0:
        raise BenchError(f"reconcile disks failed (exit {r.exit_code}): {r.stderr[-2000:]}")
    docs = [d for d in r.stdout.split("\n\n") if d.strip()]
    if len(docs) != len(instances):
        raise BenchError(f"reconcile disks gave {len(docs)} documents for {len(instances)}")
    for doc in (docs[0], docs[-1]):
        if len(ET.fromstring(doc).findall("disk")) != 3:
            raise BenchError(f"reconcile disks: not 3 <disk> elements: {doc[:500]}")
    return r.wall_s, r.cpu_s


def disks_floor(s: Setup, instances: list[str]) -> float:
    """One SELECT of the records, and a libvirt lookup of every disk's volume path."""
    t0 = time.perf_counter()
    db = sqlite3.connect(str(s.db))
    try:
        rows = db.execute("SELECT pool, volume, data FROM records").fetchall()
    finally:
        db.close()
    conn = libvirt.open(s.uri)
    try:
        pool = conn.storagePoolLookupByName(s.libvirt_pool)
        paths = [
            pool.storageVolLookupByName(volume_name(i, d)).path()
            for i in instances
            for d in (ROOT_DISK, "disk.eph0", "disk.swap")
        ]
    finally:
        conn.close()
    took = time.perf_counter() - t0
    if len(paths) != 3 * len(instances) or len(rows) < len(paths):
        raise BenchError(f"disks floor saw {len(paths)} paths, {len(rows)} records")
    return took


@dataclass
class WaitRun:
    wait_s: float  # commit of the READY record -> `reconcile wait` exited
    bare_s: float  # the same commit -> the bare poll exited
    looked_s: float  # spawn -> the wait's first progress line


def set_state(s: Setup, instance: str, state: RecordState) -> float:
    """Write the instance's root record in `state` as apply does (a durable put, the
    generation checked); the moment the commit returned."""
    store = open_store(load_config(str(s.config)).state_dir())
    try:
        vol = volume_name(instance, ROOT_DISK)
        rec = store.get("bench", vol)
        if rec is None:
            raise BenchError(f"no record for {vol}")
        new = rec.model_copy(update={"state": state, "generation": rec.generation + 1})
        store.put(new, rec.generation)
        return time.perf_counter()
    finally:
        store.close()


def _stamp(p: subprocess.Popen[bytes], out: list[float]) -> None:
    p.wait()
    out.append(time.perf_counter())


def wait_once(s: Setup, scratch: Path, instance: str) -> WaitRun:
    set_state(s, instance, RecordState.CREATING)
    err_path = scratch / "wait.stderr"
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    argv = [
        str(RECONCILE),
        *("wait", "--config", str(s.config), "-m", str(s.manifests), instance),
        *("--timeout", "60"),
    ]
    bare_argv = [
        sys.executable,
        "-c",
        BARE_POLL,
        str(s.db),
        "bench",
        volume_name(instance, ROOT_DISK),
    ]
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        waiter = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
    bare = subprocess.Popen(bare_argv)
    try:
        # The wait has looked once (and found the disk being made) when it prints progress.
        deadline = time.monotonic() + 30
        while err_path.stat().st_size == 0:
            if waiter.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"reconcile wait did not start: {err_path.read_text()[-2000:]}")
            time.sleep(0.005)
        looked = time.perf_counter() - t0
        if "creating" not in err_path.read_text():
            raise BenchError(f"reconcile wait saw no disk being made: {err_path.read_text()}")
        time.sleep(random.uniform(0.0, WAIT_INTERVAL_S))  # anywhere in its interval
        ends: dict[str, list[float]] = {"wait": [], "bare": []}
        threads = [
            threading.Thread(target=_stamp, args=(p, ends[k]))
            for k, p in (("wait", waiter), ("bare", bare))
        ]
        for t in threads:
            t.start()
        ready_at = set_state(s, instance, RecordState.READY)
        for t in threads:
            t.join(60)
    finally:
        for p in (waiter, bare):
            if p.poll() is None:
                p.kill()
                p.wait()
    if waiter.returncode != 0 or bare.returncode != 0:
        raise BenchError(
            f"reconcile wait exit {waiter.returncode}, bare poll exit {bare.returncode}: "
            f"{err_path.read_text()[-2000:]}"
        )
    return WaitRun(ends["wait"][0] - ready_at, ends["bare"][0] - ready_at, looked)


@dataclass
class Rounds:
    disks: list[float] = field(default_factory=list)
    disks_cpu: list[float] = field(default_factory=list)  # its user + system time
    disks_floor: list[float] = field(default_factory=list)
    wait: list[WaitRun] = field(default_factory=list)


def time_rounds(s: Setup, scratch: Path, rounds: int) -> Rounds:
    instances = [instance_uuid(i) for i in range(1, s.n // 3 + 1)]
    out = Rounds()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("disks", lambda: run_disks(s, scratch, instances)),
        ("disks_floor", lambda: disks_floor(s, instances)),
        ("wait", lambda: wait_once(s, scratch, instances[0])),
    ]
    for i in range(rounds + 1):
        got = {name: fn() for name, fn in (steps if i % 2 == 0 else steps[::-1])}
        w = got["wait"]
        disks, cpu = got["disks"]
        label = "warm-up" if i == 0 else f"round {i}"
        log(
            f"{label}: disks {disks:.3f} s ({cpu:.2f} s CPU), floor {got['disks_floor']:.3f} s; "
            f"wait {w.wait_s * 1000:.0f} ms after ready (bare poll {w.bare_s * 1000:.0f} ms, first "
            f"look {w.looked_s:.2f} s); {machine_load()}"
        )
        if i > 0:
            out.disks.append(disks)
            out.disks_cpu.append(cpu)
            out.disks_floor.append(got["disks_floor"])
            out.wait.append(w)
    return out


def _span(values: list[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    return f"{min(values) * scale:{fmt}}-{max(values) * scale:{fmt}}"


def report(n_instances: int, r: Rounds, rounds: int) -> None:
    disks, floor = statistics.median(r.disks), statistics.median(r.disks_floor)
    ratios = [a / b for a, b in zip(r.disks, r.disks_floor, strict=True)]
    waits = [w.wait_s for w in r.wait]
    bares = [w.bare_s for w in r.wait]
    wait, bare = statistics.median(waits), statistics.median(bares)
    print()
    print(f"reconcile disks / wait, {n_instances} instances x 3 disks, {rounds} rounds (ABBA)")
    print(f"after a warm-up round; medians, ranges in brackets. {os.cpu_count()} CPUs;")
    print(f"machine load when printed: {machine_load()}")
    print()
    print(f"  disks        {disks:6.3f} s [{_span(r.disks)}]")
    cpu = statistics.median(r.disks_cpu)
    print(f"  disks CPU    {cpu:6.3f} s [{_span(r.disks_cpu)}]  (user + system: less bent by load)")
    print(f"  disks floor  {floor:6.3f} s [{_span(r.disks_floor)}]  (SELECT + volume lookups)")
    print(f"  disks/floor  {disks / floor:6.2f}x [{_span(ratios, fmt='.2f')}]")
    print(f"  wait         {wait * 1000:6.0f} ms after ready [{_span(waits, 1000, '.0f')}]")
    print(f"  bare poll    {bare * 1000:6.0f} ms after ready [{_span(bares, 1000, '.0f')}]")
    print()
    if n_instances == TARGET_INSTANCES:
        print(
            f"target: reconcile disks for {TARGET_INSTANCES} instances: {disks:.3f} s "
            f"(want < {TARGET_DISKS_S:.1f} s) -> {'PASS' if disks < TARGET_DISKS_S else 'FAIL'}"
        )
    else:
        print(
            f"target: reconcile disks for {TARGET_INSTANCES} instances: not measured "
            f"(want < {TARGET_DISKS_S:.1f} s) -> FAIL"
        )
    print(
        f"target: reconcile wait after readiness: {wait * 1000:.0f} ms "
        f"(want <= {TARGET_WAIT_S * 1000:.0f} ms) -> {'PASS' if wait <= TARGET_WAIT_S else 'FAIL'}"
    )


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def compile_bytecode() -> None:
    """The package's modules compiled, as an installed package's are (pip and `uv pip
    --compile-bytecode` compile them): .venv holds this checkout as an editable install,
    and where the environment forbids writing __pycache__ (PYTHONDONTWRITEBYTECODE) every
    `reconcile` started here compiled ~90 modules again (0.5-0.6 s of CPU, cProfile), which
    the warm-up round cannot cache."""
    import compileall

    if not compileall.compile_dir(str(ROOT / "reconciler"), quiet=1):
        raise BenchError("compiling the reconciler package failed")


def run(args: argparse.Namespace) -> int:
    if not RECONCILE.exists():
        raise BenchError(f"{RECONCILE} not found; install the project into .venv")
    compile_bytecode()
    root = Path(tempfile.mkdtemp(prefix="ra", dir="/tmp"))
    daemon = Daemon(root / "lv")
    conn: Any = None
    s: Setup | None = None
    try:
        uri = daemon.start()
        log(f"libvirtd in {daemon.dir}: {uri}; {machine_load()}")
        conn = libvirt.open(uri)
        scratch = root / "out"
        scratch.mkdir()
        n = 3 * args.instances
        log(f"generating {args.instances} manifests, {n} volumes and records in {root}")
        s = build(root, n, uri, conn)
        log(f"setup took {s.setup_s:.1f} s")
        report(args.instances, time_rounds(s, scratch, args.rounds), args.rounds)
    finally:
        if conn is not None:
            if s is not None:
                remove_pool(conn, s)
            conn.close()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _positive(text: str) -> int:
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    raise argparse.ArgumentTypeError(f"expected a whole number of at least 1: {text!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--instances", type=_positive, default=INSTANCES, help="default 1000")
    p.add_argument("--rounds", type=_positive, default=ROUNDS, help=f"default {ROUNDS}")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench/attach.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
