"""`reconcile import-nova` on a Nova-shaped instances directory built with qemu-img: the
formats come from disk.info (also where a guest wrote another format's header) or the
Nova config, qcow2 backing files must be in _base/ and become cache entries, the disks
move into the pool with their data, a dry run changes nothing, and the manifests written
plan to nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from reconciler.commands.nova_layout import nova_base_entry
from reconciler.model.record import RecordKind
from reconciler.schema.manifestdir import load_manifests
from tests.conftest import Pools
from tests.env import ROOT, Env
from tests.killpoints import at_each
from tests.test_images import catalog_entry
from tests.test_migrate import content

pytestmark = pytest.mark.libvirtd

IMAGE = "img-1"
A = "0a0a0a0a-1111-4222-8333-444444444444"  # qcow2 overlays, disk.info, a hostile header
B = "0b0b0b0b-1111-4222-8333-444444444444"  # backed by a file outside _base: refused
C = "0c0c0c0c-1111-4222-8333-444444444444"  # no disk.info: formats from the config


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(fmt: str, path: Path, *writes: str) -> None:
    cmds = [arg for w in writes for arg in ("-c", w)]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, capture_output=True)


def nova_host(root: Path) -> tuple[Path, dict[str, str]]:
    """A Nova instances_path: _base with one image, three instances. Returns it and the
    content (sha256 as the guest sees it) of each disk to be imported."""
    nova = root / "instances"
    base = nova / "_base"
    base.mkdir(parents=True)
    image = base / hashlib.sha1(IMAGE.encode()).hexdigest()
    qemu_img("create", "-q", "-f", "raw", str(image), "8M")
    qemu_io("raw", image, "write -P 0x5a 0 1M")
    a = nova / A
    a.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(a / "disk"), "8M")
    qemu_io("qcow2", a / "disk", "write -P 0x61 512k 64k")
    # The guest of disk.local wrote a qcow2 header naming a host file at its start.
    hostile = root / "hostile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile), "8M")
    (a / "disk.local").write_bytes(hostile.read_bytes()[:65536].ljust(8 << 20, b"\0"))
    (a / "disk.config").write_bytes(b"config drive".ljust(1 << 20, b"\0"))
    (a / "disk.info").write_text(
        json.dumps({str(a / "disk"): "qcow2", str(a / "disk.local"): "raw"}) + "\n"
    )
    (a / "console.log").write_text("boot\n")
    (a / "disk.rescue").write_bytes(b"\0" * 4096)
    b = nova / B
    b.mkdir()
    outside = root / "outside.raw"
    outside.write_bytes(b"host secret".ljust(1 << 20, b"\0"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(b / "disk"), "8M")
    (b / "disk.info").write_text(json.dumps({str(b / "disk"): "qcow2"}) + "\n")
    c = nova / C
    c.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(c / "disk"), "8M")
    want = {
        f"{A}/disk": content(a / "disk", "qcow2", root),
        f"{A}/disk.local": content(a / "disk.local", "raw", root),
        f"{A}/disk.config": content(a / "disk.config", "raw", root),
        f"{C}/disk": content(c / "disk", "qcow2", root),
    }
    return nova, want


def run_import(env: Env, nova: Path, *more: str) -> tuple[int, str, str]:
    return env.main(
        [
            "import-nova",
            "--config",
            str(env.config_path),
            "--instances-path",
            str(nova),
            "--images-type",
            "qcow2",
            "--pool",
            "local",
            "--out",
            str(env.manifests),
            *more,
        ]
    )


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_import_nova(env: Env, tmp_path: Path) -> None:
    nova, want = nova_host(tmp_path / "host")
    image = nova / "_base" / hashlib.sha1(IMAGE.encode()).hexdigest()
    env.images = {IMAGE: catalog_entry(image, "raw")}
    env.write_config()
    before, pool_before = tree(nova), tree(env.pool_dir())

    rc, out, err = run_import(env, nova, "--dry-run")
    assert rc == 1  # B is refused, and says so
    assert f"would move {nova / A / 'disk'} -> local/{A}_disk (qcow2 from disk.info" in out
    assert "would write" in out and f"{B}: not imported" in err
    assert tree(nova) == before and tree(env.pool_dir()) == pool_before
    assert not list(env.manifests.glob("*.yaml"))

    rc, out, err = run_import(env, nova)
    assert rc == 1, out + err
    assert "not a cache entry" not in err and f"is not in {nova / '_base'}" in err
    assert f"{A}/disk.local: its first bytes look like qcow2, but disk.info says raw" in err
    assert "disk.rescue is not one of Nova's instance disks" in err
    assert sorted(p.name for p in env.manifests.glob("*.yaml")) == [f"{A}.yaml", f"{C}.yaml"]
    store = env.store()
    recs = {r.volume: r for r in store.load_all()[0]}
    store.close()
    entry = nova_base_entry(image.name)
    assert recs[entry].kind is RecordKind.CACHE
    root = recs[f"{A}_disk"]
    assert (root.backend.value, root.format.value, root.backing) == ("qcow2", "qcow2", entry)
    assert root.source == {"image": IMAGE}  # Nova's _base name is its id's sha1
    assert recs[f"{A}_disk.local"].format.value == "raw"  # the record, not the header
    assert recs[f"{C}_disk"].format.value == "qcow2"  # from the config
    for key, digest in want.items():
        inst, name = key.split("/")
        rec = recs[f"{inst}_{name}"]
        assert content(env.pool_dir() / rec.volume, rec.format.value, tmp_path) == digest, key
    # The overlays now name the pool's entry, with backing format raw.
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(env.pool_dir() / f"{A}_disk")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["backing-filename"] == str(env.pool_dir() / entry)
    assert info["backing-filename-format"] == "raw"
    # Moved out of Nova's directory; _base and the refused instance untouched.
    assert not (nova / A / "disk").exists() and (nova / A / "console.log").exists()
    assert tree(nova / B) == {k[len(B) + 1 :]: v for k, v in before.items() if k.startswith(B)}
    assert (nova / "_base" / image.name).exists()

    loaded, failed = load_manifests([str(env.manifests)], None)
    assert not failed and len(loaded) == 2
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == [], plan
    assert [w["code"] for w in plan["warnings"]] == ["format-mismatch"]

    # A second run finds nothing more to move and still refuses B.
    rc, out, err = run_import(env, nova)
    assert rc == 1 and f"{B}: not imported" in err and "move" not in out

    # An imported overlay migrates like any disk: flattened to raw, the data kept.
    text = (env.manifests / f"{A}.yaml").read_text()
    (env.manifests / f"{A}.yaml").write_text(
        text.replace(
            "backend: qcow2\n    pool: local\n    format: qcow2",
            "backend: flat\n    pool: local\n    format: raw",
            1,
        )
    )
    rc, out, err = env.run()
    assert rc == 0 and "migrated" in out, out + err
    assert content(env.pool_dir() / f"{A}_disk", "raw", tmp_path) == want[f"{A}/disk"]


def test_a_bad_disk_info_is_that_instances_error_only(env: Env, tmp_path: Path) -> None:
    """disk.info in UTF-16 or latin-1, nested absurdly, a FIFO, a symbolic link (to a host
    file) or huge: each is that instance's one-line error, read without blocking; the other
    instances are imported. A child process, so a hang is the timeout's error."""
    nova, want = nova_host(tmp_path / "host")
    image = nova / "_base" / hashlib.sha1(IMAGE.encode()).hexdigest()
    env.images = {IMAGE: catalog_entry(image, "raw")}
    env.write_config()
    bad = {
        "utf16": ("0d000001-1111-4222-8333-444444444444", "not UTF-8 text (byte 0 is 0xff)"),
        "latin1": ("0d000002-1111-4222-8333-444444444444", "not UTF-8 text (byte 2 is 0xe9)"),
        "deep": ("0d000003-1111-4222-8333-444444444444", "JSON nested deeper than 2 levels"),
        "fifo": ("0d000004-1111-4222-8333-444444444444", "is a FIFO, not a regular file; not read"),
        "link": (
            "0d000005-1111-4222-8333-444444444444",
            "is a symbolic link, not a regular file; not read",
        ),
        "huge": ("0d000006-1111-4222-8333-444444444444", "1073741824 bytes, more than"),
    }
    for kind, (inst, _) in bad.items():
        d = nova / inst
        d.mkdir()
        (d / "disk").write_bytes(b"data".ljust(1 << 20, b"\0"))
        info = d / "disk.info"
        text = json.dumps({str(d / "disk"): "raw"})
        if kind == "utf16":
            info.write_bytes(text.encode("utf-16"))
        elif kind == "latin1":
            info.write_bytes(b'{"' + "é".encode("latin-1") + b'": "raw"}')
        elif kind == "deep":
            info.write_bytes(b'{"a":' * 10_000)  # within the size limit
        elif kind == "fifo":
            os.mkfifo(info)
        elif kind == "link":
            info.symlink_to("/etc/passwd")
        else:
            with open(info, "wb") as f:
                f.truncate(1 << 30)  # sparse
    res = subprocess.run(
        [
            *(sys.executable, "-m", "reconciler", "import-nova", "--config"),
            *(str(env.config_path), "--instances-path", str(nova), "--images-type", "qcow2"),
            *("--pool", "local", "--out", str(env.manifests)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = res.stderr.splitlines()
    for inst, message in bad.values():
        info = nova / inst / "disk.info"
        assert any(e.startswith(f"error: {inst}: {info}: {message}") for e in errors), res.stderr
        assert f"error: {inst}: not imported (nothing of it is moved)" in errors
        assert (nova / inst / "disk").exists()
    names = sorted(p.name for p in env.manifests.glob("*.yaml"))
    assert names == [f"{A}.yaml", f"{C}.yaml"]  # the others imported (B refused, as ever)
    store = env.store()
    recs = {r.volume for r in store.load_all()[0]}
    store.close()
    assert {f"{k.replace('/', '_')}" for k in want} <= recs
    assert not any(v.startswith("0d0000") for v in recs)


def test_a_disk_on_another_file_system_is_copied(env: Env, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == env.pool_dir().stat().st_dev:
        pytest.skip("no second file system (/dev/shm) on this host")
    host = shm / f"nova-{uuid.uuid4().hex[:12]}"  # tmp_path's name repeats across runs
    try:
        nova, want = nova_host(host)
        rc, out, err = run_import(env, nova)
        assert rc == 1, out + err  # B
        store = env.store()
        recs = {r.volume: r for r in store.load_all()[0]}
        store.close()
        for key, digest in want.items():
            inst, name = key.split("/")
            rec = recs[f"{inst}_{name}"]
            assert content(env.pool_dir() / rec.volume, rec.format.value, tmp_path) == digest
        assert not (nova / A / "disk").exists()
        assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(".reconciler-tmp")]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(host)], check=False)


def test_kill_at_every_import_step(env: Env, pools: Pools, tmp_path: Path) -> None:
    """SIGKILL at each step boundary of an import, then a second import: every disk ends
    in the pool, recorded, with its data; nothing is left in Nova's directory of what moved,
    no temporary file and no volume without a record. Each kill point has a Nova directory,
    dir pool and env of its own, and two run at a time (tests/killpoints.py)."""
    import os
    import sys

    from tests.env import ROOT

    def run(env: Env, nova: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        argv = [
            *(sys.executable, "-m", "reconciler", "import-nova"),
            *("--config", str(env.config_path), "--instances-path", str(nova)),
            *("--images-type", "qcow2", "--pool", "local", "--out", str(env.manifests)),
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **extra}, check=False
        )

    nova, _ = nova_host(tmp_path / "trace")
    trace = tmp_path / "steps.txt"
    assert run(env, nova, {"RECONCILER_TRACE_STEPS": str(trace)}).returncode == 1  # B
    steps = trace.read_text().splitlines()
    assert {"nova.disk.pointed", "volume.imported", "nova.disk.recorded"} <= {
        s.split()[1] for s in steps
    }

    def kill_at(n: int) -> None:
        root = tmp_path / f"k{n}"
        pool = pools.make(root / "pool")
        env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
        env.write_config()
        nova, want = nova_host(root)
        res = run(env, nova, {"RECONCILER_CRASH_AT": str(n)})
        assert res.returncode == -9, (n, steps[n - 1], res.stderr)
        res = run(env, nova, {})
        assert res.returncode == 1 and "not imported" in res.stderr, (n, res.stderr)
        store = env.store()
        recs = {r.volume: r for r in store.load_all()[0]}
        store.close()
        present = {p.name for p in env.pool_dir().iterdir() if p.name != ".reconciler"}
        assert present == set(recs), (n, steps[n - 1], present ^ set(recs))
        for key, digest in want.items():
            inst, name = key.split("/")
            rec = recs[f"{inst}_{name}"]
            got = content(env.pool_dir() / rec.volume, rec.format.value, root)
            assert got == digest, (n, steps[n - 1], key)
            assert not (nova / inst / name).exists()
        assert sorted(p.name for p in env.manifests.glob("*.yaml")) == [f"{A}.yaml", f"{C}.yaml"]

    at_each(range(1, len(steps) + 1), kill_at)
