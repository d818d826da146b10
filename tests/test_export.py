"""`reconcile export INSTANCE/DISK --format raw|qcow2 --out FILE` on a real libvirtd, real
qemu-img and a real LVM VG: the disk is found by its record and read in its recorded
format; the file is whole or absent; the printed catalog entry makes a new disk.

Asserted: a raw export of a raw disk is a sparse copy of its bytes (no qemu-img run), a
qcow2 export of a qcow2 overlay stands alone (no backing) and reads as the disk; the
printed catalog entry, pasted into a config as it is, makes a disk with the same content;
a raw disk holding a guest-written qcow2 header that names a host file is exported as its
raw bytes and no process of the export opens that file (strace -f, raw and qcow2 exports);
every refusal is one line, no traceback, nothing left behind (no record, an unknown
snapshot, a missing directory, an existing FILE without --force, a file size limit as
disk full); a SIGKILL at each step boundary leaves no FILE or the whole one, at most the
temporary, which the next export removes; an LV's export reads as the LV does.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.util.outfile import temp_path
from tests.conftest_lvm import VolumeGroup
from tests.env import ROOT, Env, disk
from tests.test_images import catalog_entry
from tests.test_migrate import QEMU_FMT, content, write_pattern
from tests.test_preallocation import qemu_info

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20


def export_argv(env: Env, *args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "export", "--config", str(env.config_path), *args]


def export(
    e: Env, *args: str, prefix: tuple[str, ...] = (), **kw: Any
) -> subprocess.CompletedProcess[str]:
    if "stderr" not in kw:
        kw["capture_output"] = True
    return subprocess.run(
        [*prefix, *export_argv(e, *args)],
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        **kw,
    )


def exported(e: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """`reconcile export ARGS` run in this process (Env.main), as a CompletedProcess."""
    argv = ["export", "--config", str(e.config_path), *args]
    try:
        rc, out, err = e.main(argv)
    except SystemExit as exit_:  # argparse's usage error
        rc, out, err = int(exit_.code or 0), "", "usage error"
    return subprocess.CompletedProcess(argv, rc, out, err)


def export_ok(env: Env, *args: str) -> dict[str, Any]:
    res = exported(env, *args, "--output", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def refused(res: subprocess.CompletedProcess[str], *words: str) -> str:
    assert res.returncode != 0 and res.stdout == "", res.stdout + res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr
    return res.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pasted_entry(text: str) -> dict[str, Any]:
    """The catalog entry the text output ends with, taken as an operator pastes it: the
    lines after its heading, under a config's `images:`."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("catalog entry"))
    doc = yaml.safe_load("images:\n" + "\n".join(lines[at + 1 :]) + "\n")
    images: dict[str, Any] = doc["images"]
    return images


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw image of recognisable data, 4 MiB (the cache entry overlays are backed by)."""
    p = tmp_path / "base.raw"
    p.write_bytes(b"".join(hashlib.sha256(b"base%d" % i).digest() for i in range(1 << 17)))
    return p


def test_exports_read_the_recorded_format_and_the_entry_makes_a_disk(
    env: Env, image: Path, tmp_path: Path
) -> None:
    env.images = {"base": catalog_entry(image, "raw")}
    env.backends = ["flat", "qcow2", "ploop"]
    env.write_config()
    formats = {"flat": "raw", "over": "qcow2", "ploop": "ploop"}
    inst = env.manifest(
        "vm",
        [
            disk("flat", size="16MiB"),
            disk("over", backend="qcow2", fmt="qcow2", size="16MiB", image="base", template=None),
            disk("ploop", backend="ploop", fmt="ploop", size="16MiB", image="base", template=None),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    want = {}
    for name, fmt in formats.items():
        write_pattern(env.volume(inst, name), fmt)
        want[name] = content(env.volume(inst, name), fmt, tmp_path)
    assert want["over"] != content(image, "raw", tmp_path)  # the backing's data and the guest's

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in formats:
        raw = out_dir / f"{name}.raw"
        doc = export_ok(env, f"{inst}/{name}", "--format", "raw", "--out", str(raw))
        assert doc["written_by"] == ("raw copy" if name == "flat" else "qemu-img convert")
        assert sha(raw) == want[name] == doc["sha256"]
        assert (doc["virtual_size"], doc["file_size"]) == (16 * MiB, 16 * MiB)
        assert raw.stat().st_mode & 0o777 == 0o600
        qcow = out_dir / f"{name}.qcow2"
        doc = export_ok(env, f"{inst}/{name}", "--format", "qcow2", "--out", str(qcow))
        assert doc["written_by"] == "qemu-img convert"
        info = qemu_info(qcow, "qcow2")
        assert "backing-filename" not in info and info["virtual-size"] == 16 * MiB
        assert content(qcow, "qcow2", tmp_path) == want[name]
        assert doc["sha256"] == sha(qcow) and doc["file_size"] == qcow.stat().st_size
        assert doc["catalog"] == {f"{inst}-{name}": catalog_entry(qcow, "qcow2")}
    # The raw copy of a raw disk stays sparse: 4 x 64 KiB of data in 16 MiB.
    assert (out_dir / "flat.raw").stat().st_blocks * 512 <= 1 * MiB
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]

    # The text output's entry, pasted as it is, makes a disk with the same content.
    res = export(env, f"{inst}/over", "--format", "qcow2", "--out", str(out_dir / "again.qcow2"))
    assert res.returncode == 0, res.stderr
    assert f"sha256:       {sha(out_dir / 'again.qcow2')}" in res.stdout
    entry = pasted_entry(res.stdout)
    assert list(entry) == [f"{inst}-over"]
    env.images.update(entry)
    env.write_config()
    copy = env.manifest("copy", [disk("root", size="16MiB", image=f"{inst}-over", template=None)])
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert content(env.volume(copy, "root"), "raw", tmp_path) == want["over"]


def test_a_guest_written_header_is_exported_as_raw_bytes_opening_no_host_file(
    env: Env, tmp_path: Path
) -> None:
    secret = tmp_path / f"host-secret-{uuid.uuid4().hex[:8]}"
    secret.write_bytes(b"host secret\n" * 100)
    inst = env.manifest("vm", [disk("guest", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    vol = env.volume(inst, "guest")
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        [
            *("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw"),
            "-b",
            str(secret),
            str(evil),
            "1G",
        ],
        check=True,
    )
    with open(vol, "r+b") as f:
        f.write(evil.read_bytes()[:65536])  # what the guest's `scribble` writes
    assert str(secret).encode() in vol.read_bytes()[:65536]
    env.manifest("vm", [snapped(disk("guest", size="8MiB"), "s1")], instance=inst)
    rc, out, err = env.run()  # a snapshot of the scribbled disk, as raw as the disk
    assert rc == 0, out + err

    for fmt, which in (("raw", ""), ("qcow2", ""), ("qcow2", "@s1")):
        out_file = tmp_path / f"guest{which}.{fmt}"
        trace = tmp_path / f"strace{which}-{fmt}.log"
        res = export(
            env,
            f"{inst}/guest{which}",
            "--format",
            fmt,
            "--out",
            str(out_file),
            prefix=("strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace)),
        )
        assert res.returncode == 0, res.stdout + res.stderr
        opened = trace.read_text()
        assert "openat(" in opened and str(vol) in opened  # the trace sees the export's opens
        assert str(secret) not in opened and "/etc/hostname" not in opened
        assert content(out_file, fmt, tmp_path) == sha(vol)  # the guest's bytes, header and all
        if fmt == "qcow2":
            assert "backing-filename" not in qemu_info(out_file, "qcow2")
    assert (tmp_path / "guest.raw").read_bytes()[:4] == b"QFI\xfb"


def test_refusals_are_one_line_and_leave_nothing(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    write_pattern(env.volume(inst, "d"), "raw")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    f = out_dir / "d.raw"

    refused(exported(env, f"{inst}/nope", "--format", "raw", "--out", str(f)), "no record")
    other = str(uuid.uuid4())
    refused(exported(env, f"{other}/d", "--format", "raw", "--out", str(f)), "no record")
    refused(
        exported(env, f"{inst}/d@snap1", "--format", "raw", "--out", str(f)), "no snapshot snap1"
    )
    refused(exported(env, f"{inst}/nope@snap1", "--format", "raw", "--out", str(f)), "no record")
    refused(
        exported(env, f"{inst}/d", "--format", "raw", "--out", str(tmp_path / "none" / "d.raw")),
        "does not exist",
    )
    vol = env.volume(inst, "d")
    before = sha(vol)
    for into in (vol, env.pool_dir() / "new.raw"):  # a disk itself, or a new unmanaged volume
        res = exported(env, f"{inst}/d", "--format", "raw", "--out", str(into), "--force")
        refused(res, "is in pool local")
    assert sha(vol) == before and not (env.pool_dir() / "new.raw").exists()
    res = exported(env, f"{inst}/d", "--format", "vmdk", "--out", str(f))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert list(out_dir.iterdir()) == []

    # A file size limit stands for a full disk: the write fails, nothing is left.
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    for fmt in ("raw", "qcow2"):
        res = export(env, f"{inst}/d", "--format", fmt, "--out", str(f), preexec_fn=small_files)
        refused(res, str(f))
        assert list(out_dir.iterdir()) == []

    first = export_ok(env, f"{inst}/d", "--format", "raw", "--out", str(f))
    refused(exported(env, f"{inst}/d", "--format", "qcow2", "--out", str(f)), "exists", "--force")
    assert sha(f) == first["sha256"]
    forced = export_ok(env, f"{inst}/d", "--format", "qcow2", "--out", str(f), "--force")
    assert sha(f) == forced["sha256"] != first["sha256"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["d.raw"]


def test_a_kill_at_each_step_leaves_no_file_or_the_whole_one(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    write_pattern(env.volume(inst, "d"), "raw")
    whole = sha(env.volume(inst, "d"))
    steps_file = tmp_path / "steps.txt"
    f = tmp_path / "first.raw"
    res = export(
        env,
        f"{inst}/d",
        "--format",
        "raw",
        "--out",
        str(f),
        env={**os.environ, "RECONCILER_TRACE_STEPS": str(steps_file)},
    )
    assert res.returncode == 0, res.stderr
    steps = [line.split()[1] for line in steps_file.read_text().splitlines()]
    assert steps == ["outfile.created", "outfile.written", "outfile.linked", "outfile.done"]
    for k, step in enumerate(steps, 1):
        f = tmp_path / f"k{k}.raw"
        res = export(
            env,
            f"{inst}/d",
            "--format",
            "raw",
            "--out",
            str(f),
            env={**os.environ, "RECONCILER_CRASH_AT": str(k)},
        )
        assert res.returncode == -signal.SIGKILL, (step, res.stderr)
        left = {p.name for p in tmp_path.glob(f"*k{k}.raw*")}
        assert left <= {f.name, temp_path(f).name}, (step, left)
        assert not f.exists() or sha(f) == whole, step
        assert f.exists() == (k >= 3), step
        if f.exists():
            f.unlink()
        doc = export_ok(env, f"{inst}/d", "--format", "raw", "--out", str(f))
        assert doc["sha256"] == sha(f) == whole and not temp_path(f).exists(), step


def test_an_lvm_disk_is_exported_as_the_lv_reads(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    env = lvm_env
    inst = env.manifest("vm", [disk("d", backend="lvm", pool="vg", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    lv = f"{inst}_d"
    data = b"".join(hashlib.sha256(b"lv%d" % i).digest() for i in range(2048))
    lvm_vg.write_lv(lv, 1 * MiB, data)
    want = hashlib.sha256(lvm_vg.segment_bytes(lv, 8 * MiB)).hexdigest()
    raw, qcow = tmp_path / "lv.raw", tmp_path / "lv.qcow2"
    doc = export_ok(env, f"{inst}/d", "--format", "raw", "--out", str(raw))
    assert doc["written_by"] == "raw copy" and sha(raw) == want == doc["sha256"]
    assert raw.stat().st_blocks * 512 <= 1 * MiB  # zero blocks skipped: sparse
    doc = export_ok(env, f"{inst}/d", "--format", "qcow2", "--out", str(qcow))
    assert doc["written_by"] == "qemu-img convert"
    assert content(qcow, "qcow2", tmp_path) == want


def wait_for(cond: Any, what: str, deadline: float = 60) -> None:
    """Poll `cond` until true, failing after `deadline` seconds (a condition, not a sleep)."""
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_second_export_to_the_same_file_is_refused_while_the_first_writes(
    env: Env, tmp_path: Path
) -> None:
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    write_pattern(env.volume(inst, "d"), "raw")
    f, flag = tmp_path / "d.qcow2", tmp_path / "paused"
    first = subprocess.Popen(
        export_argv(env, f"{inst}/d", "--format", "qcow2", "--out", str(f)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "RECONCILER_PAUSE_AT": f"1:{flag}"},  # outfile.created
    )
    try:
        wait_for(flag.exists, "the first export to hold its temporary")
        assert temp_path(f).exists() and not f.exists()
        res = export(env, f"{inst}/d", "--format", "raw", "--out", str(f))
        refused(res, "another export", "under way")
        assert temp_path(f).exists()  # the first one's, left alone
    finally:
        flag.unlink(missing_ok=True)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert content(f, "qcow2", tmp_path) == sha(env.volume(inst, "d"))
    assert not temp_path(f).exists()


def test_progress_is_shown_on_a_terminal(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", size="8MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    write_pattern(env.volume(inst, "d"), "raw")
    master, slave = os.openpty()
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        res = export(
            env,
            f"{inst}/d",
            "--format",
            "qcow2",
            "--out",
            str(tmp_path / "d.qcow2"),
            stderr=slave,
            stdout=subprocess.PIPE,
            env={**os.environ, "RECONCILER_PROGRESS_EVERY": "0"},
        )
    finally:
        os.close(slave)
        reader.join(timeout=60)
        os.close(master)
    assert res.returncode == 0, res.stdout
    text = seen.decode(errors="replace")
    assert f"export {inst}/d to " in text and "of 8.0 MiB" in text, text


def snapped(d: dict[str, Any], *names: str) -> dict[str, Any]:
    """A disk of the manifest with `snapshots: [NAMES]`."""
    return {**d, "snapshots": list(names)}


def scribble_after(path: Path, fmt: str) -> None:
    """Guest data written after a snapshot: the disk changes, the snapshot must not."""
    subprocess.run(
        ["qemu-io", "-f", QEMU_FMT[fmt], "-c", "write -P 0x77 2M 64k", str(path)],
        check=True,
        capture_output=True,
    )


def test_a_snapshot_is_exported_as_it_was_taken(env: Env, image: Path, tmp_path: Path) -> None:
    env.images = {"base": catalog_entry(image, "raw")}
    env.write_config()
    disks = [
        disk("flat", size="16MiB"),
        disk("over", backend="qcow2", fmt="qcow2", size="16MiB", image="base", template=None),
    ]
    formats = {"flat": "raw", "over": "qcow2"}
    inst = env.manifest("vm", disks)
    rc, out, err = env.run()
    assert rc == 0, out + err
    want = {}
    for name, fmt in formats.items():
        write_pattern(env.volume(inst, name), fmt)
        want[name] = content(env.volume(inst, name), fmt, tmp_path)
    env.manifest("vm", [snapped(d, "s1") for d in disks], instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    for name, fmt in formats.items():
        scribble_after(env.volume(inst, name), fmt)
        assert content(env.volume(inst, name), fmt, tmp_path) != want[name]

    for name in formats:
        for fmt in ("raw", "qcow2"):
            f = tmp_path / f"{name}-s1.{fmt}"
            doc = export_ok(env, f"{inst}/{name}@s1", "--format", fmt, "--out", str(f))
            assert doc["written_by"] == "qemu-img convert" and doc["sha256"] == sha(f)
            assert doc["volume"] == f"{inst}_{name}+snap-s1"
            assert content(f, fmt, tmp_path) == want[name], (name, fmt)
            assert list(doc["catalog"]) == [f"{inst}-{name}-s1"]
            if fmt == "qcow2":
                assert "backing-filename" not in qemu_info(f, "qcow2")
    res = export(env, f"{inst}/flat@s2", "--format", "raw", "--out", str(tmp_path / "s2.raw"))
    refused(res, "no snapshot s2")


def test_an_lvm_snapshot_is_exported_as_it_was_taken(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    env = lvm_env
    d = disk("d", backend="lvm", pool="vg", size="8MiB")
    inst = env.manifest("vm", [d])
    rc, out, err = env.run()
    assert rc == 0, out + err
    lv = f"{inst}_d"
    lvm_vg.write_lv(lv, 1 * MiB, b"before" * 1000)
    want = hashlib.sha256(lvm_vg.segment_bytes(lv, 8 * MiB)).hexdigest()
    env.manifest("vm", [snapped(d, "s1")], instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    lvm_vg.write_lv(lv, 1 * MiB, b"after!" * 1000)
    assert hashlib.sha256(lvm_vg.segment_bytes(lv, 8 * MiB)).hexdigest() != want
    for fmt in ("raw", "qcow2"):
        f = tmp_path / f"s1.{fmt}"
        doc = export_ok(env, f"{inst}/d@s1", "--format", fmt, "--out", str(f))
        assert content(f, fmt, tmp_path) == want
        assert doc["sha256"] == sha(f) and (fmt == "qcow2" or sha(f) == want)


def decrypted(env: Env, inst: str, name: str, key_dir: Path, tmp: Path) -> str:
    """sha256 of disk `name` decrypted by qemu-img itself, its key the stored one."""
    store = env.store()
    try:
        (rec,) = [r for r in store.for_instance(inst) if r.disk == name]
    finally:
        store.close()
    assert rec.encryption is not None
    vol = {"driver": "file", "filename": str(env.volume(inst, name))}
    node: dict[str, Any] = (
        {"driver": "luks", "key-secret": "k", "file": vol}
        if rec.format.value == "raw"
        else {"driver": "qcow2", "encrypt": {"key-secret": "k"}, "file": vol}
    )
    out = tmp / f"plain-{name}.raw"
    subprocess.run(
        [
            *("qemu-img", "convert", "--object"),
            f"secret,id=k,format=raw,file={key_dir / rec.encryption.secret}",
            *("-f", node["driver"], "-O", "raw", "json:" + json.dumps(node), str(out)),
        ],
        check=True,
        capture_output=True,
    )
    return sha(out)


def test_an_encrypted_disk_is_exported_decrypted_with_its_key_from_the_key_source(
    env: Env, image: Path, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    lp, _ = env.pools["local"]
    pool = {"uri": env.uri, "libvirtPool": lp, "backends": ["flat", "qcow2"]}
    env.images = {"base": catalog_entry(image, "raw")}
    env.extra_pools = {"local": {**pool, "keys": {"directory": str(key_dir)}}}
    env.write_config()
    luks = {"encryption": {"format": "luks"}}
    inst = env.manifest(
        "vm",
        [
            {**disk("raw", size="16MiB", image="base", template=None), **luks},
            {**disk("q", fmt="qcow2", size="16MiB", image="base", template=None), **luks},
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    stored = {p.read_bytes() for p in key_dir.iterdir()}
    assert len(stored) == 2
    # What the guest reads, decrypted here by qemu-img with the stored key: the image's
    # bytes first (a LUKS payload past them reads as noise: nothing was written there).
    want = {name: decrypted(env, inst, name, key_dir, tmp_path) for name in ("raw", "q")}
    for name in want:
        assert (tmp_path / f"plain-{name}.raw").read_bytes()[: len(image.read_bytes())] == (
            image.read_bytes()
        )
    assert sha(env.volume(inst, "raw")) != want["raw"]  # ciphertext at rest

    for name in ("raw", "q"):
        for fmt in ("raw", "qcow2"):
            f = tmp_path / f"{name}.{fmt}"
            res = exported(env, f"{inst}/{name}", "--format", fmt, "--out", str(f))
            assert res.returncode == 0, res.stdout + res.stderr
            assert content(f, fmt, tmp_path) == want[name], (name, fmt)
            assert "decrypted" in res.stdout
            assert not any(k.decode() in res.stdout + res.stderr for k in stored)
            if fmt == "qcow2":
                assert "encrypt" not in qemu_info(f, "qcow2").get("format-specific", {}).get(
                    "data", {}
                )

    env.extra_pools = {"local": pool}  # no key source: the key is in a private secret only
    env.write_config()
    res = exported(env, f"{inst}/raw", "--format", "raw", "--out", str(tmp_path / "no.raw"))
    refused(res, "no key source")
    assert not (tmp_path / "no.raw").exists()
    env.manifest("vm", [], instance=inst, deleted=True)  # its secrets go with its disks
    rc, out, err = env.run("--force")
    assert rc == 0, out + err
