"""Changing a disk's encryption, and moving an encrypted disk, on file pools of a real
libvirtd with real qemu-img: each is a migration whose keying (model/keying.py) the plan
shows and apply records first; every copy is decrypted here with qemu-img and the key only
the test knows (caught as it is defined), the dry run is checked against the run on the
same state, and secrets and stored keys follow the records through every kill."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.host import keys
from reconciler.model.record import DiskRecord, RecordState
from tests.conftest import Pools
from tests.env import Env, disk
from tests.killpoints import at_each
from tests.test_encryption import encrypted, records
from tests.test_images import catalog_entry

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20


def secrets_of(env: Env) -> set[str]:
    """The UUIDs of the secrets this env's pools' keys are in (by their usage's path)."""
    dirs = [str(p) for _, p in env.pools.values()]
    conn = libvirt.open(env.uri)
    try:
        out = set()
        for sec in conn.listAllSecrets(0):
            try:
                root = ET.fromstring(sec.XMLDesc(0))
            except libvirt.libvirtError:  # another test's, undefined since it was listed
                continue
            usage = root.findtext("usage/volume") or ""
            if any(usage.startswith(d + "/") for d in dirs):
                out.add(sec.UUIDString())
        return out
    finally:
        conn.close()


def check_keys(env: Env, key_dir: Path | None) -> None:
    """No key (secret or stored) without a record or a record's migration naming it; no
    ready record, nor copy of a switched migration, whose key is gone."""
    recs = records(env)
    named = {r.encryption.secret for r in recs if r.encryption is not None}
    named |= {
        r.migration.encryption.secret
        for r in recs
        if r.migration is not None and r.migration.encryption is not None
    }
    needed = {
        r.encryption.secret
        for r in recs
        if r.encryption is not None and r.state is RecordState.READY
        and (r.migration is None or r.migration.phase.value == "copying")
    } | {
        r.migration.encryption.secret
        for r in recs
        if r.migration is not None and r.migration.encryption is not None
        and r.migration.phase.value == "switched"
    }  # fmt: skip
    defined = secrets_of(env)
    assert defined <= named, ("secrets without a record", defined - named)
    assert needed <= defined, ("keys a disk needs are gone", needed - defined)
    if key_dir is not None:
        stored = {p.name for p in key_dir.iterdir() if not p.name.startswith(".tmp-")}
        assert stored <= named, ("stored keys without a record", stored - named)
        assert needed <= stored, ("stored keys a disk needs are gone", needed - stored)


class KeySpy:
    """Every key defined as a secret, caught as the reconciler defines it (UUID -> key)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: dict[str, bytes] = {}
        real = keys.Secrets.define

        def define(s: keys.Secrets, uuid: str, usage: str, volume: str, key: bytes) -> None:
            self.keys[uuid] = key
            real(s, uuid, usage, volume, key)

        monkeypatch.setattr(keys.Secrets, "define", define)


def decrypted(path: Path, rec: DiskRecord, key: bytes | None, tmp: Path) -> bytes:
    """The disk `rec` at `path` as the guest reads it, through qemu-img (with its key)."""
    out = tmp / f"plain-{path.name}"
    file = {"driver": "file", "filename": str(path)}
    objects: list[str] = []
    if rec.encryption is None:
        node: dict[str, Any] = {"driver": rec.format.value, "file": file}
        fmt = rec.format.value
    else:
        assert key is not None
        keyfile = tmp / "k"
        keyfile.touch(0o600)
        keyfile.write_bytes(key)
        objects = ["--object", f"secret,id=k,format=raw,file={keyfile}"]
        if rec.format.value == "raw":
            node, fmt = {"driver": "luks", "key-secret": "k", "file": file}, "luks"
        else:
            node = {"driver": "qcow2", "encrypt": {"key-secret": "k"}, "file": file}
            fmt = "qcow2"
    subprocess.run(
        ["qemu-img", "convert", *objects, "-f", fmt, "-O", "raw", "json:" + json.dumps(node),
         str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    (tmp / "k").unlink(missing_ok=True)
    return data


def image_env(env: Env, tmp_path: Path) -> bytes:
    """A 3 MiB catalog image of distinct blocks, which every disk here is made of."""
    image = tmp_path / "img.raw"
    image.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(98304)))
    env.images = {"img": catalog_entry(image, "raw")}
    env.safety = {"maxDeletePercent": 100}
    return image.read_bytes()


def sourced(env: Env, key_dir: Path, pools: tuple[str, ...] = ("local",)) -> None:
    key_dir.mkdir(mode=0o700)
    for name in pools:
        lp, _ = env.pools[name]
        env.extra_pools[name] = {
            "uri": env.uri, "libvirtPool": lp, "backends": list(env.backends),
            "keys": {"directory": str(key_dir)},
        }  # fmt: skip
    env.write_config()


def img(name: str, size: str = "8MiB", **kw: Any) -> dict[str, Any]:
    return disk(name, size=size, image="img", template=None, **kw)


def test_encryption_is_changed_by_migrations_with_a_key_directory(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """new, rekey, decrypt and an encrypted qcow2 grown, in one pool with a key
    directory: the data decrypts with the new keys, the old secrets and key files go."""
    spy = KeySpy(monkeypatch)
    data = image_env(env, tmp_path)
    key_dir = tmp_path / "keys"
    sourced(env, key_dir)
    inst = env.manifest(
        "vm",
        [
            img("plain"),
            encrypted(img("raw")),
            encrypted(img("q", fmt="qcow2")),
            encrypted(img("dec")),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    before = {r.disk: r for r in records(env) if r.instance == inst}
    old = {n: before[n].encryption.secret for n in ("raw", "q", "dec")}  # type: ignore[union-attr]
    env.manifest(
        "vm",
        [
            encrypted(img("plain")),
            encrypted(img("raw", fmt="qcow2")),
            encrypted(img("q", fmt="qcow2", size="12MiB")),
            img("dec"),
        ],
        instance=inst,
    )
    rc, text, err = env.run("--dry-run")
    assert rc == 0, text + err
    assert "key (new): the copy is encrypted under a new random key" in text, text
    assert "the old plain volume is removed, not overwritten" in text
    assert "key (rekey)" in text and "key (decrypt)" in text, text
    plan = env.plan_json()
    kinds = sorted((a["action"], a["disk"]) for a in plan["actions"])
    assert kinds == [("migrate", "dec"), ("migrate", "plain"), ("migrate", "raw"),
                     ("resize", "q")], kinds  # fmt: skip
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert env.plan_json()["actions"] == []

    after = {r.disk: r for r in records(env) if r.instance == inst}
    assert after["dec"].encryption is None and after["plain"].encryption is not None
    assert after["raw"].format.value == "qcow2" and after["raw"].encryption is not None
    assert after["raw"].encryption.secret != old["raw"]
    assert after["q"].encryption.secret == old["q"] and after["q"].virtual_size == 12 * MiB  # type: ignore[union-attr]
    for name, r in after.items():
        key = spy.keys.get(r.encryption.secret) if r.encryption is not None else None
        got = decrypted(env.volume(inst, name), r, key, tmp_path)
        assert got[: len(data)] == data, name
        if name in ("plain", "q"):  # a raw LUKS disk reads noise past the image, copied as is
            assert not got[len(data) : 8 * MiB].strip(b"\0"), name
        if r.encryption is not None:
            assert data[:4096] not in env.volume(inst, name).read_bytes(), name
            assert (key_dir / r.encryption.secret).read_bytes() == key
    defined = secrets_of(env)
    assert not {old["raw"], old["dec"]} & defined
    stored = {p.name for p in key_dir.iterdir()}
    assert not {old["raw"], old["dec"]} & stored
    assert defined == stored == {after[n].encryption.secret for n in ("plain", "raw", "q")}  # type: ignore[union-attr]
    check_keys(env, key_dir)


def test_without_a_key_source_only_what_needs_no_old_key_is_done(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key source: a rekey and an encrypted qcow2's growth are plan errors
    naming the pool (--allow-replace does not make them replaces); Retain is refused for
    an encrypted disk that moves; plain -> luks is done, and a raw LUKS file moving to
    another pool on the same daemon is copied as it is (keep): same secret, same bytes."""
    spy = KeySpy(monkeypatch)
    local = pools.make(tmp_path / "local")
    fast = pools.make(tmp_path / "fast")
    env = Env(
        tmp_path / "env",
        local.uri,
        {"local": (local.name, local.path), "fast": (fast.name, fast.path)},
    )
    data = image_env(env, tmp_path)
    env.write_config()
    inst = env.manifest(
        "vm",
        [img("plain"), encrypted(img("raw")), encrypted(img("q", fmt="qcow2")),
         encrypted(img("kept"))],
    )  # fmt: skip
    rc, out, err = env.run()
    assert rc == 0, out + err
    before = {r.disk: r for r in records(env) if r.instance == inst}
    kept_bytes = env.volume(inst, "kept").read_bytes()
    refused = [
        encrypted(img("raw", fmt="qcow2")),
        encrypted(img("q", fmt="qcow2", size="12MiB")),
        encrypted(img("kept", pool="fast", policy="Retain")),
    ]
    env.manifest("vm", [encrypted(img("plain")), *refused], instance=inst)
    plan = env.plan_json("--allow-replace")
    errors = {e["disk"]: (e["code"], e["message"]) for e in plan["errors"]}
    assert set(errors) == {"raw", "q", "kept"}, errors
    need = "give pool local a key source (config `keys`) holding the disk's key"
    for name in ("raw", "q"):
        assert need in errors[name][1], errors[name]
    assert errors["q"][0] == "resize-unsupported"
    assert "Retain" in errors["kept"][1]
    assert [(a["action"], a["disk"]) for a in plan["actions"]] == [("migrate", "plain")]
    assert not [a for a in plan["actions"] if a["action"] == "replace"]

    # Apply does what the plan says: only `plain` is migrated; the rest is left as it is.
    env.manifest(
        "vm",
        [encrypted(img("plain")), encrypted(img("raw")), encrypted(img("q", fmt="qcow2")),
         encrypted(img("kept", pool="fast"))],
        instance=inst,
    )  # fmt: skip
    plan = env.plan_json()
    assert plan["errors"] == []
    assert sorted((a["action"], a["disk"]) for a in plan["actions"]) == [
        ("migrate", "kept"), ("migrate", "plain")
    ]  # fmt: skip
    text = "\n".join(a["reason"] for a in plan["actions"])
    assert "key (keep)" in text and "key (new)" in text
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert env.plan_json()["actions"] == []
    after = {r.key(): r for r in records(env) if r.instance == inst}
    plain = after[("local", f"{inst}_plain")]
    kept = after[("fast", f"{inst}_kept")]
    assert plain.encryption is not None and plain.encryption.secret in secrets_of(env)
    got = decrypted(env.volume(inst, "plain"), plain, spy.keys[plain.encryption.secret], tmp_path)
    assert got[: len(data)] == data
    assert kept.encryption == before["kept"].encryption  # the same secret and header
    assert env.volume(inst, "kept", "fast").read_bytes() == kept_bytes  # the same bytes
    assert not env.volume(inst, "kept").exists()
    assert before["kept"].encryption.secret in secrets_of(env)  # type: ignore[union-attr]
    assert kept.encryption is not None
    got = decrypted(
        env.volume(inst, "kept", "fast"), kept, spy.keys[kept.encryption.secret], tmp_path
    )
    assert got[: len(data)] == data
    check_keys(env, None)


def test_libvirt_keeps_a_secrets_usage(env: Env, tmp_path: Path) -> None:
    """Pinned on this libvirt (9.0): redefining a secret with another usage is refused;
    the same usage with a new description keeps its value. So a secret a migration keeps
    keeps the usage of where its disk was made (domains find secrets by UUID)."""
    import uuid as uuid_

    u = str(uuid_.uuid4())
    usage = str(tmp_path / "made-here")
    conn = libvirt.open(env.uri)
    try:
        sec = conn.secretDefineXML(keys.secret_xml(u, usage, "reconcile: test one"), 0)
        sec.setValue(b"v" * 64, 0)
        with pytest.raises(libvirt.libvirtError, match="already defined for use with"):
            conn.secretDefineXML(keys.secret_xml(u, str(tmp_path / "moved"), "moved"), 0)
        conn.secretDefineXML(keys.secret_xml(u, usage, "reconcile: test two"), 0)
        root = ET.fromstring(conn.secretLookupByUUIDString(u).XMLDesc(0))
        assert root.findtext("description") == "reconcile: test two"
        # The value is kept: a private secret's value cannot be read, but a non-private
        # twin of the same steps can (the same define path in libvirt).
        v = str(uuid_.uuid4())
        twin = keys.secret_xml(v, usage + "-twin", "one").replace("private='yes'", "private='no'")
        twin = twin.replace('private="yes"', 'private="no"')
        conn.secretDefineXML(twin, 0).setValue(b"w" * 64, 0)
        conn.secretDefineXML(twin.replace(">one<", ">two<"), 0)
        assert conn.secretLookupByUUIDString(v).value(0) == b"w" * 64
        conn.secretLookupByUUIDString(v).undefine()
        conn.secretLookupByUUIDString(u).undefine()
    finally:
        conn.close()


KILL_AT = ("record.migrating", "key.stored", "secret.defined", "record.switched",
           "secret.undefined", "key.deleted")  # fmt: skip


def kill_env(pools: Pools, root: Path) -> tuple[Env, str]:
    pool = pools.make(root / "pool")
    env = Env(root / "env", pool.uri, {"local": (pool.name, pool.path)})
    env.safety = {"maxDeletePercent": 100}
    sourced(env, root / "keys")
    inst = env.manifest("k", [encrypted(disk("a", size="4MiB"))])
    rc, out, err = env.run()
    assert rc == 0, out + err
    # Rekeyed into a qcow2: the old key read, a new one stored and defined, the old
    # secret and key erased; every boundary named in KILL_AT is crossed once.
    env.manifest("k", [encrypted(disk("a", fmt="qcow2", size="4MiB"))], instance=inst)
    return env, inst


def test_kill_where_a_key_or_the_record_naming_it_changes(pools: Pools, tmp_path: Path) -> None:
    env, _ = kill_env(pools, tmp_path / "trace")
    steps = env.traced_steps("--jobs", "1")
    check_keys(env, tmp_path / "trace" / "keys")
    points = [i + 1 for i, s in enumerate(steps) if s in KILL_AT]
    assert sorted(steps[k - 1] for k in points) == sorted(KILL_AT), steps

    def kill_at(k: int) -> None:
        root = tmp_path / f"k{k}"
        env, inst = kill_env(pools, root)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, f"{k}: {killed.stdout}{killed.stderr}"
        check_keys(env, root / "keys")  # right after the kill
        back = steps[k - 1] == "secret.defined"
        if back:  # the manifest asks for the old layout: rolled back, the new key erased
            env.manifest("k", [encrypted(disk("a", size="4MiB"))], instance=inst)
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        assert env.plan_json()["actions"] == [], f"kill point {k} did not converge"
        check_keys(env, root / "keys")
        recs = {r.disk: r for r in records(env) if r.instance == inst}
        assert all(r.state is RecordState.READY and r.migration is None for r in recs.values())
        assert recs["a"].format.value == ("raw" if back else "qcow2")
        assert sorted(p.name for p in (root / "keys").iterdir()) == [
            recs["a"].encryption.secret  # type: ignore[union-attr]
        ]
        assert not [p for p in env.pool_dir().iterdir() if "+" in p.name]
        assert all(r.encryption is not None for r in recs.values())
        assert secrets_of(env) == {recs["a"].encryption.secret}  # type: ignore[union-attr]

    at_each(points, kill_at)
    print(f"encrypted migration kill points: {points} of {steps}")
