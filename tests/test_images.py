"""Disks from images on a real libvirtd: one checked fetch per pool, hostile images refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import libvirt
import pytest
from oslo_utils.imageutils import format_inspector as fi

from reconciler.drivers.file import disks
from reconciler.drivers.file.volumes import _volume_xml
from reconciler.drivers.ingest.check import ImageRejected, run_limited
from reconciler.model.record import RecordKind
from tests.conftest import DirPool
from tests.env import ROOT, Env, disk
from tests.httpserver import ImageServer, serve

pytestmark = pytest.mark.libvirtd


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def luks_image(path: Path) -> None:
    """A 1 MiB LUKS volume, as `qemu-img create -f luks` makes it. Before it writes, qemu-img
    times PBKDF2 by the thread's CPU time and gives up ("Unable to get accurate CPU usage")
    when a round measures 0 ms, whatever iter-time says: on this machine's coarse clock, a
    third of the time (13 of 40 tries). That is qemu-img's benchmark, not anything a test
    checks, so only that failure is tried again."""
    argv = [
        *("qemu-img", "create", "--object", "secret,id=sec0,data=passphrase", "-f", "luks"),
        *("-o", "key-secret=sec0,iter-time=10", str(path), "1M"),
    ]
    for _ in range(20):
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in res.stderr, res.stderr
    raise AssertionError(f"qemu-img create -f luks failed 20 times: {res.stderr}")


def catalog_entry(path: Path, fmt: str, location: str | None = None) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "location": location or f"file://{path}",
        "format": fmt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    # A raw image with recognisable content, and the same as qcow2.
    raw = d / "good.raw"
    raw.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(65536)))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / "good.qcow2"))
    return d


@pytest.fixture
def server(images: Path) -> Iterator[ImageServer]:
    with serve(images) as s:
        yield s


def pool_contents(env: Env) -> list[str]:
    return sorted(p.name for p in env.pool_dir().iterdir() if p.name != ".reconciler")


def records(env: Env) -> list[Any]:
    store = env.store()
    try:
        return store.load_all()[0]
    finally:
        store.close()


def same_data(disk_path: Path, fmt: str, raw_image: Path) -> bool:
    """qemu-img compare: the disk's content equals the image's, the rest zeros."""
    res = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(disk_path), str(raw_image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0


def test_disks_from_raw_and_qcow2_images(env: Env, images: Path) -> None:
    env.images = {
        "raw": catalog_entry(images / "good.raw", "raw"),
        "q": catalog_entry(images / "good.qcow2", "qcow2"),
    }
    env.write_config()
    inst = env.manifest(
        "vm",
        [
            disk("a", backend="qcow2", fmt="qcow2", size="16MiB", image="raw", template=None),
            disk("b", fmt="raw", size="16MiB", image="raw", template=None),
            disk("c", fmt="qcow2", size="16MiB", image="q", template=None),
            disk("d", backend="qcow2", fmt="qcow2", size="32MiB", image="q", template=None),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    good = images / "good.raw"
    assert same_data(env.volume(inst, "a"), "qcow2", good)
    assert same_data(env.volume(inst, "b"), "raw", good)
    assert same_data(env.volume(inst, "c"), "qcow2", good)
    assert same_data(env.volume(inst, "d"), "qcow2", good)
    assert os.stat(env.volume(inst, "b")).st_size == 16 << 20
    # One raw cache entry per image, each the image's bytes as raw.
    caches = {r.volume: r for r in records(env) if r.kind is RecordKind.CACHE}
    assert len(caches) == 2
    for name, rec in caches.items():
        assert rec.format.value == "raw"
        assert same_data(env.pool_dir() / name, "raw", good)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(env.volume(inst, "d"))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["backing-filename-format"] == "raw"
    assert Path(info["backing-filename"]).name.startswith("_cache_image-q-")
    assert env.plan_json()["actions"] == []


@pytest.mark.parametrize("jobs", [1, 6])
def test_many_disks_one_fetch(env: Env, server: ImageServer, images: Path, jobs: int) -> None:
    """Six disks from one image: one fetch, one entry, six overlays on it; with --jobs 6
    the six creates run together and still make one fetch and one entry."""
    env.images = {"img": catalog_entry(images / "good.qcow2", "qcow2", server.url("good.qcow2"))}
    env.write_config()
    ids = [
        env.manifest(
            f"vm{i}",
            [disk("root", backend="qcow2", fmt="qcow2", size="16MiB", image="img", template=None)],
        )
        for i in range(6)
    ]
    rc, out, err = env.run("--jobs", str(jobs))
    assert rc == 0, out + err
    assert out.count("\ncreated ") == 6
    assert server.gets["good.qcow2"] == 1
    recs = records(env)
    (entry,) = [r for r in recs if r.kind is RecordKind.CACHE]
    disks = [r for r in recs if r.kind is RecordKind.DISK]
    assert len(disks) == 6 and all(r.backing == entry.volume for r in disks)
    for inst in ids:
        assert same_data(env.volume(inst, "root"), "qcow2", images / "good.raw")
    assert env.plan_json()["actions"] == []


def test_overlays_are_the_bytes_libvirt_makes_from_one_qemu_img_run(
    env: Env, dir_pool: DirPool, images: Path
) -> None:
    """A plain overlay is written from bytes made once per (entry, size) in a run: each
    is byte for byte what libvirt's createXML of the overlay makes (its qemu-img run, the
    size rounded up to a KiB as libvirt's command line gives it), and reads as the image."""
    env.images = {"img": catalog_entry(images / "good.raw", "raw")}
    env.write_config()
    sizes = {"a": 16 << 20, "b": 16 << 20, "c": (16 << 20) + 512, "d": 1 << 40}
    inst = env.manifest(
        "vm",
        [
            disk(name, backend="qcow2", fmt="qcow2", size=f"{size} B", image="img", template=None)
            for name, size in sizes.items()
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    (entry,) = [r.volume for r in records(env) if r.kind is RecordKind.CACHE]
    conn = libvirt.open(dir_pool.uri)
    try:
        pool = conn.storagePoolLookupByName(dir_pool.name)
        for name, size in sizes.items():
            ref = f"ref-{name}"
            pool.createXML(_volume_xml(ref, size, "qcow2", str(env.pool_dir() / entry)), 0)
            made = env.volume(inst, name)
            assert made.read_bytes() == (env.pool_dir() / ref).read_bytes(), name
            assert os.stat(made).st_mode & 0o777 == 0o600
            assert same_data(made, "qcow2", images / "good.raw")
    finally:
        conn.close()
    assert env.plan_json()["actions"] == []


def test_overlay_bytes_are_made_once_per_entry_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, int]] = []

    def overlay_image(backing: str, size: int) -> disks.Overlay:
        made.append((backing, size))
        return ((0, backing.encode()),), size

    monkeypatch.setattr(disks, "overlay_image", overlay_image)
    parts = SimpleNamespace(delete=None, scratch=None)
    fd = disks.FileDisks(cast(Any, SimpleNamespace()), cast(Any, parts), {}, cast(Any, None))
    asks = [("/p/e1", 1 << 20), ("/p/e1", 2 << 20), ("/p/e2", 1 << 20)] * 8
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda a: fd._overlay_image(*a), asks))
    assert sorted(made) == sorted(set(asks))
    assert got == [(((0, b.encode()),), s) for b, s in asks]
    # A long-running loop keeps a bounded number of them: past it, they are made afresh.
    monkeypatch.setattr(disks, "OVERLAYS_KEPT", 3)
    made.clear()
    for ask in [("/p/e3", 1 << 20), ("/p/e1", 1 << 20)]:
        fd._overlay_image(*ask)
    assert made == [("/p/e3", 1 << 20), ("/p/e1", 1 << 20)]


def test_two_processes_one_fetch(env: Env, server: ImageServer, images: Path) -> None:
    env.images = {"img": catalog_entry(images / "good.raw", "raw", server.url("good.raw"))}
    env.write_config()
    for i in range(8):
        env.manifest(
            f"vm{i}",
            [disk("root", backend="qcow2", fmt="qcow2", size="16MiB", image="img", template=None)],
        )
    procs = [env.start() for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    assert server.gets["good.raw"] == 1
    assert env.plan_json()["actions"] == []


def test_http_errors_are_retried_then_fail_cleanly(
    env: Env, server: ImageServer, images: Path
) -> None:
    """A server's trouble (5xx) and a cut transfer are retried; a refusal (401, 403,
    404) answers the same every time: fetched once, and one line says so."""
    env.images = {
        name: catalog_entry(images / "good.raw", "raw", server.url(f"{name}.raw"))
        for name in ("gone", "cut", "denied", "unauthorized", "broken")
    }
    (images / "cut.raw").write_bytes((images / "good.raw").read_bytes())
    server.faults["cut.raw"] = "truncate"
    server.faults["denied.raw"] = "403"
    server.faults["unauthorized.raw"] = "401"
    server.faults["broken.raw"] = "500"
    env.write_config()
    for name in env.images:
        env.manifest(name, [disk("d", size="16MiB", image=name, template=None)])
    rc, out, _ = env.run()
    assert rc == 1
    failures = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 5, out
    for code in (404, 403, 401, 500):
        assert sum(f"HTTP {code}" in f for f in failures) == 1, failures
    assert any("truncated" in f or "transfer failed" in f for f in failures)
    assert server.gets["cut.raw"] == 4 and server.gets["broken.raw"] == 4  # retried
    assert server.gets["gone.raw"] == 1  # 404: not retried
    assert server.gets["denied.raw"] == 1 and server.gets["unauthorized.raw"] == 1
    assert pool_contents(env) == []
    assert records(env) == []


def on_a_terminal(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its stdin, stdout and stderr: (rc, all it wrote)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode(errors="replace")


def test_retry_notices_start_on_a_line_of_their_own_on_a_terminal(
    env: Env, server: ImageServer, images: Path
) -> None:
    """A transfer cut after half the image is retried: its notice starts on a line of its
    own (the fetch's in-place progress line cleared first), never at the end of it."""
    (images / "cut.raw").write_bytes((images / "good.raw").read_bytes())
    server.faults["cut.raw"] = "truncate"
    env.images = {"cut": catalog_entry(images / "good.raw", "raw", server.url("cut.raw"))}
    env.write_config()
    env.manifest("a", [disk("d", size="16MiB", image="cut", template=None)])
    rc, out = on_a_terminal(env.argv("--jobs", "1"))
    assert rc == 1, out
    assert server.gets["cut.raw"] == 4
    assert "fetch cut: " in out  # the progress line was drawn
    notices = [i for i in range(len(out)) if out.startswith("image.fetch.retry", i)]
    assert len(notices) == 3, out
    for i in notices:
        line = out[out.rfind("\n", 0, i) + 1 : i]
        shown = line[line.rfind("\r") + 1 :]  # what a terminal shows of the line
        assert re.match(r"\x1b\[2K\d{4}-\d\d-\d\dT", shown), repr(line)


def with_fetch(env: Env, fetch: dict[str, Any]) -> None:
    """The env's config with a `fetch` section."""
    env.write_config()
    cfg = json.loads(env.config_path.read_text())
    cfg["fetch"] = fetch
    env.config_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("fault", ["trickle", "silent"])
def test_a_trickling_or_silent_server_fails_by_the_deadline_and_leaves_nothing(
    env: Env, server: ImageServer, images: Path, fault: str
) -> None:
    """A server sending a byte every half second, or accepting and never answering: the
    fetch fails once its deadline (connectTimeout + slack + size / minRate: 1 + 0 + 2 s
    here) has passed, in one line, and leaves no cache entry, temporary file or record.
    A child process, so its bound is the timeout, not a timed assertion."""
    name = f"{fault}.raw"
    (images / name).write_bytes((images / "good.raw").read_bytes())  # 2 MiB
    server.faults[name] = fault
    server.trickle_interval = 0.5
    env.images = {"slow": catalog_entry(images / "good.raw", "raw", server.url(name))}
    with_fetch(env, {"minRate": "1MiB/s", "connectTimeout": 1, "slack": 0})
    inst = env.manifest("a", [disk("d", size="16MiB", image="slow", template=None)])
    res = env.subprocess(timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    (failed,) = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert f"{server.url(name)}: not fetched within 3 s, the deadline for 2.0 MiB" in failed
    assert "fetch.minRate (1.0 MiB/s)" in failed, failed
    assert pool_contents(env) == []  # no entry, no temporary file
    assert records(env) == []
    assert not env.volume(inst, "d").exists()


def test_a_file_image_that_is_a_fifo_fails_at_once(env: Env, images: Path) -> None:
    """A file:// location that is a FIFO is refused when opened (never waited on for a
    writer), in one line, leaving nothing. A child process: a hang is the timeout's."""
    fifo = images / "fifo.raw"
    os.mkfifo(fifo)
    env.images = {"f": catalog_entry(images / "good.raw", "raw", f"file://{fifo}")}
    env.write_config()
    env.manifest("a", [disk("d", size="16MiB", image="f", template=None)])
    res = env.subprocess(timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    (failed,) = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert failed.endswith(f"{fifo}: is a FIFO, not a regular file; not read"), failed
    assert pool_contents(env) == [] and records(env) == []


def test_fetch_limits_are_checked_in_the_config(env: Env) -> None:
    with_fetch(env, {"minRate": "1MB/s"})
    rc, out, err = env.run("--dry-run")
    assert rc == 1 and out == "" and "fetch.minRate" in err and "'1MB/s'" in err, err
    assert len(err.splitlines()) == 1


def write_qcow2_header(path: Path, **fields: int) -> None:
    """Patch big-endian fields of a qcow2 header in place (offsets from the qcow2 spec)."""
    offsets = {"size": 24, "incompatible_features": 72}
    with open(path, "r+b") as f:
        for name, value in fields.items():
            f.seek(offsets[name])
            f.write(struct.pack(">Q", value))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def write_iso_descriptor(path: Path) -> None:
    """An ISO 9660 primary volume descriptor at 32 KiB: what oslo's ISOInspector looks for
    (type 1, "CD001", 2048-byte blocks, 32 of them)."""
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[80:88] = struct.pack("<I", 32) + struct.pack(">I", 32)
    pvd[128:132] = struct.pack("<H", 2048) + struct.pack(">H", 2048)
    if path.stat().st_size < 64 << 10:
        os.truncate(path, 64 << 10)
    patch(path, 32 << 10, bytes(pvd))


def sfdisk(path: Path, script: str) -> None:
    subprocess.run(
        ["sfdisk", "--quiet", str(path)], input=script, text=True, capture_output=True, check=True
    )


def partitioned(path: Path, label: str, partitions: int = 2) -> Path:
    """An 8 MiB raw disk with a partition table (label gpt or dos) written by sfdisk, and
    recognisable data from 1 MiB on, where sfdisk puts the first partition."""
    data = b"".join(hashlib.sha256(b"part%d" % i).digest() for i in range(7 << 15))
    path.write_bytes(bytes(1 << 20) + data)
    sfdisk(path, f"label: {label}\n" + "".join(",2MiB,L\n" for _ in range(partitions)))
    return path


MBR_ENTRIES = 446  # the four 16-byte partition entries of sector 0


def mbr_entry_types(path: Path) -> list[int]:
    sector = path.read_bytes()[:512]
    return [sector[MBR_ENTRIES + 16 * i + 4] for i in range(4)]


def hostile(images: Path, tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, declared format, a phrase the refusal must contain)."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"secret\n" * 1000)
    out: dict[str, tuple[Path, str, str]] = {}

    p = images / "backing.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(p), "8M")
    out["backing-file"] = (p, "qcow2", "backing file")

    p = images / "json-backing.qcow2"
    qemu_img(
        "create",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        'json:{"driver":"file","filename":"' + str(secret) + '"}',
        str(p),
        "8M",
    )
    out["json-filename"] = (p, "qcow2", "backing file")

    p = images / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}", str(p), "8M")
    out["data-file"] = (p, "qcow2", "data")

    p = images / "really-qcow2.raw"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    out["raw-declared-qcow2"] = (p, "raw", "content is qcow2")

    p = images / "flat.vmdk"
    p.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW 16 FLAT "{secret}" 0\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "1"\n'
    )
    out["vmdk-flat-descriptor"] = (p, "raw", "vmdk")

    p = images / "exabyte.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    write_qcow2_header(p, size=1 << 60)
    out["exabyte-virtual-size"] = (p, "qcow2", "virtual size")

    p = images / "unknown-feature.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    write_qcow2_header(p, incompatible_features=1 << 40)
    out["unknown-incompatible-feature"] = (p, "qcow2", "feature")

    p = images / "truncated.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    p.write_bytes(p.read_bytes()[:40])
    out["truncated-header"] = (p, "qcow2", "qcow2")

    zeros = tmp_path / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(64 << 20)
    p = images / "bomb.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(zeros), str(p))
    out["compressed-expands-past-disk"] = (p, "qcow2", "larger than the disk")

    # Every other format the inspector knows, but gpt, disagrees with a raw declaration.
    for fmt, name in (
        ("vmdk", "vmdk"),
        ("vpc", "vhd"),
        ("vhdx", "vhdx"),
        ("vdi", "vdi"),
        ("qed", "qed"),
    ):
        p = images / f"really-{name}.raw"
        qemu_img("create", "-f", fmt, str(p), "1M")
        out[f"raw-declared-{name}"] = (p, "raw", f"content is {name}")
    p = images / "really-luks.raw"
    luks_image(p)
    out["raw-declared-luks"] = (p, "raw", "content is luks")
    p = images / "really-iso.raw"
    p.write_bytes(b"")
    write_iso_descriptor(p)
    out["raw-declared-iso"] = (p, "raw", "content is iso")

    # An ISO descriptor inside a qcow2's first cluster: two headers, refused as either.
    p = images / "iso-and-qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    write_iso_descriptor(p)
    out["iso-and-qcow2-declared-raw"] = (p, "raw", "more than one format (iso, qcow2)")
    out["iso-and-qcow2-declared-qcow2"] = (p, "qcow2", "more than one format (iso, qcow2)")
    return out


def qcow2_disk(image: str) -> dict[str, Any]:
    return disk("d", backend="qcow2", fmt="qcow2", size="16MiB", image=image, template=None)


def refusals(
    env: Env,
    cases: Mapping[str, tuple[Path, str]],
    disk_for: Callable[[str], dict[str, Any]] = qcow2_disk,
    run: Callable[[Env], tuple[int, str]] | None = None,
) -> tuple[dict[str, str], str]:
    """One disk from each image (file, declared format) in one run, the disk as
    `disk_for(image name)` says: every one must be refused. Returns image name -> its
    FAILED line, and the whole output (`run`, if given, runs the reconciler: rc, output);
    the caller checks that its pool was left as it was."""
    env.images = {name: catalog_entry(path, fmt) for name, (path, fmt) in cases.items()}
    env.write_config()
    by_instance = {env.manifest(name, [disk_for(name)]): name for name in cases}
    if run is None:
        rc, out, _ = env.run()
    else:
        rc, out = run(env)
    assert rc == 1, out
    failures = {
        by_instance[line.split()[2].split("/")[0]]: line
        for line in out.splitlines()
        if line.startswith("FAILED")
    }
    assert set(failures) == set(cases), out
    return failures, out


def hostile_refused(
    env: Env,
    images: Path,
    tmp_path: Path,
    disk_for: Callable[[str], dict[str, Any]] = qcow2_disk,
    run: Callable[[Env], tuple[int, str]] | None = None,
) -> None:
    """Every hostile() image refused in one run, each for its reason, with no byte of
    the host file it points at in the output. The caller checks that nothing was left."""
    cases = hostile(images, tmp_path)
    failures, out = refusals(
        env, {name: (path, fmt) for name, (path, fmt, _) in cases.items()}, disk_for, run
    )
    for name, line in failures.items():
        assert cases[name][2] in line, (name, line)
    assert (tmp_path / "host-secret").read_text() not in out


def test_hostile_images_are_refused_and_leave_nothing(
    env: Env, images: Path, tmp_path: Path
) -> None:
    hostile_refused(env, images, tmp_path)
    assert pool_contents(env) == []
    assert records(env) == []


def env_instance(env: Env, name: str) -> str:
    doc: dict[str, str] = json.loads((env.manifests / f"{name}.yaml").read_text())
    return doc["instance"]


def test_partitioned_raw_images_are_accepted_with_their_data(env: Env, tmp_path: Path) -> None:
    """A raw disk with a GPT, and one with an MBR partition table, declared raw: each is
    cached as raw and a flat raw disk and a qcow2 overlay made from it hold its bytes."""
    gpt = partitioned(tmp_path / "gpt.raw", "gpt")
    mbr = partitioned(tmp_path / "mbr.raw", "dos")
    # What the test is about: a protective MBR and a plain one, both of which oslo names
    # "gpt" (and which were refused as raw).
    assert mbr_entry_types(gpt) == [0xEE, 0, 0, 0]
    assert mbr_entry_types(mbr) == [0x83, 0x83, 0, 0]
    for p in (gpt, mbr):
        found = fi.detect_file_format(str(p))
        assert found is not None and found.NAME == "gpt"
    env.images = {"gpt": catalog_entry(gpt, "raw"), "mbr": catalog_entry(mbr, "raw")}
    env.write_config()
    disks = {
        name: env.manifest(
            name,
            [
                disk("flat", fmt="raw", size="16MiB", image=name, template=None),
                disk("cow", backend="qcow2", fmt="qcow2", size="16MiB", image=name, template=None),
            ],
        )
        for name in env.images
    }
    rc, out, err = env.run()
    assert rc == 0, out + err
    for name, image in (("gpt", gpt), ("mbr", mbr)):
        assert same_data(env.volume(disks[name], "flat"), "raw", image), name
        assert same_data(env.volume(disks[name], "cow"), "qcow2", image), name
    caches = {r.source["image"]: r for r in records(env) if r.kind is RecordKind.CACHE}
    assert sorted(caches) == ["gpt", "mbr"]
    for name, image in (("gpt", gpt), ("mbr", mbr)):
        assert caches[name].format.value == "raw"
        assert (env.pool_dir() / caches[name].volume).read_bytes() == image.read_bytes(), name
    assert env.plan_json()["actions"] == []


def test_broken_partition_tables_are_refused_and_named_by_kind(env: Env, tmp_path: Path) -> None:
    """What oslo's check_mbr_partitions refuses (an invalid boot flag, no partition, a
    protective MBR with another partition or the wrong start), and a partition table that
    is also an ISO, are refused as raw; an MBR is never called GPT."""
    d = tmp_path / "tables"
    d.mkdir()
    # name -> (image, phrases the refusal must contain)
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    p = partitioned(d / "empty.raw", "dos", partitions=0)  # a label, no partition
    cases["mbr-empty"] = (p, ("MBR partition table", "no partitions defined"))

    p = partitioned(d / "boot-flag.raw", "dos")
    patch(p, MBR_ENTRIES, b"\x01")  # 0x00 and 0x80 are the only valid flags
    cases["mbr-boot-flag"] = (p, ("MBR partition table", "invalid boot flag"))

    p = partitioned(d / "hybrid.raw", "gpt")
    # A second MBR entry (type 0x83, LBA 2048 + 2048) beside the protective one.
    patch(p, MBR_ENTRIES + 16 + 4, b"\x83")
    patch(p, MBR_ENTRIES + 16 + 8, struct.pack("<II", 2048, 2048))
    cases["gpt-hybrid"] = (p, ("GPT partition table", "invalid extra partitions"))

    p = partitioned(d / "start.raw", "gpt")
    patch(p, MBR_ENTRIES + 8, struct.pack("<I", 2))  # the protective entry starts at LBA 1
    cases["gpt-start"] = (p, ("GPT partition table", "invalid start LBA"))

    p = partitioned(d / "iso.raw", "dos")
    write_iso_descriptor(p)  # in the gap before the first partition, as isohybrid does
    cases["mbr-iso"] = (p, ("more than one format (MBR partition table, iso)",))

    failures, _ = refusals(env, {name: (path, "raw") for name, (path, _) in cases.items()})
    for name, line in failures.items():
        for phrase in cases[name][1]:
            assert phrase in line, (name, line)
        if name.startswith("mbr"):
            assert "gpt" not in line.lower(), line
    assert pool_contents(env) == []
    assert records(env) == []


def test_checksum_and_size_mismatches_are_refused(env: Env, images: Path) -> None:
    bad_sha = catalog_entry(images / "good.raw", "raw")
    bad_sha["sha256"] = "0" * 64
    short = catalog_entry(images / "good.raw", "raw")
    short["size"] = short["size"] - 512
    env.images = {"bad-sha": bad_sha, "short": short}
    env.write_config()
    env.manifest("a", [disk("d", size="16MiB", image="bad-sha", template=None)])
    env.manifest("b", [disk("d", size="16MiB", image="short", template=None)])
    rc, out, _ = env.run()
    assert rc == 1
    assert "sha256 mismatch" in out
    assert "larger than the" in out
    assert pool_contents(env) == [] and records(env) == []
    # The fetches' sha256 threads ended with them, refused or not.
    assert not [t for t in threading.enumerate() if t.name == "sha256"]


def test_qemu_img_over_its_limits_is_killed_and_cleaned_up(tmp_path: Path) -> None:
    leftover = tmp_path / "partial"
    leftover.write_bytes(b"x")
    hog = [sys.executable, "-c", "b = bytearray(3 << 30)"]
    with pytest.raises(ImageRejected, match=r"over its CPU or memory limit|MemoryError"):
        run_limited(hog, what="test", cleanup=leftover.unlink)
    assert not leftover.exists()


def test_cache_gc_keeps_entries_in_use_and_removes_unused(env: Env, images: Path) -> None:
    env.images = {"img": catalog_entry(images / "good.raw", "raw")}
    env.write_config()
    for i in range(20):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest(
        "vm", [disk("root", backend="qcow2", fmt="qcow2", size="16MiB", image="img", template=None)]
    )
    flat = env.manifest("flat", [disk("root", size="16MiB", image="img", template=None)])
    assert env.run()[0] == 0
    rc, out, _ = env.main(["cache", "ls", "--config", str(env.config_path)])
    assert rc == 0 and "image img" in out and "1 cache entry" in out
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert "0 removed, 1 kept" in out and "used by 1 disk(s)" in out
    # The flat copy does not depend on the entry; the overlay does. Remove the overlay.
    env.manifest("vm", [], instance=inst, deleted=True)
    assert env.run()[0] == 0
    rc, out, _ = env.main(["cache", "gc", "--min-age", "1h", "--config", str(env.config_path)])
    assert "0 removed, 1 kept" in out and "more recently" in out
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert "1 removed, 0 kept" in out
    assert [r for r in records(env) if r.kind is RecordKind.CACHE] == []
    assert not any(n.startswith("_cache_") for n in pool_contents(env))
    assert env.volume(flat, "root").exists()


def test_gc_running_beside_creates_never_removes_an_entry_in_use(env: Env, images: Path) -> None:
    from reconciler.commands import cache
    from reconciler.control.session import Session
    from reconciler.schema.load import load_config

    env.images = {
        "img": catalog_entry(images / "good.raw", "raw"),
        "copies": catalog_entry(images / "good.qcow2", "qcow2"),
    }
    env.write_config()
    for i in range(16):
        env.manifest(
            f"vm{i}",
            [
                disk(
                    "root", backend="qcow2", fmt="qcow2", size="16MiB", image="img", template=None
                ),
                disk("copy", size="16MiB", image="copies", template=None),
                disk("eph", backend="qcow2", fmt="qcow2", size="8MiB", template="ext4"),
            ],
        )
    creator = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--config", str(env.config_path), str(env.manifests)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    collections = 0
    removed = 0
    deadline = time.monotonic() + 240  # a bound, not a wait: the loop ends with the creator
    with Session(load_config(str(env.config_path))) as s:
        while creator.poll() is None and time.monotonic() < deadline:
            gone, _ = cache.gc(s.store, s.managing_drivers(), 0.0)
            removed += len(gone)
            collections += 1
    out, err = creator.communicate(timeout=300)
    assert creator.returncode == 0, out + err
    recs = records(env)
    entries = {r.volume for r in recs if r.kind is RecordKind.CACHE}
    present = set(pool_contents(env))
    for r in recs:
        if r.backing:
            assert r.backing in entries and r.backing in present, r.volume
    assert env.plan_json()["actions"] == []
    print(f"gc runs during the create: {collections}, entries removed: {removed}")
