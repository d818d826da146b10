"""Benchmark: `reconcile --dry-run --output json` on a converged host of 30,000 disks, cold
and repeated, against the bare floor of the same work.

    .venv/bin/python bench/plan.py [--sizes 30000] [--rounds 7] [--keep] [--profile]

For each size N (disks; N/3 instances with a qcow2 root from an image, an ext4 ephemeral
and a swap disk, all in one libvirt dir pool) this builds, under a short /tmp directory:
N/3 manifests, a config pointing at a private libvirtd started here, a pool directory
holding the N volumes (sparse files; the qcow2 roots carry a real qcow2 header so nothing
disagrees with the records) and a READY record for every volume. The plan is therefore
empty. After one warm-up round (page cache, libvirtd), it times in each round, one after
the other so that a busy machine slows them alike, in alternating order (ABBA: cold and
repeat, observed, floor; then floor, observed, cold and repeat):

  * cold: the CLI as a new process with no manifest cache, as a change review's CI job
    runs it (its checkout is new): every manifest is parsed and validated. What the state
    directory keeps of the host itself (the volumes' headers, the records judged) stays,
    as it would on the host: neither changed;
  * repeat: the CLI again, with the manifest cache the cold run wrote;
  * observed: the CLI planning against the state `reconcile observe` exported once
    before the rounds (`--observed STATE`: no connection, no manifest cache, as a review's
    CI job far from the host runs it);
  * floor: the bare sequential work, in this process: every manifest through PyYAML's
    CSafeLoader, the pool listing (refresh + list, or the directory past libvirt's RPC
    limit) and one SELECT of the records.

Figures are medians over the rounds, with their ranges; ratios are of the medians. With
each child run come its CPU time (user + system, its worker process included) and peak RSS
(wait4: the larger of the reconcile process and its worker); one extra cold run samples
the two processes' RSS together. The targets, at N=30,000 (10,000 manifests x 3 disks):

  * cold <= 0.8x floor (two cores; the floor is sequential);
  * cold peak RSS <= 400 MB;
  * repeat <= 0.6x floor (nothing changed since the cached run);
  * observed <= 1.0x floor (no connection at all: it should be the cheapest run).

(Issue 27's targets; they were 1.0x, 0.8x and 1.0x.)

Targets are reported, not asserted: the exit status is 0 unless the run itself failed (a
setup error, or a reconcile run that did not produce an empty plan). `--profile` also runs
the cold case once in-process under cProfile (the parent only: a worker's time is not in
it) and prints a per-stage breakdown.
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import libvirt
import yaml

from reconciler.drivers.file.volumes import LIBVIRT_VOL_LIST_MAX
from reconciler.drivers.host.store import open_store
from reconciler.model.naming import template_entry_name, volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.load import LoadedManifest, load_config, load_manifest

ROOT = Path(__file__).resolve().parent.parent
LIBVIRTD_SH = ROOT / "scripts" / "libvirtd.sh"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"

DEFAULT_SIZES = (30_000,)
ROUNDS = 7
TARGET_N = 30_000  # 10,000 manifests x 3 disks
TARGET_COLD = 0.8  # cold run / floor
TARGET_REPEAT = 0.6  # repeat run / floor
TARGET_OBSERVED = 1.0  # a plan from an exported state / floor
TARGET_RSS_MB = 400.0  # the cold run's peak RSS, in 10^6 bytes

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
    entries: int = 0  # cache entries the disks are backed by (a volume and a record each)


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


def backing_of(spec: dict[str, Any]) -> str | None:
    """The template cache entry a disk made to `spec` is backed by (none for blank)."""
    src = spec["source"]
    if "template" in src and src["template"] != "blank":
        return template_entry_name(src["template"], int(spec["size"]), src.get("label"))
    return None


def entries(specs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The cache entries the disks are backed by: name -> the entry's spec, as the
    reconciler records a template entry (every record's backing must be an entry of the
    pool with its own record, or the record is refused)."""
    out: dict[str, dict[str, Any]] = {}
    for _, spec in specs:
        name = backing_of(spec)
        if name is not None:
            src = spec["source"]
            entry: dict[str, Any] = {"template": src["template"], "size": int(spec["size"])}
            if src.get("label"):
                entry["label"] = src["label"]
            out[name] = entry
    return out


def make_volumes(s: Setup, specs: list[tuple[str, dict[str, Any]]]) -> None:
    s.pool_dir.mkdir()
    for name, entry in entries(specs).items():
        with open(s.pool_dir / name, "wb") as f:
            f.truncate(int(entry["size"]))
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
    if seen != s.n + s.entries:
        raise BenchError(
            f"libvirt pool {s.libvirt_pool} holds {seen} volumes, expected {s.n + s.entries}"
        )


def write_records(s: Setup, specs: list[tuple[str, dict[str, Any]]]) -> None:
    store = open_store(load_config(str(s.config)).state_dir())
    # Setup only: one fsync per put() would make 30,000 records take minutes. The records
    # are still written through SqliteRecordStore.put(), exactly as apply writes them.
    store._db.execute("PRAGMA synchronous=OFF")
    try:
        for name, entry in entries(specs).items():
            store.put(
                DiskRecord(
                    kind=RecordKind.CACHE,
                    backend=Backend.FLAT,
                    pool=POOL,
                    volume=name,
                    instance="",
                    disk="",
                    format=DiskFormat.RAW,
                    virtual_size=int(entry["size"]),
                    spec=entry,
                    source=dict(entry),
                    state=RecordState.READY,
                    generation=2,
                ),
                None,
            )
        for i in range(1, s.n // 3 + 1):
            inst = instance_uuid(i)
            for name, spec in specs:
                src = spec["source"]
                backing = backing_of(spec)
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
    s.entries = len(entries(specs))
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
    cpu_s: float  # the child's user + system time, its own children (a worker) included
    maxrss_kib: int  # wait4: the largest of the child and the children it waited for
    exit_code: int
    stdout: str
    stderr: str
    tree_rss_kib: int = 0  # sampled: the child and its children together (0: not sampled)


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            # The command name may hold spaces and ')': the parent's pid is the second
            # field after the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _sample_tree(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.02):
        total = _rss_kib(pid) + sum(_rss_kib(c) for c in _children(pid))
        peak[0] = max(peak[0], total)


def run_child(argv: list[str], scratch: Path, *, sample_tree: bool = False) -> ChildRun:
    """Run argv with stdout/stderr to files; wall time and the child's own peak RSS.
    With sample_tree, a thread also adds up the RSS of the child and its children (every
    20 ms: for one untimed run, as /proc reads cost CPU)."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_CONFIG"}
    peak = [0]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
        ]
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        stop = threading.Event()
        sampler = None
        if sample_tree:
            sampler = threading.Thread(target=_sample_tree, args=(pid, stop, peak), daemon=True)
            sampler.start()
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            sampler.join()
    return ChildRun(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_kib=usage.ru_maxrss,  # KiB on Linux
        exit_code=os.waitstatus_to_exitcode(status),
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        tree_rss_kib=peak[0],
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


def cache_path(s: Setup) -> Path:
    return load_config(str(s.config)).state_dir() / "manifest-cache.json"


def cached_entries(s: Setup) -> int:
    try:
        with open(cache_path(s), encoding="utf-8") as f:
            return len(json.load(f)["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass
class Round:
    cold: ChildRun
    repeat: ChildRun
    floor_s: float
    observed: ChildRun


def run_plan(s: Setup, scratch: Path, what: str, *, sample_tree: bool = False) -> ChildRun:
    r = run_child([str(RECONCILE), *plan_argv(s)], scratch, sample_tree=sample_tree)
    check_plan(f"{what} (N={s.n})", r.exit_code, r.stdout, r.stderr)
    return r


def cold_run(s: Setup, scratch: Path, *, sample_tree: bool = False) -> ChildRun:
    """A new process with no manifest cache, as a change review's CI job runs it."""
    cache_path(s).unlink(missing_ok=True)
    r = run_plan(s, scratch, "cold run", sample_tree=sample_tree)
    if cached_entries(s) != s.n // 3:
        raise BenchError(
            f"the cold run cached {cached_entries(s)} of {s.n // 3} manifests: "
            "the repeat run would not be one"
        )
    return r


def export_state(s: Setup, scratch: Path) -> Path:
    """`reconcile observe` once: the state the observed runs plan against."""
    state = s.dir / "state.json.gz"
    r = run_child(
        [str(RECONCILE), "observe", "--config", str(s.config), "--out", str(state)], scratch
    )
    if r.exit_code != 0:
        raise BenchError(f"reconcile observe failed (exit {r.exit_code}): {r.stderr[-2000:]}")
    return state


def observed_run(s: Setup, scratch: Path, state: Path) -> ChildRun:
    r = run_child([str(RECONCILE), *plan_argv(s), "--observed", str(state)], scratch)
    check_plan(f"observed run (N={s.n})", r.exit_code, r.stdout, r.stderr)
    return r


def time_rounds(s: Setup, scratch: Path, rounds: int) -> list[Round]:
    """Cold, repeat, observed and floor, one after the other, rounds + 1 times, in
    alternating order (ABBA: odd rounds run the floor first, the cold and repeat pair
    last, so neither end of a round favours one case); the first round (page cache,
    libvirtd, the floor's first imports) is not kept."""
    out: list[Round] = []
    state = export_state(s, scratch)
    for i in range(rounds + 1):
        floor_first = i % 2 == 1
        if floor_first:
            floor_s, counts = floor_once(s)
            observed = observed_run(s, scratch, state)
        cold = cold_run(s, scratch)
        repeat = run_plan(s, scratch, "repeat run")
        if not floor_first:
            observed = observed_run(s, scratch, state)
            floor_s, counts = floor_once(s)
        if counts != (s.n // 3, s.n + s.entries, s.n + s.entries):
            raise BenchError(f"floor N={s.n} saw (manifests, volumes, records) {counts}")
        label = "warm-up" if i == 0 else f"round {i}"
        log(
            f"N={s.n} {label}: cold {cold.wall_s:.3f} s ({cold.cpu_s:.2f} s CPU, "
            f"{cold.maxrss_kib / 1024:.0f} MiB), repeat {repeat.wall_s:.3f} s "
            f"({repeat.cpu_s:.2f} s CPU), floor {floor_s:.3f} s; "
            f"cold/floor {cold.wall_s / floor_s:.2f}x, "
            f"repeat/floor {repeat.wall_s / floor_s:.2f}x, "
            f"observed {observed.wall_s:.3f} s ({observed.wall_s / floor_s:.2f}x)"
        )
        if i > 0:
            out.append(Round(cold, repeat, floor_s, observed))
    return out


def time_startup(scratch: Path) -> float:
    """Interpreter start plus every import the CLI makes: `reconcile --version`."""
    walls = []
    for _ in range(4):
        r = run_child([str(RECONCILE), "--version"], scratch)
        if r.exit_code != 0:
            raise BenchError(f"reconcile --version failed: {r.stderr}")
        walls.append(r.wall_s)
    return statistics.median(walls[1:])


# -- the floor ---------------------------------------------------------------------------


def floor_once(s: Setup) -> tuple[float, tuple[int, int, int]]:
    """The bare work, sequential: parse every manifest, list the pool, read every record."""
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
    """The CLI's cold work split into stages, in-process (modules already imported).

    The first pass runs what cmd_plan runs, stage by stage, through Session; the second
    times the pieces of the big stages on their own, sequentially (leaf functions only, so
    the breakdown survives changes in how Session wires them together).
    """
    from reconciler.control.session import Session
    from reconciler.diff import plan
    from reconciler.diff.render import to_json
    from reconciler.drivers.ingest.headers import file_header_format
    from reconciler.schema.manifestdir import ManifestLoad, manifest_files
    from reconciler.schema.yamlload import load_file

    def sequential() -> object:
        with ManifestLoad(paths, config, fork_threshold=sys.maxsize) as loading:
            return loading.finish()

    def forked() -> object:
        with ManifestLoad(paths, config) as loading:
            return loading.finish()

    paths = [str(s.manifests)]
    stages: list[tuple[str, float]] = []
    cache_path(s).unlink(missing_ok=True)
    gc.collect()
    with gc_timer() as gct:
        t0 = time.perf_counter()
        config = timed(stages, "load_config", lambda: load_config(str(s.config)))
        sess = timed(stages, "Session() (store, connections, drivers)", lambda: Session(config))
        try:
            observed = timed(
                stages,
                "Session.load_and_observe (manifests, pools)",
                lambda: sess.load_and_observe(paths),
            )
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
        timed(
            details,
            "yamlload.load_file(track=False) x manifests",
            lambda: [load_file(f, track=False) for f in files],
        )
        timed(details, "load_manifests, sequential (no cache)", sequential)
        timed(details, "load_manifests, with a worker (no cache)", forked)
        timed(details, "Session.observe", sess.observe)
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

    print(f"\nStage breakdown, N={s.n}, cold, in-process (imports, interpreter start excluded):")
    for name, t in stages:
        print(f"  {name:<46} {t:8.3f} s")
    print(f"  {'total':<46} {total:8.3f} s")
    print(f"  {'  of which cyclic GC':<46} {gc_s:8.3f} s ({int(gc_n)} collections)")
    print("Pieces, timed again on their own:")
    for name, t in details:
        print(f"  {name:<46} {t:8.3f} s")


def profile(s: Setup) -> None:
    from reconciler.commands import cli

    print(f"\nProfile: cold reconcile --dry-run --output json, N={s.n}, in-process, cProfile")
    stage_breakdown(s)
    cache_path(s).unlink(missing_ok=True)
    prof = cProfile.Profile()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        t0 = time.perf_counter()
        prof.enable()
        rc = cli.main(plan_argv(s))
        prof.disable()
        wall = time.perf_counter() - t0
    check_plan(f"profiled run (N={s.n})", rc, out.getvalue(), err.getvalue())
    print(f"\ncli.main under cProfile: {wall:.3f} s (profiler overhead included; a worker")
    print("process, when one is forked, is not profiled: its share shows as waiting here)")
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


@dataclass
class Result:
    n: int
    setup_s: float
    rounds: list[Round]
    startup_s: float
    tree_rss_kib: int
    warning_codes: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def _span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"

    @property
    def cold(self) -> float:
        return statistics.median(r.cold.wall_s for r in self.rounds)

    @property
    def repeat(self) -> float:
        return statistics.median(r.repeat.wall_s for r in self.rounds)

    @property
    def floor(self) -> float:
        return statistics.median(r.floor_s for r in self.rounds)

    @property
    def observed(self) -> float:
        return statistics.median(r.observed.wall_s for r in self.rounds)

    @property
    def cold_rss_mb(self) -> float:
        return max(r.cold.maxrss_kib for r in self.rounds) * 1024 / 1e6

    @property
    def repeat_rss_mb(self) -> float:
        return max(r.repeat.maxrss_kib for r in self.rounds) * 1024 / 1e6

    def spans(self) -> dict[str, str]:
        rs = self.rounds
        return {
            "cold": self._span([r.cold.wall_s for r in rs]),
            "repeat": self._span([r.repeat.wall_s for r in rs]),
            "floor": self._span([r.floor_s for r in rs]),
            "cold/floor": self._span([r.cold.wall_s / r.floor_s for r in rs]),
            "repeat/floor": self._span([r.repeat.wall_s / r.floor_s for r in rs]),
            "observed": self._span([r.observed.wall_s for r in rs]),
            "observed/floor": self._span([r.observed.wall_s / r.floor_s for r in rs]),
        }


def report(results: list[Result], rounds: int) -> None:
    print()
    print("reconcile --dry-run --output json, converged state (empty plan).")
    print(f"{rounds} rounds after a warm-up round, each: cold (a new process, no manifest cache),")
    print("repeat (a new process, the cache the cold run wrote), floor (in this process,")
    print("sequential: PyYAML CSafeLoader of every manifest + pool listing + one SELECT).")
    print("Medians, ranges over the rounds in brackets; ratios are of the medians (ranges: of")
    print("each round's own ratio). CPU = the child's user+system time with its worker's.")
    print("Order alternates (ABBA): even rounds cold, repeat, observed, floor; odd the reverse.")
    print("RSS: wait4's peak (the larger of reconcile and its worker), and both together")
    print("sampled every 20 ms in one extra cold run. startup = `reconcile --version`.")
    print(f"{os.cpu_count()} CPUs; machine load when printed: {machine_load()}")
    print("(others' work inflates wall times, and a parallel run more than the sequential floor)")
    print()
    for r in results:
        sp = r.spans()
        cold_cpu = statistics.median(x.cold.cpu_s for x in r.rounds)
        repeat_cpu = statistics.median(x.repeat.cpu_s for x in r.rounds)
        print(f"N={r.n} disks ({r.n // 3} manifests), setup {r.setup_s:.1f} s:")
        print(f"  cold    {r.cold:6.3f} s [{sp['cold']}]   CPU {cold_cpu:5.2f} s")
        print(f"  repeat  {r.repeat:6.3f} s [{sp['repeat']}]   CPU {repeat_cpu:5.2f} s")
        print(f"  floor   {r.floor:6.3f} s [{sp['floor']}]")
        print(f"  cold / floor    {r.cold / r.floor:5.2f}x [{sp['cold/floor']}]")
        print(f"  repeat / floor  {r.repeat / r.floor:5.2f}x [{sp['repeat/floor']}]")
        print(f"  observed {r.observed:6.3f} s [{sp['observed']}]")
        print(f"  observed / floor {r.observed / r.floor:5.2f}x [{sp['observed/floor']}]")
        print(
            f"  peak RSS: cold {r.cold_rss_mb:.0f} MB, repeat {r.repeat_rss_mb:.0f} MB; "
            f"reconcile + worker together (sampled) {r.tree_rss_kib * 1024 / 1e6:.0f} MB"
        )
        print(f"  startup {r.startup_s:.3f} s")
        if r.warning_codes:
            print(f"  note: the plans carry warnings {r.warning_codes}")
    print()
    big = next((r for r in results if r.n == TARGET_N), None)
    if big is None:
        for what, want in (
            ("cold / floor", f"<= {TARGET_COLD:.1f}x"),
            ("cold peak RSS", f"<= {TARGET_RSS_MB:.0f} MB"),
            ("repeat / floor", f"<= {TARGET_REPEAT:.1f}x"),
            ("observed / floor", f"<= {TARGET_OBSERVED:.1f}x"),
        ):
            print(f"target: {what} at N={TARGET_N}: not measured (want {want}) -> FAIL")
        return
    cold, repeat = big.cold / big.floor, big.repeat / big.floor
    print(
        f"target: cold / floor at N={TARGET_N}: {cold:.2f}x (want <= {TARGET_COLD:.1f}x) "
        f"-> {verdict(cold <= TARGET_COLD)}"
    )
    print(
        f"target: cold peak RSS at N={TARGET_N}: {big.cold_rss_mb:.0f} MB "
        f"(want <= {TARGET_RSS_MB:.0f} MB) -> {verdict(big.cold_rss_mb <= TARGET_RSS_MB)}"
    )
    print(
        f"target: repeat / floor at N={TARGET_N}: {repeat:.2f}x (want <= {TARGET_REPEAT:.1f}x) "
        f"-> {verdict(repeat <= TARGET_REPEAT)}"
    )
    observed = big.observed / big.floor
    print(
        f"target: observed / floor at N={TARGET_N}: {observed:.2f}x "
        f"(want <= {TARGET_OBSERVED:.1f}x) -> {verdict(observed <= TARGET_OBSERVED)}"
    )


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
        profile_n = TARGET_N if TARGET_N in sizes else max(sizes)
        for n in sizes:
            log(f"N={n}: generating {n // 3} manifests, {n} volumes and records in {root}")
            s = build(root, n, uri, conn)
            setups.append(s)
            log(f"N={n}: setup took {s.setup_s:.1f} s")
            rounds = time_rounds(s, scratch, args.rounds)
            sampled = cold_run(s, scratch, sample_tree=True)
            doc = check_plan(f"sampled run (N={n})", sampled.exit_code, sampled.stdout, "")
            codes: dict[str, int] = {}
            for w in doc.get("warnings", []):
                codes[w["code"]] = codes.get(w["code"], 0) + 1
            results.append(Result(n, s.setup_s, rounds, startup, sampled.tree_rss_kib, codes))
        report(results, args.rounds)
        if args.profile:
            if profile_n != TARGET_N:
                print(f"\n(--profile: {TARGET_N} not in --sizes; profiling N={profile_n})")
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


def _rounds(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--rounds wants a whole number of at least 1: {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help=f"comma-separated disk counts (default: {','.join(map(str, DEFAULT_SIZES))}); "
        f"the targets are at {TARGET_N}",
    )
    p.add_argument(
        "--rounds",
        type=_rounds,
        default=ROUNDS,
        help=f"timed rounds of cold, repeat and floor after the warm-up (default {ROUNDS})",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated files and pools")
    p.add_argument(
        "--profile",
        action="store_true",
        help=f"also profile the cold N={TARGET_N} case in-process (cProfile, stage breakdown)",
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
