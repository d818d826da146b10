"""Encryption at rest on a real file pool and libvirtd: LUKS disks made with a key that
lives only in a private libvirt secret, attached with `<encryption>`, grown without the
key, refused where the key would be needed, and crypto-erased on delete; the key never in
a log, plan, record, exported state, test output or argv; a kill at every step boundary of
create and delete leaves no secret without a record and no ready record without its secret.
(tests/test_boot.py boots encrypted disks.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.host import keys
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, RecordState
from tests.conftest import Pools
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, disk
from tests.guest import domain_xml
from tests.killpoints import at_each, kill_points
from tests.test_images import catalog_entry, hostile_refused, pool_contents

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20
LABEL = "crypt-marker-01"  # an ext4 label: 16 bytes at most


def encrypted(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "encryption": {"format": "luks"}}


def records(env: Env) -> list[DiskRecord]:
    store = env.store()
    try:
        recs, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    return recs


def our_secrets(env: Env) -> dict[str, str]:
    conn = libvirt.open(env.uri)
    try:
        out = {}
        for sec in conn.listAllSecrets(0):
            try:
                xml = sec.XMLDesc(0)
            except libvirt.libvirtError:  # another test's, undefined since it was listed
                continue
            root = ET.fromstring(xml)
            desc = root.findtext("description") or ""
            if desc.startswith(keys.DESCRIPTION_PREFIX) and str(env.pool_dir()) in (
                root.findtext("usage/volume") or ""
            ):
                out[sec.UUIDString()] = xml
        return out
    finally:
        conn.close()


def check_keys(env: Env, key_dir: Path | None = None) -> None:
    """No key without a record naming it; no ready record whose key is gone (in libvirt,
    and in the key directory where the pool has one)."""
    named = {r.encryption.secret: r for r in records(env) if r.encryption is not None}
    defined = our_secrets(env)
    assert set(defined) <= set(named), ("secrets without a record", set(defined) - set(named))
    lost = [r.volume for s, r in named.items() if r.state is RecordState.READY and s not in defined]
    assert not lost, ("ready records whose key is gone", lost)
    if key_dir is not None:
        stored = {p.name for p in key_dir.iterdir() if not p.name.startswith(".tmp-")}
        assert stored <= set(named), ("stored keys without a record", stored - set(named))
        lost = [
            r.volume for s, r in named.items() if r.state is RecordState.READY and s not in stored
        ]
        assert not lost, ("ready records whose stored key is gone", lost)


def test_an_encrypted_disk_is_made_attached_grown_and_erased(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = b"c0ffee" + os.urandom(29).hex().encode()  # 64 hex digits, as new_key makes
    monkeypatch.setattr(keys, "new_key", lambda: key)
    argvs: list[list[str]] = []
    real_run = subprocess.run

    def spy(argv: Any, *args: Any, **kwargs: Any) -> Any:
        argvs.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    real_popen = subprocess.Popen

    class SpyPopen(real_popen):  # type: ignore[misc,valid-type]
        """Every child, also those run with qemu-img's progress read (a migration's)."""

        def __init__(self, args: Any, *rest: Any, **kw: Any) -> None:
            argvs.append([str(a) for a in args])
            super().__init__(args, *rest, **kw)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    inst = env.manifest(
        "vm",
        [
            encrypted(disk("raw", template="ext4", label=LABEL, size="16MiB")),
            encrypted(disk("q", fmt="qcow2", template="ext4", label=LABEL, size="16MiB")),
            encrypted(disk("over", backend="qcow2", fmt="qcow2", template="swap", size="8MiB")),
            disk("plain", template="ext4", label=LABEL, size="16MiB"),
        ],
    )
    rc, text, err = env.run("--dry-run")
    assert rc == 0, err
    assert text.count("    encryption luks: a new random key") == 3, text
    plan = env.plan_json()
    specs = {a["disk"]: a["spec"] for a in plan["actions"]}
    assert specs["raw"]["encryption"] == {"format": "luks"} and "encryption" not in specs["plain"]
    rc, out, err = env.run()
    assert rc == 0, out + err
    outputs = [text, json.dumps(plan), out, err]

    recs = {r.disk: r for r in records(env) if r.instance == inst}
    assert recs["plain"].encryption is None
    defined = our_secrets(env)
    for name in ("raw", "q", "over"):
        enc = recs[name].encryption
        assert enc is not None and enc.format == "luks"
        sec = ET.fromstring(defined[enc.secret])
        assert (sec.get("private"), sec.get("ephemeral")) == ("yes", "no")
        assert sec.findtext("usage/volume") == str(env.volume(inst, name))
    assert len(defined) == 3
    # Private: libvirt never gives the key back.
    conn = libvirt.open(env.uri)
    with pytest.raises(libvirt.libvirtError, match="private"):
        conn.secretLookupByUUIDString(recs["raw"].encryption.secret).value()  # type: ignore[union-attr]
    conn.close()

    # At rest: the plain disk shows its label, the encrypted ones do not.
    assert LABEL.encode() in env.volume(inst, "plain").read_bytes()
    for name in ("raw", "q", "over"):
        assert LABEL.encode() not in env.volume(inst, name).read_bytes(), name
    raw = env.volume(inst, "raw")
    assert raw.stat().st_size == keys.LUKS_HEADER + 16 * MiB
    assert recs["raw"].encryption.header == keys.LUKS_HEADER  # type: ignore[union-attr]
    assert raw.read_bytes()[:6] == b"LUKS\xba\xbe"
    info = json.loads(
        real_run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", str(env.volume(inst, "over"))],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["encrypted"] is True and info["backing-filename-format"] == "raw"

    # The element names the secret; libvirt's schema takes it.
    rc, out, err = env.main(
        ["disks", "--config", str(env.config_path), "-m", str(env.manifests),
         "--output", "json", inst]
    )  # fmt: skip
    assert rc == 0, err
    outputs.append(out)
    elements = {d["disk"]: ET.fromstring(d["xml"]) for d in json.loads(out)[0]["disks"]}
    for name in ("raw", "q", "over"):
        enc_el = elements[name].find("source/encryption")
        assert enc_el is not None and enc_el.get("format") == "luks"
        secret = enc_el.find("secret")
        assert secret is not None and secret.attrib == {
            "type": "passphrase",
            "uuid": recs[name].encryption.secret,  # type: ignore[union-attr]
        }
    assert elements["plain"].find("source/encryption") is None
    assert elements["over"].find("backingStore/source/encryption") is None  # a plain entry

    # The exported state carries the secret's UUID, never the key.
    state = tmp_path / "state.json"
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, err
    assert recs["raw"].encryption.secret in state.read_text()  # type: ignore[union-attr]

    # Grown: the raw one without its key (its file grows to header + size); an encrypted
    # qcow2 cannot be opened without it, so its growth is a plan error.
    env.manifest(
        "vm",
        [
            encrypted(disk("raw", template="ext4", label=LABEL, size="24MiB")),
            encrypted(disk("q", fmt="qcow2", template="ext4", label=LABEL, size="24MiB")),
            encrypted(disk("over", backend="qcow2", fmt="qcow2", template="swap", size="8MiB")),
            disk("plain", template="ext4", label=LABEL, size="16MiB"),
        ],
        instance=inst,
    )
    rc, out, err = env.run()
    outputs += [out, err]
    assert rc == 1, out + err
    plan = env.plan_json()
    assert [(e["code"], e["disk"]) for e in plan["errors"]] == [("resize-unsupported", "q")]
    assert raw.stat().st_size == keys.LUKS_HEADER + 24 * MiB
    assert next(r for r in records(env) if r.disk == "raw").virtual_size == 24 * MiB

    # A change of encryption is a migration: plain -> luks is done under a new key;
    # luks -> plain reads the disk with its key, which only a key source could give back:
    # a plan error naming the pool (--allow-replace does not make it a replace).
    grown = [
        encrypted(disk("q", fmt="qcow2", template="ext4", label=LABEL, size="16MiB")),
        encrypted(disk("over", backend="qcow2", fmt="qcow2", template="swap", size="8MiB")),
        encrypted(disk("plain", template="ext4", label=LABEL, size="16MiB")),
    ]
    env.manifest(
        "vm", [disk("raw", template="ext4", label=LABEL, size="24MiB"), *grown], instance=inst
    )
    plan = env.plan_json("--allow-replace")
    outputs.append(json.dumps(plan))
    assert [(a["action"], a["disk"]) for a in plan["actions"]] == [("migrate", "plain")]
    assert [(e["code"], e["disk"]) for e in plan["errors"]] == [("encryption-unsupported", "raw")]
    assert "give pool local a key source (config `keys`)" in plan["errors"][0]["message"]
    env.manifest(
        "vm",
        [encrypted(disk("raw", template="ext4", label=LABEL, size="24MiB")), *grown],
        instance=inst,
    )
    rc, text, err = env.run("--dry-run")
    outputs += [text, err]
    assert rc == 0 and "key (new)" in text, text + err
    rc, out, err = env.run()
    outputs += [out, err]
    assert rc == 0, out + err
    migrated = next(r for r in records(env) if r.disk == "plain")
    assert migrated.encryption is not None and migrated.encryption.secret in our_secrets(env)
    assert LABEL.encode() not in env.volume(inst, "plain").read_bytes()

    # Delete: the volumes go, then their secrets (crypto-erase).
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = env.run("--force")
    outputs += [out, err]
    assert rc == 0, out + err
    assert our_secrets(env) == {}
    assert not [p for p in env.pool_dir().iterdir() if p.name.startswith(inst)]

    # The key was never written anywhere the reconciler writes, nor in any argv.
    state_dir = env.root / "state"
    for blob in [
        *(o.encode() for o in outputs),
        state.read_bytes(),
        *(p.read_bytes() for p in state_dir.rglob("*") if p.is_file()),
    ]:
        assert key not in blob
    assert any("qemu-img" in a[0] and "--object" in a for a in argvs)
    # The migration's copy ran with its new key as an object (a memfd), never in an argv.
    assert any(a[:2] == ["qemu-img", "convert"] and "--object" in a for a in argvs)
    assert not [a for a in argvs if any(key.decode() in w for w in a)]


def test_encryption_is_refused_where_it_is_not_built(env: Env) -> None:
    """An lvm or rbd pool's disk asking for encryption is a plan error naming the pool
    kind (no stub); a ploop disk cannot ask at all (qemu's parallels has no encryption)."""
    env.backends = ["flat", "qcow2", "ploop"]
    env.write_config()
    env.manifest("pl", [encrypted(disk("d", backend="ploop", fmt="ploop"))])
    rc, out, err = env.run("validate")
    assert rc == 1 and "a ploop disk (qemu's parallels format) cannot be encrypted" in out + err


def test_a_key_directory_is_root_only_and_never_followed(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    src = keys.KeyDirectory(str(d))
    uuid_ = "0f3c2b1a-1111-4222-8333-944445555666"
    src.put(uuid_, b"k" * 64)
    assert (d / uuid_).stat().st_mode & 0o777 == 0o600
    assert src.get(uuid_) == b"k" * 64
    src.put(uuid_, b"j" * 64)  # a redo replaces it
    assert src.get(uuid_) == b"j" * 64 and sorted(p.name for p in d.iterdir()) == [uuid_]
    (d / uuid_).chmod(0o644)
    with pytest.raises(ReconcileError, match="mode 0600"):
        src.get(uuid_)
    (d / uuid_).unlink()
    (d / uuid_).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"x" * 64)
    with pytest.raises(ReconcileError, match="not in key directory"):
        src.get(uuid_)  # O_NOFOLLOW: a link is never read through
    (d / uuid_).unlink()
    src.delete(uuid_)  # gone already: fine
    with pytest.raises(ReconcileError, match="not in key directory"):
        src.get(uuid_)
    d.chmod(0o755)
    with pytest.raises(ReconcileError, match="mode 0700"):
        src.put(uuid_, b"k" * 64)
    assert list(d.iterdir()) == []


def test_a_pool_with_a_key_directory_stores_and_erases_each_key(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = b"5eed" + os.urandom(30).hex().encode()
    monkeypatch.setattr(keys, "new_key", lambda: key)
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    lp, _ = env.pools["local"]
    env.extra_pools = {
        "local": {"uri": env.uri, "libvirtPool": lp, "backends": ["flat", "qcow2"],
                  "keys": {"directory": str(key_dir)}}
    }  # fmt: skip
    env.write_config()
    inst = env.manifest("vm", [encrypted(disk("d", size="8MiB"))])
    rc, out, err = env.run()
    assert rc == 0, out + err
    (rec,) = [r for r in records(env) if r.instance == inst]
    assert rec.encryption is not None
    assert (key_dir / rec.encryption.secret).read_bytes() == key
    assert rec.encryption.secret in our_secrets(env)
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = env.run("--force")
    assert rc == 0, out + err
    assert list(key_dir.iterdir()) == [] and our_secrets(env) == {}
    assert key not in (out + err).encode()


# -- a kill at every step boundary of encrypted creates and deletes --------------------


def crash_env(pools: Pools, root: Path, sourced: bool) -> tuple[Env, str]:
    pool = pools.make(root / "pool")
    env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
    env.safety = {"maxDeletePercent": 100}
    if sourced:
        (root / "keys").mkdir(mode=0o700)
        env.extra_pools = {
            "local": {
                "uri": pool.uri,
                "libvirtPool": pool.name,
                "backends": ["flat", "qcow2"],
                "keys": {"directory": str(root / "keys")},
            }
        }
    env.write_config()
    doomed = env.manifest("doomed", [encrypted(disk("d", size="4MiB"))])
    rc, out, err = env.run()
    assert rc == 0, out + err
    return env, doomed


def crash_after(env: Env, doomed: str) -> None:
    env.manifest("doomed", [], instance=doomed, deleted=True)
    env.manifest(
        "fresh",
        [
            encrypted(disk("a", size="8MiB", template="ext4", label="fresh")),
            encrypted(disk("b", backend="qcow2", fmt="qcow2", size="8MiB", template="swap")),
        ],
    )


@pytest.mark.parametrize("sourced", [False, True], ids=["libvirt", "key-directory"])
def test_kill_at_every_step_of_encrypted_create_and_delete(
    pools: Pools, tmp_path: Path, sourced: bool
) -> None:
    env, doomed = crash_env(pools, tmp_path / "trace", sourced)
    crash_after(env, doomed)
    steps = env.traced_steps("--jobs", "1")
    want = {"record.creating", "secret.defined", "volume.created", "secret.undefined"}
    if sourced:
        want |= {"key.stored", "key.deleted"}
    assert want <= set(steps), steps
    key_dir = tmp_path / "trace" / "keys" if sourced else None
    check_keys(env, key_dir)
    assert len(our_secrets(env)) == 2

    def kill_at(k: int) -> None:
        env, doomed = crash_env(pools, tmp_path / f"k{k}", sourced)
        key_dir = tmp_path / f"k{k}" / "keys" if sourced else None
        crash_after(env, doomed)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, f"{k}: {killed.stdout}{killed.stderr}"
        check_keys(env, key_dir)  # right after the kill, before any run repairs anything
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        assert env.plan_json()["actions"] == [], f"kill point {k} did not converge"
        check_keys(env, key_dir)
        recs = records(env)
        assert all(r.state is RecordState.READY for r in recs)
        assert len(our_secrets(env)) == sum(1 for r in recs if r.encryption is not None) == 2

    # With a key directory every boundary (its order is the other's with the key's own
    # steps added); without one, eight spread from the first to the last
    # (tests/killpoints.py), which keeps the suite's time under its budget.
    points = kill_points(len(steps), 1 if sourced else 2)
    at_each(points, kill_at)
    print(f"encrypted create/delete kill points: {len(points)}: {steps}")


def test_encrypted_lvm_disks_hold_luks_and_decrypt_with_their_key(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An lvm disk is qemu's luks over the LV (this kernel has no device-mapper, so no
    guest boots from one: the LV's bytes are read from the PV and decrypted by qemu-img
    with the key, which the test alone knows); grown by lvextend; crypto-erased."""
    key = b"1eaf" + os.urandom(30).hex().encode()
    monkeypatch.setattr(keys, "new_key", lambda: key)
    env = lvm_env
    image = tmp_path / "img.raw"
    image.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(98304)))
    env.images = {"img": catalog_entry(image, "raw")}
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    lvm = {"backend": "lvm", "fmt": "raw", "pool": "vg"}
    disks = [
        encrypted(disk("a", size="8MiB", image="img", template=None, **lvm)),
        encrypted(disk("b", size="8MiB", **lvm)),
    ]
    inst = env.manifest("lvm", disks)
    rc, out, err = env.run()
    assert rc == 0, out + err
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["warnings"] == [], plan
    a = f"{inst}_a"
    assert lvm_vg.lv_size(a) >= keys.LUKS_HEADER + 8 * MiB
    at_rest = lvm_vg.segment_bytes(a)
    assert at_rest[:6] == b"LUKS\xba\xbe" and image.read_bytes()[:4096] not in at_rest
    # Decrypted with the key (given to qemu-img as a 0600 file here), it is the image.
    keyfile = tmp_path / "key"
    keyfile.touch(0o600)
    keyfile.write_bytes(key)
    (tmp_path / "a.lv").write_bytes(at_rest)
    node = {"driver": "luks", "key-secret": "k", "file": {"driver": "file",
            "filename": str(tmp_path / "a.lv")}}  # fmt: skip
    subprocess.run(
        ["qemu-img", "convert", "--object", f"secret,id=k,format=raw,file={keyfile}",
         "-f", "luks", "-O", "raw", "json:" + json.dumps(node), str(tmp_path / "a.plain")],
        check=True,
    )  # fmt: skip
    plain = (tmp_path / "a.plain").read_bytes()
    assert plain[: image.stat().st_size] == image.read_bytes()
    assert len(plain) == lvm_vg.lv_size(a) - keys.LUKS_HEADER  # the payload: the LV's rest
    # The element: a block device with its encryption, as libvirt's schema takes it.
    rc, out, err = env.main(
        ["disks", "--config", str(env.config_path), "-m", str(env.manifests),
         "--output", "json", inst]
    )  # fmt: skip
    assert rc == 0, err
    conn = libvirt.open(env.uri)
    for d in json.loads(out)[0]["disks"]:
        el = ET.fromstring(d["xml"])
        assert el.get("type") == "block" and el.find("source/encryption/secret") is not None
    name = f"lvm-crypt-{uuid.uuid4().hex[:12]}"  # unique: other files' tests define domains
    dom = conn.defineXMLFlags(
        domain_xml(name, [d["xml"] for d in json.loads(out)[0]["disks"]],
                   tmp_path / "console"),
        libvirt.VIR_DOMAIN_DEFINE_VALIDATE,
    )  # fmt: skip
    dom.undefine()
    # Grown without the key: the LV to header + size.
    disks[0] = encrypted(disk("a", size="16MiB", image="img", template=None, **lvm))
    env.manifest("lvm", disks, instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert lvm_vg.lv_size(a) >= keys.LUKS_HEADER + 16 * MiB
    uuids = {r.encryption.secret for r in records(env) if r.encryption is not None}
    assert len(uuids) == 2 and uuids <= {s.UUIDString() for s in conn.listAllSecrets(0)}
    # Deleted: the LVs cleared and removed, then the secrets undefined.
    env.manifest("lvm", [], instance=inst, deleted=True)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not [v for v in lvm_vg.lvs() if v.startswith(inst)]
    assert not uuids & {s.UUIDString() for s in conn.listAllSecrets(0)}
    conn.close()
    assert key not in out.encode() + err.encode()


def test_hostile_images_are_refused_for_encrypted_disks_too(env: Env, tmp_path: Path) -> None:
    """An encrypted disk is made from the same checked cache entry: every hostile image is
    refused before a key or secret exists, and nothing is left."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.raw").write_bytes(b"\0" * 4096)
    hostile_refused(
        env,
        images,
        tmp_path,
        lambda name: encrypted(disk("d", backend="qcow2", fmt="qcow2", image=name, size="16MiB")),
    )
    assert pool_contents(env) == [] and records(env) == []
    assert our_secrets(env) == {}


def test_an_encrypted_disk_whose_secret_is_gone_gets_no_element(env: Env) -> None:
    """A secret undefined behind the reconciler's back (by hand, or a rebuilt daemon): the
    element would name it and the domain fail to start, so `disks` refuses, saying so."""
    inst = env.manifest("gone", [encrypted(disk("d", size="4MiB", template="blank"))])
    assert env.run()[0] == 0
    argv = ["disks", "--config", str(env.config_path), "-m", str(env.manifests), inst]
    rc, out, err = env.main(argv)
    assert rc == 0, err
    (uuid,) = our_secrets(env)
    assert f'uuid="{uuid}"' in out
    conn = libvirt.open(env.uri)
    try:
        conn.secretLookupByUUIDString(uuid).undefine()
    finally:
        conn.close()
    rc, out, err = env.main(argv)
    assert rc == 1 and out == ""
    # The plan sees it (tests/test_key_sources.py: restored where there is a key source).
    assert f"libvirt secret {uuid}, the disk's key, is not defined on the pool's daemon" in err
    assert "has no key source" in err  # the key is gone with it: [key-lost]
