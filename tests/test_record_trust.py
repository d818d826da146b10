"""A record copy is evidence, never truth (issue 20, item 1; DESIGN invariant 8).

Against the real private libvirtd, on a dir pool: copies claiming a backing outside the
pool (absolute, `..`), another instance's disk, another pool, a mismatched volume, a
format the disk is not, and an instance no manifest names. Forged in `user.*` (what any
writer of the file can do) they are not trusted at all; forged in `trusted.*` (root's
namespace) they are checked as input and refused. After `records rebuild --yes` the same
manifests' dry run has no destructive action, and a traced apply (strace) opens no host
file outside the pool and never runs `qemu-img resize`. The three attacks the issue found
are reproduced: (a) a "qcow2 -> raw" migration copying a host file into a guest's disk,
(b) `qemu-img resize -f qcow2` on a raw disk whose guest wrote a qcow2 header, (c)
deleting another instance's disk whose copy claimed a third instance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.file import copies as filecopies
from reconciler.drivers.file.copies import RECORD_XATTR, TRUSTED_XATTR
from reconciler.drivers.host import copykey
from reconciler.drivers.lvm.copies import COPY_PREFIX, encode_copy
from reconciler.drivers.rbd.copies import RECORD_KEY
from reconciler.model.naming import template_entry_name
from reconciler.model.record import DiskRecord
from tests.conftest_ceph import Ceph
from tests.conftest_lvm import VolumeGroup
from tests.env import ROOT, Env, cli, disk
from tests.rbdsite import RbdSite, rbd_site

pytestmark = pytest.mark.libvirtd

SECRET = b"HOST-SECRET-NEVER-IN-A-GUEST!!!\n" * 2048  # 64 KiB


def _records(env: Env) -> dict[str, dict[str, Any]]:
    store = env.store()
    try:
        good, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    return {r.volume: json.loads(r.model_dump_json()) for r in good}


def _drop_store(env: Env) -> None:
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()


def _set(path: Path, doc: dict[str, Any], name: str = TRUSTED_XATTR) -> None:
    os.setxattr(path, name, json.dumps(doc).encode(), follow_symlinks=False)


def _forged(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(base))
    for k, v in changes.items():
        if k.startswith("spec_"):
            doc["spec"][k[5:]] = v
        else:
            doc[k] = v
    return doc


def _qcow2_header(backing: str) -> bytes:
    """A qcow2 v3 header naming `backing`, as a guest can write into its raw disk."""
    name = backing.encode()
    head = (
        b"QFI\xfb"
        + (3).to_bytes(4, "big")
        + (104).to_bytes(8, "big")
        + len(name).to_bytes(4, "big")
        + (16).to_bytes(4, "big")
        + (1 << 30).to_bytes(8, "big")
    )
    return head + b"\0" * (104 - len(head)) + name


def _destructive(plan: dict[str, Any]) -> list[dict[str, Any]]:
    kinds = {"delete", "replace", "migrate", "resize", "release", "hand-over"}
    return [a for a in plan["actions"] if a["action"] in kinds or a.get("destructive")]


def _rebuild(env: Env, *args: str) -> tuple[int, str, str]:
    return env.main(["records", "rebuild", "local", "--config", str(env.config_path), *args])


def traced_apply(env: Env, *flags: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """`reconcile FLAGS MANIFESTS` under strace -f: its result and every open and exec."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: scripts/setup.sh installs it")
    trace = env.root / f"trace-{uuid.uuid4().hex[:8]}.txt"
    argv = ["strace", "-f", "-qq", "-s", "4096", "-o", str(trace)]
    argv += ["-e", "trace=open,openat,openat2,execve", *env.argv(*flags)]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return res, trace.read_text()


def opened_under(trace: str, root: Path) -> set[str]:
    """Paths under `root` the traced processes opened or executed (quoted in strace)."""
    out: set[str] = set()
    needle = f'"{root}'
    for line in trace.splitlines():
        start = line.find(needle)
        while start >= 0:
            end = line.find('"', start + 1)
            out.add(line[start + 1 : end])
            start = line.find(needle, end + 1)
    return out


@pytest.fixture
def bait(tmp_path: Path) -> Path:
    """A host file outside the pool that a forged record would have a disk copy."""
    d = tmp_path / "host"
    d.mkdir()
    p = d / "secret.img"
    p.write_bytes(SECRET)
    return p


def test_forged_copies_are_refused_and_the_next_runs_destroy_nothing(env: Env, bait: Path) -> None:
    pool = env.pool_dir()
    names = ["abs", "dotdot", "otherinst", "otherpool", "mismatch", "header", "user"]
    a = env.manifest("a", [disk(n, size="32MiB") for n in names])
    b = env.manifest("b", [disk("disk", size="16MiB")])
    c = env.manifest("c", [disk("root", backend="qcow2", fmt="qcow2", template="ext4")])
    third = str(uuid.uuid5(uuid.NAMESPACE_DNS, "third"))  # no manifest names it
    rc, out, err = env.run()
    assert rc == 0, out + err
    legit = _records(env)
    vol = {n: f"{a}_{n}" for n in names}
    b_disk = env.volume(b, "disk")
    with open(b_disk, "r+b") as f:
        f.write(b"B's data, not to be deleted")
    # (b): the guest of a's `header` disk writes a qcow2 header naming the host file.
    with open(pool / vol["header"], "r+b") as f:
        f.write(_qcow2_header(str(bait)))
    # A stranger volume carrying a perfect record of an instance no manifest names.
    stray = pool / f"{third}_disk"
    stray.write_bytes(b"\0" * (16 << 20))

    rec = legit[vol["abs"]]
    q = {"format": "qcow2", "spec_format": "qcow2", "spec_backend": "flat"}
    forged = {
        # (a): qcow2 backed by a host file, absolute and through `..`.
        vol["abs"]: _forged(rec, backing=str(bait), **q),
        vol["dotdot"]: _forged(legit[vol["dotdot"]], backing=os.path.relpath(bait, pool), **q),
        # (c): b's disk claims to be a third instance's (its name is b's).
        b_disk.name: _forged(legit[b_disk.name], instance=third),
        # a disk claiming to be b's disk, another pool's, or a volume not derived from it.
        vol["otherinst"]: _forged(legit[b_disk.name]),
        vol["otherpool"]: _forged(legit[vol["otherpool"]], pool="elsewhere", spec_pool="elsewhere"),
        vol["mismatch"]: _forged(legit[vol["mismatch"]], disk="abs"),
        # (b): a consistent qcow2 record of a smaller disk: the next run would resize -f qcow2.
        vol["header"]: _forged(
            legit[vol["header"]],
            backend="qcow2",
            format="qcow2",
            virtual_size=16 << 20,
            spec_backend="qcow2",
            spec_format="qcow2",
            spec_size=16 << 20,
        ),
        stray.name: _forged(
            legit[b_disk.name], instance=third, volume=stray.name, spec_size=16 << 20
        ),
    }
    for name, doc in forged.items():
        _set(pool / name, doc)
    # The attack as found: a copy in user.* only (any writer of the file can set it).
    os.removexattr(pool / vol["user"], TRUSTED_XATTR)
    _set(pool / vol["user"], _forged(legit[vol["user"]], backing=str(bait), **q), RECORD_XATTR)

    _drop_store(env)
    rc, out, err = _rebuild(env, "--yes", str(env.manifests))
    assert rc == 0, out + err
    lines = out.splitlines()
    refused = {
        ln.split()[1].rstrip(":").split("/", 1)[1] for ln in lines if ln.startswith("refuse ")
    }
    assert refused == set(forged), out
    (user,) = [ln for ln in lines if ln.startswith(f"skip local/{vol['user']}:")]
    assert "not trusted" in user and RECORD_XATTR in user
    for why in ("never a path", "describes local/", "describes elsewhere/", "derived from"):
        assert why in out, out
    assert "the next plan would migrate it" in out  # the header disk's consistent forgery
    assert "the next plan would delete it" in out  # the stray's, under --prune
    restored = {
        ln.split()[1].rstrip(":").split("/", 1)[1] for ln in lines if ln.startswith("restore ")
    }
    entry = template_entry_name("ext4", 64 << 20, None)
    assert restored == {f"{c}_root", entry}, out
    assert set(_records(env)) == restored

    # The same manifests' dry run, with every flag that lets a plan destroy: nothing.
    plan = env.plan_json("--prune", "--allow-replace")
    assert _destructive(plan) == [], plan["actions"]
    res, trace = traced_apply(env, "--prune", "--allow-replace")
    assert "Traceback" not in res.stderr, res.stderr
    assert f'"{env.config_path}"' in trace  # the trace sees the run's opens
    assert str(bait) not in trace and "secret.img" not in trace
    assert "resize" not in "".join(ln for ln in trace.splitlines() if "execve(" in ln)
    allowed = (pool, env.root / "state", env.manifests, env.config_path)
    outside = {
        p
        for p in opened_under(trace, env.root.parent)
        if not any(p == str(r) or p.startswith(f"{r}/") for r in allowed)
    }
    assert outside == set(), outside
    assert bait.read_bytes() == SECRET
    assert b_disk.read_bytes().startswith(b"B's data, not to be deleted")
    assert stray.exists()
    for n in names:
        assert SECRET[:64] not in (pool / vol[n]).read_bytes()


def test_untrusted_copies_are_skipped_and_an_apply_rewrites_them(env: Env, bait: Path) -> None:
    """Without manifests too: a user.* copy is never restored; an apply on an intact store
    replaces it with the trusted copy of the record."""
    a = env.manifest("a", [disk("x", size="16MiB"), disk("y", size="16MiB")])
    assert env.run()[0] == 0
    legit = _records(env)
    x, y = env.volume(a, "x"), env.volume(a, "y")
    # x: an old reconciler's (or anyone's) user.* copy only; y: a forgery beside its
    # trusted copy.
    os.removexattr(x, TRUSTED_XATTR)
    _set(x, legit[x.name], RECORD_XATTR)
    _set(y, _forged(legit[y.name], backing=str(bait), format="qcow2"), RECORD_XATTR)
    rc, out, err = env.run()
    assert rc == 0, out + err
    for p in (x, y):
        assert json.loads(os.getxattr(p, TRUSTED_XATTR)) == legit[p.name]
        assert RECORD_XATTR not in os.listxattr(p)

    os.removexattr(x, TRUSTED_XATTR)
    _set(x, legit[x.name], RECORD_XATTR)
    _drop_store(env)
    rc, out, err = _rebuild(env, "--yes")
    assert rc == 0, out + err
    assert f"skip local/{x.name}: its copy in {RECORD_XATTR} is not trusted" in out
    assert "No manifests given" in out
    assert set(_records(env)) == {y.name}


def test_without_a_trusted_namespace_copies_are_sealed_with_a_root_only_key(
    env: Env, bait: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system with only user.* xattrs (NFS): the copy is sealed (HMAC-SHA256) with
    a 0600 key beside the database; an unsealed or tampered copy is not trusted."""
    # An xattr namespace the kernel does not know fails as NFS fails trusted.*.
    monkeypatch.setattr(filecopies, "TRUSTED_XATTR", "nonesuch.reconciler.record")
    a = env.manifest("a", [disk(n, size="16MiB") for n in ("x", "y", "z")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    key = env.root / "state" / copykey.KEY_FILE
    assert (key.stat().st_mode & 0o777) == 0o600 and key.stat().st_size == copykey.KEY_BYTES
    legit = _records(env)
    x, y, z = (env.volume(a, n) for n in ("x", "y", "z"))
    sealed = os.getxattr(x, RECORD_XATTR)
    assert sealed.startswith(copykey.SEAL)
    # y: its sealed copy edited (the MAC no longer fits); z: an unsealed forgery.
    tampered = os.getxattr(y, RECORD_XATTR).replace(b'"backing":null', b'"backing":"/etc"')
    os.setxattr(y, RECORD_XATTR, tampered)
    _set(z, legit[z.name], RECORD_XATTR)
    _drop_store(env)
    rc, out, err = _rebuild(env, "--yes", str(env.manifests))
    assert rc == 0, out + err
    assert "not sealed with this host's key" in out
    assert set(_records(env)) == {x.name}
    # The key gone (with the state directory): no copy can be checked, none is trusted.
    _drop_store(env)
    key.unlink()
    rc, out, err = _rebuild(env, "--dry-run")
    assert rc == 0, out + err
    assert f"skip local/{x.name}: its copy in {RECORD_XATTR} is not trusted (no key" in out
    # A key others can read is refused, never used.
    key.write_bytes(b"k" * copykey.KEY_BYTES)
    key.chmod(0o644)
    rc, out, err = _rebuild(env, "--dry-run")
    assert rc == 0, out + err
    assert "mode 0600" in out


# -- LVM: an LV's tags are written only by root on the host, so every copy is "trusted"
# by where it is; each is still checked as input, and the plan check refuses the rest.


def _lvm(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="lvm", fmt="raw", pool="vg", **kw)


def _set_lv_copy(vg: VolumeGroup, lv: str, doc: dict[str, Any]) -> None:
    old = [t for t in vg.lvs()[lv] if t.startswith(COPY_PREFIX)]
    new = encode_copy(DiskRecord.model_validate(doc))
    args = [a for t in old for a in ("--deltag", t)] + [a for t in new for a in ("--addtag", t)]
    vg.lvm("lvchange", *args, f"{vg.vg}/{lv}")


def test_forged_lv_tags_are_refused_and_the_next_runs_destroy_nothing(
    lvm_env: Env, lvm_vg: VolumeGroup, bait: Path
) -> None:
    env = lvm_env
    names = ["abs", "dotdot", "otherinst", "otherpool", "mismatch", "qcow2"]
    a = env.manifest("a", [_lvm(n, size="8MiB") for n in names])
    b = env.manifest("b", [_lvm("disk", size="8MiB")])
    third = env.manifest("third", [_lvm("disk", size="8MiB")])
    env.manifest("keep", [disk("d", size="1MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    env.remove_manifest("third")  # its disk stays; a rebuild must not make it deletable
    legit = _records(env)
    vol = {n: f"{a}_{n}" for n in names}
    b_lv, third_lv = f"{b}_disk", f"{third}_disk"
    forged = {
        vol["abs"]: _forged(legit[vol["abs"]], backing=str(bait)),
        vol["dotdot"]: _forged(legit[vol["dotdot"]], backing="../../" + bait.name),
        b_lv: _forged(legit[b_lv], instance=third),  # (c): claims the third instance
        vol["otherinst"]: _forged(legit[b_lv]),
        vol["otherpool"]: _forged(legit[vol["otherpool"]], pool="local", spec_pool="local"),
        vol["mismatch"]: _forged(legit[vol["mismatch"]], disk="abs"),
        vol["qcow2"]: _forged(legit[vol["qcow2"]], format="qcow2", spec_format="qcow2"),
    }
    for lv, doc in forged.items():
        _set_lv_copy(lvm_vg, lv, doc)
    _drop_store(env)
    rc, out, err = env.main(
        ["records", "rebuild", "vg", "--yes", "--config", str(env.config_path), str(env.manifests)]
    )
    assert rc == 0, out + err
    lines = out.splitlines()
    refused = {
        ln.split()[1].rstrip(":").split("/", 1)[1] for ln in lines if ln.startswith("refuse ")
    }
    assert refused == {*forged, third_lv}, out
    assert "the next plan would delete it" in out  # the third instance's, under --prune
    assert "holds no qcow2" in out and "never a path" in out
    assert {r for r in _records(env) if not r.startswith("_cache_")} == set()

    plan = env.plan_json("--prune", "--allow-replace")
    assert _destructive(plan) == [], plan["actions"]
    res, trace = traced_apply(env, "--prune", "--allow-replace")
    assert "Traceback" not in res.stderr, res.stderr
    assert f'"{env.config_path}"' in trace
    assert str(bait) not in trace and bait.name not in trace
    assert "lvremove" not in "".join(ln for ln in trace.splitlines() if "execve(" in ln)
    allowed = (env.pool_dir("local"), env.root / "state", env.manifests, env.config_path)
    outside = {
        p
        for p in opened_under(trace, env.root.parent)
        if not any(p == str(r) or p.startswith(f"{r}/") for r in allowed)
    }
    assert outside == set(), outside
    assert set(lvm_vg.lvs()) >= {*forged, third_lv}


# -- rbd: image metadata is written by any client with the pool's caps (the same clients
# that can write the RADOS store); a guest reaches only the image's data. Copies are
# checked as input like the store's records, and the plan check refuses the rest.


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def _rbd(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="rbd", fmt="raw", pool="ceph", **kw)


@pytest.mark.ceph
def test_forged_rbd_metadata_is_refused_and_the_next_runs_destroy_nothing(
    site: RbdSite, tmp_path: Path, bait: Path
) -> None:
    import rbd

    env = site.env(tmp_path / "env", namespace="trust")
    names = ["abs", "dotdot", "otherinst", "otherpool", "mismatch", "qcow2"]
    a = env.manifest("a", [_rbd(n, size="8MiB") for n in names])
    b = env.manifest("b", [_rbd("disk", size="8MiB")])
    third = env.manifest("third", [_rbd("disk", size="8MiB")])
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    env.remove_manifest("third")  # its disk stays; a rebuild must not make it go
    legit = {v: json.loads(site.metadata(v, RECORD_KEY) or "{}") for v in site.images()}
    vol = {n: f"{a}_{n}" for n in names}
    b_img, third_img = f"{b}_disk", f"{third}_disk"
    forged = {
        vol["abs"]: _forged(legit[vol["abs"]], backing=str(bait)),
        vol["dotdot"]: _forged(legit[vol["dotdot"]], backing="../" + bait.name),
        b_img: _forged(legit[b_img], instance=third),  # (c): claims the third instance
        vol["otherinst"]: _forged(legit[b_img]),
        vol["otherpool"]: _forged(legit[vol["otherpool"]], pool="other", spec_pool="other"),
        vol["mismatch"]: _forged(legit[vol["mismatch"]], disk="abs"),
        vol["qcow2"]: _forged(legit[vol["qcow2"]], format="qcow2", spec_format="qcow2"),
    }
    for image, doc in forged.items():
        with rbd.Image(site.ioctx, image) as img:
            img.metadata_set(RECORD_KEY, json.dumps(doc))
    # Every record object is lost: the store is rebuilt from the images' metadata.
    io = site.ceph.cluster.open_ioctx(site.pool)
    io.set_namespace("trust")
    for o in list(io.list_objects()):
        io.remove_object(o.key)
    io.close()
    res = cli(
        "records", "rebuild", "ceph", "--yes", "--config", str(env.config_path), str(env.manifests)
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    lines = out.splitlines()
    refused = {
        ln.split()[1].rstrip(":").split("/", 1)[1] for ln in lines if ln.startswith("refuse ")
    }
    assert refused == {*forged, third_img}, out
    assert "holds no qcow2" in out and "never a path" in out
    assert "the next plan would" in out  # the third instance's: handed over or deleted

    plan = env.plan_json("--prune", "--allow-replace")
    assert _destructive(plan) == [], plan["actions"]
    res, trace = traced_apply(env, "--prune", "--allow-replace")
    assert "Traceback" not in res.stderr, res.stderr
    assert f'"{env.config_path}"' in trace
    assert str(bait) not in trace and bait.name not in trace
    allowed = (env.root / "state", env.manifests, env.config_path)
    outside = {
        p
        for p in opened_under(trace, env.root.parent)
        if not any(p == str(r) or p.startswith(f"{r}/") for r in allowed)
    }
    assert outside == set(), outside
    assert site.images() >= {*forged, third_img}


# -- every read is checked: the database and an exported state, not only copies


def test_a_forged_record_in_the_database_or_a_state_is_its_disks_plan_error(
    env: Env, bait: Path
) -> None:
    """Whatever wrote the database (or an exported state) wrote input: a record whose
    backing is a path, or whose volume is not its own, is that volume's plan error and
    never acted on, by a dry run, an apply, or a plan made from an exported state."""
    a = env.manifest("a", [disk("x", size="16MiB"), disk("y", size="16MiB")])
    assert env.run()[0] == 0
    env.manifest("a", [disk("x", size="32MiB"), disk("y", size="32MiB")])  # both would grow
    legit = _records(env)
    x, y = env.volume(a, "x"), env.volume(a, "y")
    store = env.store()
    try:
        store.put(
            DiskRecord.model_validate(
                _forged(
                    legit[x.name],
                    backing=str(bait),
                    format="qcow2",
                    generation=legit[x.name]["generation"] + 1,
                )
            ),
            legit[x.name]["generation"],
        )
    finally:
        store.close()
    state = env.root / "state.json"
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, out + err
    doc = json.loads(state.read_text())
    assert [r for r in doc["records"] if r["volume"] == x.name] == []  # exported as bad
    (ry,) = [r for r in doc["records"] if r["volume"] == y.name]
    ry["backing"] = "../" + bait.name
    state.write_text(json.dumps(doc))

    for extra in ((), ("--observed", str(state))):
        plan = env.plan_json(*extra)
        errors = {e["volume"]: e for e in plan["errors"] if e["code"] == "record-unreadable"}
        assert "never a path" in errors[x.name]["message"], plan["errors"]
        if extra:
            assert "never a path" in errors[y.name]["message"], plan["errors"]
            assert plan["actions"] == []
        else:
            assert [(a["action"], a["volume"]) for a in plan["actions"]] == [("resize", y.name)]
    rc, out, err = env.run()
    assert rc == 1 and "Traceback" not in err, out + err
    assert x.stat().st_size == 16 << 20 and y.stat().st_size == 32 << 20


def test_the_loop_replaces_untrusted_copies_too(env: Env, bait: Path) -> None:
    """`watch` applies on an intact store as a one-shot run does: its resync replaces an
    untrusted copy with the record's trusted one."""
    from tests.test_loop import loop, wait_until

    a = env.manifest("a", [disk("x", size="16MiB")])
    assert env.run()[0] == 0
    x = env.volume(a, "x")
    legit = _records(env)[x.name]
    os.removexattr(x, TRUSTED_XATTR)
    _set(x, _forged(legit, backing=str(bait), format="qcow2"), RECORD_XATTR)

    def renewed() -> bool:
        names = os.listxattr(x)
        return TRUSTED_XATTR in names and RECORD_XATTR not in names

    with loop(env):
        wait_until("the trusted copy", renewed)
    assert json.loads(os.getxattr(x, TRUSTED_XATTR)) == legit


def test_copies_are_renewed_only_in_a_pool_this_store_manages(env: Env, tmp_path: Path) -> None:
    """A database that no longer manages a pool (another rebuilt it) keeps its hands off
    the copies there: they are the other store's."""
    a = env.manifest("a", [disk("x", size="16MiB")])
    assert env.run()[0] == 0
    x = env.volume(a, "x")
    other = Env(tmp_path / "other", env.uri, env.pools)
    other.write_config()
    rc, out, err = other.main(
        ["records", "rebuild", "local", "--yes", "--config", str(other.config_path)]
    )
    assert rc == 0 and f"restore local/{x.name}" in out, out + err
    os.removexattr(x, TRUSTED_XATTR)
    _set(x, _records(env)[x.name], RECORD_XATTR)
    rc, out, err = env.run()
    assert rc == 1 and "pool-managed-elsewhere" in out, out + err
    assert TRUSTED_XATTR not in os.listxattr(x) and RECORD_XATTR in os.listxattr(x)
