"""Benchmark: a converged `reconcile --dry-run --output json` at 3,000 and 30,000 disks.

    .venv/bin/python bench/plan.py [--sizes 3000,30000] [--keep] [--profile]

For each size N (disks; N/3 instances with a qcow2 root from an image, an ext4 ephemeral
and a swap disk, all in one libvirt dir pool) this builds, under a short /tmp directory:
N/3 manifests, a config pointing at a private libvirtd started here, a pool directory
holding the N volumes (sparse files; the qcow2 roots carry a real qcow2 header so nothing
disagrees with the records) and a READY record for every volume. The plan is therefore
empty. It then times the CLI end to end as a child process (median of 3 after a warm-up,
with the child's peak RSS from wait4) next to a baseline of the bare work done with plain
PyYAML, libvirt and sqlite3 calls, and reports the targets from the issue:

  * the 30,000-disk run takes at most 3 s wall and 400 MiB peak RSS (2-core machines);
  * the 30,000-disk run takes at most 12x the 3,000-disk run.

Targets are reported, not asserted: the exit status is 0 unless the run itself failed (a
setup error, or a reconcile run that did not produce an empty plan). `--profile` also runs
the 30,000 case once in-process under cProfile and prints a per-stage breakdown.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import libvirt
import yaml

from reconciler.drivers.filepool import LIBVIRT_VOL_LIST_MAX, template_entry_name
from reconciler.naming import volume_name
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.load import LoadedManifest, load_config, load_manifest
from reconciler.schema.record import DiskRecord, RecordKind, RecordState
from reconciler.store import open_store

ROOT = Path(__file__).resolve().parent.parent
LIBVIRTD_SH = ROOT / "scripts" / "libvirtd.sh"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"

DEFAULT_SIZES = (3_000, 30_000)
PROFILE_SIZE = 30_000
RUNS = 3
TARGET_N = 30_000
TARGET_WALL_S = 3.0
TARGET_RSS_MIB = 400.0
SCALE_SMALL, SCALE_LARGE = 3_000, 30_000
TARGET_SCALING = 12.0

POOL = "bench"  # the pool's name in the config (the libvirt pool is bench-<N>)
IMAGE = "tiny-linux"
IMAGE_SIZE = 1 << 20
ROOT_SIZE = 1 << 30

# The three disks of every instance, in the order the manifest lists them.
DISKS_YAML = """\
  - name: disk
    backend: qcow2
    pool: {pool}
    format: qcow2
    size: 1GiB
    source:
      image: {image}
  - name: disk.eph0
    backend: flat
    pool: {pool}
    format: raw
    size: 512MiB
    source:
      template: ext4
      label: ephemeral0
  - name: disk.swap
    backend: flat
    pool: {pool}
    format: raw
    size: 128MiB
    source:
      template: swap
"""

MANIFEST_YAML = """\
# bench instance {index}
apiVersion: reconciler/v1
kind: InstanceStorage
instance: {instance}
disks:
"""

CONFIG_YAML = """\
apiVersion: reconciler/v1
kind: Config
state:
  dir: "{state}"
pools:
  {pool}:
    uri: "{uri}"
    libvirtPool: {libvirt_pool}
    backends: [flat, qcow2]
images:
  {image}:
    location: "file://{image_path}"
    format: raw
    sha256: "{sha}"
    size: {image_size}
safety:
  maxDeletePercent: 10
"""

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not run, or timed something that is not a clean empty plan."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def instance_uuid(i: int) -> str:
    return str(uuid.UUID(int=i))


# -- the private libvirtd ----------------------------------------------------------------


class Daemon:
    """A private libvirtd started with scripts/libvirtd.sh in its own directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.uri = ""

    def start(self) -> str:
        res = subprocess.run(
            [str(LIBVIRTD_SH), "start", str(self.dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0 or not res.stdout.strip():
            raise BenchError(f"could not start libvirtd in {self.dir}: {res.stderr.strip()}")
        self.uri = res.stdout.strip().splitlines()[-1]
        return self.uri

    def stop(self) -> None:
        res = subprocess.run(
            [str(LIBVIRTD_SH), "stop", str(self.dir)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            log(f"warning: stopping libvirtd in {self.dir} failed: {res.stderr.strip()}")


# -- the generated state -----------------------------------------------------------------


@dataclass
class Setup:
    n: int
    dir: Path
    uri: str
    libvirt_pool: str
    config: Path
    manifests: Path
    pool_dir: Path
    db: Path
    setup_s: float = 0.0


def qcow2_layout(path: Path, size: int) -> tuple[int, list[tuple[int, bytes]]]:
    """A freshly made qcow2 image as (file length, non-zero 4 KiB blocks).

    Written into every root volume, it gives a valid qcow2 file that stays sparse. Without
    qemu-img, a bare version 3 header is used (enough for libvirt's and our header probes).
    """
    if shutil.which("qemu-img"):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
            check=True,
            capture_output=True,
        )
        data = path.read_bytes()
        path.unlink()
        blocks = [
            (off, data[off : off + 4096])
            for off in range(0, len(data), 4096)
            if data[off : off + 4096].strip(b"\0")
        ]
        return len(data), blocks
    cluster_bits = 16
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQII",
        b"QFI\xfb",
        3,  # version
        0,  # backing_file_offset
        0,  # backing_file_size
        cluster_bits,
        size,
        0,  # crypt_method
        1,  # l1_size
        3 << cluster_bits,  # l1_table_offset
        1 << cluster_bits,  # refcount_table_offset
        1,  # refcount_table_clusters
        0,  # nb_snapshots
        0,  # snapshots_offset
        0,  # incompatible_features
        0,  # compatible_features
        0,  # autoclear_features
        4,  # refcount_order
        104,  # header_length
    )
    return 4 << cluster_bits, [(0, header)]


def write_config(s: Setup, state: Path, image_path: Path) -> None:
    image = b"\0" * IMAGE_SIZE
    image_path.write_bytes(image)
    s.config.write_text(
        CONFIG_YAML.format(
            state=state,
            pool=POOL,
            uri=s.uri,
            libvirt_pool=s.libvirt_pool,
            image=IMAGE,
            image_path=image_path,
            sha=hashlib.sha256(image).hexdigest(),
            image_size=IMAGE_SIZE,
        )
    )


def write_manifests(s: Setup) -> None:
    s.manifests.mkdir()
    disks = DISKS_YAML.format(pool=POOL, image=IMAGE)
    for i in range(1, s.n // 3 + 1):
        text = MANIFEST_YAML.format(index=i, instance=instance_uuid(i)) + disks
        (s.manifests / f"i{i:06d}.yaml").write_text(text)


def disk_specs(s: Setup) -> list[tuple[str, dict[str, Any]]]:
    """(disk name, DiskSpec.spec_dict()) of every disk, from the manifests themselves.

    All instances have the same disks; the first and the last manifest are loaded and
    validated against the config to make sure the generated files are what we think.
    """
    config = load_config(str(s.config))
    specs: list[list[tuple[str, dict[str, Any]]]] = []
    for i in (1, s.n // 3):
        lm = load_manifest(str(s.manifests / f"i{i:06d}.yaml"), config)
        if not isinstance(lm, LoadedManifest):
            raise BenchError(f"generated manifest is invalid: {lm.errors}")
        specs.append([(d.name, d.spec_dict()) for d in lm.manifest.disks])
    if specs[0] != specs[1] or len(specs[0]) != 3:
        raise BenchError(f"generated manifests differ: {specs}")
    return specs[0]


def make_volumes(s: Setup, specs: list[tuple[str, dict[str, Any]]]) -> None:
    s.pool_dir.mkdir()
    length, blocks = qcow2_layout(s.dir / "layout.qcow2", ROOT_SIZE)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(1, s.n // 3 + 1):
        inst = instance_uuid(i)
        for name, spec in specs:
            fd = os.open(s.pool_dir / volume_name(inst, name), flags, 0o600)
            try:
                if spec["format"] == "qcow2":
                    for off, data in blocks:
                        os.pwrite(fd, data, off)
                    os.ftruncate(fd, length)
                else:
                    os.ftruncate(fd, int(spec["size"]))
            finally:
                os.close(fd)


def define_pool(conn: Any, s: Setup) -> None:
    xml = (
        f"<pool type='dir'><name>{s.libvirt_pool}</name>"
        f"<target><path>{s.pool_dir}</path></target></pool>"
    )
    pool = conn.storagePoolDefineXML(xml, 0)
    pool.create(0)  # scans the directory: libvirt knows all N volumes from here on
    seen = pool.numOfVolumes()
    if seen != s.n:
        raise BenchError(f"libvirt pool {s.libvirt_pool} holds {seen} volumes, expected {s.n}")


def write_records(s: Setup, specs: list[tuple[str, dict[str, Any]]]) -> None:
    store = open_store(load_config(str(s.config)).state_dir())
    # Setup only: one fsync per put() would make 30,000 records take minutes. The records
    # are still written through SqliteRecordStore.put(), exactly as apply writes them.
    store._db.execute("PRAGMA synchronous=OFF")
    try:
        for i in range(1, s.n // 3 + 1):
            inst = instance_uuid(i)
            for name, spec in specs:
                src = spec["source"]
                backing = None
                if "template" in src and src["template"] != "blank":
                    backing = template_entry_name(
                        src["template"], int(spec["size"]), src.get("label")
                    )
                rec = DiskRecord(
                    kind=RecordKind.DISK,
                    backend=Backend(spec["backend"]),
                    pool=POOL,
                    volume=volume_name(inst, name),
                    instance=inst,
                    disk=name,
                    format=DiskFormat(spec["format"]),
                    virtual_size=int(spec["size"]),
                    spec=spec,
                    source=dict(src),
                    backing=backing,
                    state=RecordState.READY,
                    generation=1,
                )
                store.put(rec, None)
        s.db = store.path
    finally:
        store.close()


def build(root: Path, n: int, uri: str, conn: Any) -> Setup:
    if n <= 0 or n % 3:
        raise BenchError(f"size {n} is not a positive multiple of 3 (3 disks per instance)")
    t0 = time.perf_counter()
    d = root / f"n{n}"
    d.mkdir()
    s = Setup(
        n=n,
        dir=d,
        uri=uri,
        libvirt_pool=f"bench-{n}",
        config=d / "config.yaml",
        manifests=d / "m",
        pool_dir=d / "pool",
        db=Path(),
    )
    write_config(s, d / "state", d / "tiny-linux.raw")
    write_manifests(s)
    specs = disk_specs(s)
    make_volumes(s, specs)
    define_pool(conn, s)
    write_records(s, specs)
    s.setup_s = time.perf_counter() - t0
    return s


def remove_pool(conn: Any, s: Setup) -> None:
    try:
        pool = conn.storagePoolLookupByName(s.libvirt_pool)
        if pool.isActive():
            pool.destroy()
        pool.undefine()
    except libvirt.libvirtError as e:
        log(f"warning: could not remove libvirt pool {s.libvirt_pool}: {e}")


# -- timing the CLI ----------------------------------------------------------------------


@dataclass
class ChildRun:
    wall_s: float
    cpu_s: float  # the child's user + system time: less sensitive to a busy machine
    maxrss_kib: int
    exit_code: int
    stdout: str
    stderr: str


def run_child(argv: list[str], scratch: Path) -> ChildRun:
    """Run argv with stdout/stderr to files; wall time and the child's own peak RSS."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
        ]
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
    return ChildRun(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_kib=usage.ru_maxrss,  # KiB on Linux
        exit_code=os.waitstatus_to_exitcode(status),
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def plan_argv(s: Setup) -> list[str]:
    return ["--dry-run", "--output", "json", "--config", str(s.config), str(s.manifests)]


def check_plan(what: str, exit_code: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The run must be a clean, empty plan, or the benchmark timed the wrong thing."""
    try:
        doc = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise BenchError(
            f"{what}: output is not JSON ({e}); exit {exit_code}\n"
            f"stdout: {stdout[:2000]}\nstderr: {stderr[-4000:]}"
        ) from None
    if not isinstance(doc, dict):
        raise BenchError(f"{what}: output is JSON but not an object: {stdout[:200]}")
    actions, errors = doc.get("actions"), doc.get("errors")
    if actions != [] or errors != [] or exit_code != 0:
        first = (errors or [])[:5] if isinstance(errors, list) else errors
        n_act = len(actions) if isinstance(actions, list) else actions
        raise BenchError(
            f"{what}: expected an empty plan, got exit {exit_code}, {n_act} action(s), "
            f"errors {first}\nstderr: {stderr[-4000:]}"
        )
    return doc


@dataclass
class Result:
    n: int
    setup_s: float
    walls: list[float]
    cpus: list[float]
    rss_kib: list[int]
    startup_s: float
    baseline: list[float]
    warnings: int
    warning_codes: dict[str, int] = field(default_factory=dict)
    cold: float = 0.0

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def rss_mib(self) -> float:
        return max(self.rss_kib) / 1024

    @property
    def base(self) -> float:
        return statistics.median(self.baseline)


def time_cli(
    s: Setup, scratch: Path
) -> tuple[list[float], list[float], list[int], dict[str, Any], float]:
    """The cold run (no manifest cache: every YAML file parsed and validated), then RUNS
    warm runs (unchanged manifests come from the cache in the state directory)."""
    argv = [str(RECONCILE), *plan_argv(s)]
    walls: list[float] = []
    cpus: list[float] = []
    rss: list[int] = []
    doc: dict[str, Any] = {}
    cold = 0.0
    cache = load_config(str(s.config)).state_dir() / "manifest-cache.json"
    for i in range(RUNS + 1):
        if i == 0:
            cache.unlink(missing_ok=True)
        r = run_child(argv, scratch)
        doc = check_plan(f"reconcile run {i} (N={s.n})", r.exit_code, r.stdout, r.stderr)
        label = "cold run (no manifest cache)" if i == 0 else f"run {i}"
        log(
            f"N={s.n} {label}: {r.wall_s:.3f} s wall, {r.cpu_s:.3f} s CPU, "
            f"peak RSS {r.maxrss_kib / 1024:.1f} MiB"
        )
        if i == 0:  # also warms the page cache and libvirtd
            cold = r.wall_s
            rss.append(r.maxrss_kib)
        else:
            walls.append(r.wall_s)
            cpus.append(r.cpu_s)
            rss.append(r.maxrss_kib)
    return walls, cpus, rss, doc, cold


def time_startup(scratch: Path) -> float:
    """Interpreter start plus every import the CLI makes: `reconcile --version`."""
    walls = []
    for _ in range(RUNS + 1):
        r = run_child([str(RECONCILE), "--version"], scratch)
        if r.exit_code != 0:
            raise BenchError(f"reconcile --version failed: {r.stderr}")
        walls.append(r.wall_s)
    return statistics.median(walls[1:])


# -- the baseline ------------------------------------------------------------------------


def baseline_once(s: Setup) -> tuple[float, tuple[int, int, int]]:
    """The bare work: parse every manifest, list the pool, read every record."""
    t0 = time.perf_counter()
    with os.scandir(s.manifests) as it:
        files = sorted(e.path for e in it if e.name.endswith(".yaml"))
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            docs.append(yaml.load(fh.read().decode("utf-8"), Loader=yaml.CSafeLoader))
    conn = libvirt.open(s.uri)
    try:
        pool = conn.storagePoolLookupByName(s.libvirt_pool)
        names: list[str] | None = None
        if pool.numOfVolumes() <= LIBVIRT_VOL_LIST_MAX:
            pool.refresh(0)
            if pool.numOfVolumes() <= LIBVIRT_VOL_LIST_MAX:
                names = [v.name() for v in pool.listAllVolumes(0)]
        if names is None:  # over libvirt's RPC limit: list the directory, as reconcile does
            with os.scandir(s.pool_dir) as it:
                names = [e.name for e in it]
    finally:
        conn.close()
    db = sqlite3.connect(str(s.db))
    try:
        rows = db.execute("SELECT * FROM records").fetchall()
    finally:
        db.close()
    return time.perf_counter() - t0, (len(docs), len(names), len(rows))


def time_baseline(s: Setup) -> list[float]:
    times = []
    for i in range(RUNS + 1):
        t, counts = baseline_once(s)
        if counts != (s.n // 3, s.n, s.n):
            raise BenchError(f"baseline N={s.n} saw (manifests, volumes, records) {counts}")
        if i > 0:
            times.append(t)
    return times


# -- profiling ---------------------------------------------------------------------------


@contextlib.contextmanager
def gc_timer() -> Iterator[list[float]]:
    """Total time spent in the cyclic garbage collector while the block runs."""
    total = [0.0, 0.0]  # seconds, collections

    def cb(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            total[1] += 1
            cb.t0 = time.perf_counter()  # type: ignore[attr-defined]
        else:
            total[0] += time.perf_counter() - cb.t0  # type: ignore[attr-defined]

    gc.callbacks.append(cb)
    try:
        yield total
    finally:
        gc.callbacks.remove(cb)


def timed(stages: list[tuple[str, float]], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    out = fn()
    stages.append((name, time.perf_counter() - t0))
    return out


def stage_breakdown(s: Setup) -> None:
    """The CLI's work split into stages, in-process (modules already imported).

    The first pass runs what cmd_plan runs, stage by stage, through Session; the second
    times the pieces of the two big stages on their own (leaf functions only, so the
    breakdown survives changes in how Session wires them together).
    """
    from reconciler.diff import plan
    from reconciler.drivers.headers import file_header_format
    from reconciler.render import to_json
    from reconciler.schema.load import load_manifests, manifest_files
    from reconciler.schema.yamlload import load_file
    from reconciler.session import Session

    paths = [str(s.manifests)]
    stages: list[tuple[str, float]] = []
    gc.collect()
    with gc_timer() as gct:
        t0 = time.perf_counter()
        config = timed(stages, "load_config", lambda: load_config(str(s.config)))
        sess = timed(stages, "Session() (store, connections, drivers)", lambda: Session(config))
        try:
            timed(stages, "Session.load (manifests -> Desired)", lambda: sess.load(paths))
            observed = timed(stages, "Session.observe (records, pool, headers)", sess.observe)
            p = timed(stages, "plan()", lambda: plan(sess.desired, observed, sess.options))
            timed(stages, "render.to_json", lambda: to_json(p))
        finally:
            sess.close()
        total = time.perf_counter() - t0
    gc_s, gc_n = gct

    details: list[tuple[str, float]] = []
    sess = Session(config)
    try:
        files = manifest_files(paths)[0]
        timed(details, "yamlload.load_file x manifests", lambda: [load_file(f) for f in files])
        timed(
            details, "load_manifests (YAML, pydantic, refs)", lambda: load_manifests(paths, config)
        )
        records, _ = timed(details, "store.load_all", sess.store.load_all)
        drv: Any = sess.drivers[POOL]
        timed(details, "FilePoolDriver.list_volumes", drv.list_volumes)
        timed(details, "FilePoolDriver.attachments", drv.attachments)
        timed(
            details,
            "file_header_format x records",
            lambda: [file_header_format(os.path.join(s.pool_dir, r.volume)) for r in records],
        )
    finally:
        sess.close()

    print(f"\nStage breakdown, N={s.n}, in-process (imports and interpreter start excluded):")
    for name, t in stages:
        print(f"  {name:<46} {t:8.3f} s")
    print(f"  {'total':<46} {total:8.3f} s")
    print(f"  {'  of which cyclic GC':<46} {gc_s:8.3f} s ({int(gc_n)} collections)")
    print("Pieces, timed again on their own:")
    for name, t in details:
        print(f"  {name:<46} {t:8.3f} s")


def profile(s: Setup) -> None:
    from reconciler import cli

    print(f"\nProfile: reconcile --dry-run --output json, N={s.n}, in-process under cProfile")
    stage_breakdown(s)
    prof = cProfile.Profile()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        t0 = time.perf_counter()
        prof.enable()
        rc = cli.main(plan_argv(s))
        prof.disable()
        wall = time.perf_counter() - t0
    check_plan(f"profiled run (N={s.n})", rc, out.getvalue(), err.getvalue())
    print(f"\ncli.main under cProfile: {wall:.3f} s (profiler overhead included)")
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.strip_dirs().sort_stats("cumulative").print_stats(25)
    print("Top 15 by own time (tottime):")
    stats.sort_stats("tottime").print_stats(15)


# -- the report --------------------------------------------------------------------------


def machine_load() -> str:
    """Load average and CPU pressure (PSI): how much other processes competed for CPU."""
    out = f"load avg {os.getloadavg()[0]:.2f}"
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/pressure/cpu") as f:
            some = dict(kv.split("=") for kv in f.readline().split()[1:])
        out += f", CPU pressure some avg10 {some['avg10']}% avg60 {some['avg60']}%"
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: list[Result]) -> None:
    print()
    print(f"reconcile --dry-run --output json, converged state (empty plan), median of {RUNS}")
    print(f"after 1 cold run; {os.cpu_count()} CPUs; baseline = PyYAML CSafeLoader of every")
    print("manifest + pool refresh/list (or directory listing past libvirt's limit) + SELECT")
    print("* FROM records, in-process. startup = `reconcile --version` (Python + imports).")
    print("CPU = the child's user+system time (median), a check on a busy machine's wall time.")
    print("cold = the first run, with no manifest cache (every YAML file parsed and validated);")
    print("the timed runs reuse the cache for the unchanged manifests, as a control loop would.")
    print(f"machine load when printed: {machine_load()} (others' work inflates wall times)")
    print()
    head = (
        f"{'N disks':>8} {'cold s':>7} {'reconcile s':>12} {'runs s':>18} {'CPU s':>7} "
        f"{'peak RSS MiB':>13} "
        f"{'startup s':>10} {'baseline s':>11} {'ratio':>7} {'warnings':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        runs = "/".join(f"{w:.2f}" for w in r.walls)
        print(
            f"{r.n:>8} {r.cold:>7.2f} {r.wall:>12.3f} {runs:>18} {r.cpu:>7.2f} {r.rss_mib:>13.1f} "
            f"{r.startup_s:>10.3f} {r.base:>11.3f} {r.wall / r.base:>6.1f}x {r.warnings:>9}"
        )
    print()
    by_n = {r.n: r for r in results}
    big = by_n.get(TARGET_N)
    if big is not None:
        print(
            f"target: N={TARGET_N} wall <= {TARGET_WALL_S:.1f} s: {big.wall:.3f} s "
            f"-> {verdict(big.wall <= TARGET_WALL_S)} (cold run, no manifest cache: "
            f"{big.cold:.3f} s -> {verdict(big.cold <= TARGET_WALL_S)})"
        )
        print(
            f"target: N={TARGET_N} peak RSS <= {TARGET_RSS_MIB:.0f} MiB: {big.rss_mib:.1f} MiB "
            f"-> {verdict(big.rss_mib <= TARGET_RSS_MIB)}"
        )
    else:
        print(f"target: N={TARGET_N} wall and RSS: not measured (size not requested)")
    small, large = by_n.get(SCALE_SMALL), by_n.get(SCALE_LARGE)
    if small is not None and large is not None:
        scale = large.wall / small.wall
        print(
            f"target: wall({SCALE_LARGE})/wall({SCALE_SMALL}) <= {TARGET_SCALING:.0f}x: "
            f"{scale:.2f}x -> {verdict(scale <= TARGET_SCALING)}"
        )
    else:
        print(f"target: wall({SCALE_LARGE})/wall({SCALE_SMALL}): not measured")
    for r in results:
        if r.warning_codes:
            print(f"note: N={r.n} plans carry warnings {r.warning_codes}")


# -- main --------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --sizes {text!r}") from None
    if not sizes or any(n <= 0 or n % 3 for n in sizes):
        raise argparse.ArgumentTypeError("sizes are positive multiples of 3 (3 disks/instance)")
    return sorted(set(sizes))


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: libvirtd is stopped


def run(args: argparse.Namespace) -> int:
    if not RECONCILE.exists():
        raise BenchError(f"{RECONCILE} not found; install the project into .venv")
    root = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    daemon = Daemon(root / "lv")
    setups: list[Setup] = []
    conn: Any = None
    results: list[Result] = []
    try:
        uri = daemon.start()
        log(f"libvirtd in {daemon.dir}: {uri}")
        log(f"machine load at start: {machine_load()}")
        conn = libvirt.open(uri)
        scratch = root / "out"
        scratch.mkdir()
        startup = time_startup(scratch)
        sizes: list[int] = args.sizes
        profile_n = PROFILE_SIZE if PROFILE_SIZE in sizes else max(sizes)
        for n in sizes:
            log(f"N={n}: generating {n // 3} manifests, {n} volumes and records in {root}")
            s = build(root, n, uri, conn)
            setups.append(s)
            log(f"N={n}: setup took {s.setup_s:.1f} s")
            walls, cpus, rss, doc, cold = time_cli(s, scratch)
            codes: dict[str, int] = {}
            for w in doc.get("warnings", []):
                codes[w["code"]] = codes.get(w["code"], 0) + 1
            base = time_baseline(s)
            log(f"N={n}: baseline {'/'.join(f'{b:.3f}' for b in base)} s")
            results.append(
                Result(
                    n, s.setup_s, walls, cpus, rss, startup, base, len(doc["warnings"]), codes, cold
                )
            )
        report(results)
        if args.profile:
            if profile_n != PROFILE_SIZE:
                print(f"\n(--profile: {PROFILE_SIZE} not in --sizes; profiling N={profile_n})")
            profile(next(s for s in setups if s.n == profile_n))
    finally:
        if conn is not None:
            if not args.keep:
                for s in setups:
                    remove_pool(conn, s)
            else:
                for s in setups:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.storagePoolLookupByName(s.libvirt_pool).setAutostart(1)
            conn.close()
        daemon.stop()
        if args.keep:
            log(f"kept {root}; restart its daemon with: {LIBVIRTD_SH} start {daemon.dir}")
            for s in setups:
                log(f"  N={s.n}: {RECONCILE} {' '.join(plan_argv(s))}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated disk counts (default: 3000,30000)",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated files and pools")
    p.add_argument(
        "--profile",
        action="store_true",
        help=f"also profile the N={PROFILE_SIZE} case in-process (cProfile, stage breakdown)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench/plan.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
