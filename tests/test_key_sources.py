"""Key sources (config `keys`): a KMS's command as well as a key directory, behind one
interface (drivers/host/keys.py: KeySource). The command is not ours: hostile ones
(floods, wrong formats, a failing get that traced its key, a signal, a hang with a child,
a put that ignores stdin, a missing program) each end in one line that quotes no key, and
leave no process behind. A create whose KMS is down fails before any secret or volume
exists and converges once it is back; an encrypted rbd disk is taken over by another
host through the command."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.host.keycommand import KEY as KEY_FORMAT
from reconciler.drivers.host.keycommand import KeyCommand, KeyCommandError
from reconciler.drivers.host.run import ToolError
from reconciler.model.errors import ConfigError
from reconciler.schema.load import load_config
from tests.conftest_ceph import Ceph
from tests.env import Env, disk
from tests.rbdsite import RbdSite, rbd_site
from tests.test_encryption import encrypted, our_secrets, records

MiB = 1 << 20
KEY = "c0ffee" + "0123456789abcdef" * 3 + "0a1b2c3d4e"  # 64 lowercase hex digits
UUID = "6f1e4c2a-0b7d-4e57-9a31-2d8c5e7f9b10"
assert len(KEY) == 64

# A KMS as a key command: `kms.sh STORE VERB UUID`, keys as files in STORE; a file `down`
# in STORE makes every call fail, as an unreachable KMS would.
KMS = """#!/bin/sh
store=$1; verb=$2; id=$3
if [ -e "$store/down" ]; then echo "kms at 127.0.0.1:1 unreachable" >&2; exit 3; fi
umask 077
case $verb in
  get) exec cat "$store/$id" ;;
  put) cat > "$store/.tmp-$id" && exec mv "$store/.tmp-$id" "$store/$id" ;;
  delete) exec rm -f "$store/$id" ;;
esac
exit 64
"""


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return str(path)


def kms(tmp_path: Path) -> tuple[list[str], Path]:
    store = tmp_path / "kms-store"
    store.mkdir(mode=0o700)
    prog = tmp_path / "kms.sh"
    prog.write_text(KMS)
    prog.chmod(0o700)
    return [str(prog), str(store)], store


def dead(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet: it runs no more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_dead(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if not dead(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not dead(p)]


# -- the command, against hostile programs -----------------------------------------------


def test_a_key_command_round_trip_in_a_bare_environment(tmp_path: Path) -> None:
    argv, store = kms(tmp_path)
    src = KeyCommand(argv, 10)
    src.put(UUID, KEY.encode())
    assert (store / UUID).read_bytes() == KEY.encode()
    assert (store / UUID).stat().st_mode & 0o777 == 0o600
    assert src.get(UUID) == KEY.encode()
    (store / UUID).write_bytes(KEY.encode() + b"\n")  # one newline after the key is fine
    assert src.get(UUID) == KEY.encode()
    src.delete(UUID)
    src.delete(UUID)  # a redo
    assert list(store.iterdir()) == []
    # Only PATH and LC_ALL, in /, a session of its own.
    seen = tmp_path / "seen"
    prog = script(
        tmp_path,
        "env.sh",
        f"tr '\\0' '\\n' < /proc/$$/environ > {seen}; readlink /proc/$$/cwd >> {seen}; "
        f"cut -d' ' -f6 /proc/$$/stat >> {seen}; echo $$ >> {seen}; echo {KEY}\n",
    )
    assert KeyCommand([prog], 10).get(UUID) == KEY.encode()
    *environ, cwd, sid, pid = seen.read_text().splitlines()
    assert sorted(environ) == ["LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    assert cwd == "/" and sid == pid and int(sid) != os.getsid(0)


@pytest.mark.parametrize(
    "body, said",
    [
        ("head -c 1000000 /dev/zero\n", "more than 4 KiB on stdout"),
        ("while :; do echo " + KEY + " >&2; done\n", "more than 4 KiB on stderr"),
        ("echo " + KEY + "; echo '+ echo " + KEY + "' >&2; exit 1\n", "exited with status 1"),
        ("echo " + KEY + "; kill -TERM $$\n", "killed by SIGTERM"),
        ("echo " + KEY.upper() + "\n", "is not a key"),
        ("echo " + KEY[:63] + "\n", "is not a key"),
        ("echo key: " + KEY + "\n", "is not a key"),
        ("printf '%s\\n\\n' " + KEY + "\n", "is not a key"),
        ("exit 0\n", "is not a key"),
    ],
    ids=["stdout-flood", "stderr-flood", "traced-key", "signal", "upper", "short", "prefixed",
         "two-newlines", "empty"],
)  # fmt: skip
def test_a_hostile_get_fails_in_one_line_quoting_nothing(
    tmp_path: Path, body: str, said: str
) -> None:
    src = KeyCommand([script(tmp_path, "get.sh", body)], 10)
    with pytest.raises(KeyCommandError) as e:
        src.get(UUID)
    msg = str(e.value)
    assert said in msg and "\n" not in msg and len(msg) < 400
    assert KEY not in msg and KEY.upper() not in msg and KEY[:16] not in msg
    if "traced" in body or "stderr" in said:
        assert "bytes) is not quoted" in msg


def test_a_hung_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(
        tmp_path, "hang.sh", f"sleep 300 & echo $! > {pids}; echo $$ >> {pids}; sleep 300\n"
    )
    with pytest.raises(KeyCommandError, match=r"did not finish within 1 s \(its process group"):
        KeyCommand([prog], 1).get(UUID)
    (child, leader) = [int(p) for p in pids.read_text().split()]
    assert wait_dead([child, leader]) == []
    # A child left running by a command that ended is killed too, its stdout held or not.
    pids.unlink()
    prog = script(
        tmp_path, "fork.sh", f"(sleep 300 >/dev/null 2>&1 &  echo $! > {pids}); echo {KEY}\n"
    )
    assert KeyCommand([prog], 10).get(UUID) == KEY.encode()
    assert wait_dead([int(pids.read_text())]) == []


def test_a_put_is_checked_by_a_get(tmp_path: Path) -> None:
    # It exits 0 without reading stdin, and gives back a key of its own.
    other = "f" * 64
    prog = script(tmp_path, "liar.sh", f"case $1 in get) echo {other};; put) exit 0;; esac\n")
    with pytest.raises(KeyCommandError, match="gave back another key") as e:
        KeyCommand([prog], 10).put(UUID, KEY.encode())
    assert KEY not in str(e.value) and other not in str(e.value)
    # A put that fails, having traced the key on stderr: not quoted.
    prog = script(tmp_path, "fail.sh", 'read k; echo "+ store $k" >&2; exit 5\n')
    with pytest.raises(KeyCommandError, match="exited with status 5") as e:
        KeyCommand([prog], 10).put(UUID, KEY.encode())
    assert KEY not in str(e.value) and "is not quoted" in str(e.value)


def test_a_delete_quotes_one_masked_line_and_a_missing_program_is_named(tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "del.sh",
        f"echo 'trace {KEY}' >&2; "
        f"printf 'kms: key {KEY[:20]} is held\\001 by a policy\\n\\n' >&2; exit 2\n",
    )
    with pytest.raises(KeyCommandError) as e:
        KeyCommand([prog], 10).delete(UUID)
    assert str(e.value).endswith("exited with status 2: kms: key [hex] is held? by a policy")
    assert KEY[:8] not in str(e.value)
    with pytest.raises(ToolError, match=r"/nonexistent/kms cannot be run: No such file"):
        KeyCommand(["/nonexistent/kms"], 10).get(UUID)


# -- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys_yaml, line, said",
    [
        ("      directory: /k\n      command: [/bin/true]\n", 9, "exactly one of `directory`"),
        ("      {}\n", 9, "exactly one of `directory`"),
        ("      command: [bin/kms]\n", 9, "must be an absolute path"),
        ("      command: []\n", 10, "at least 1 item"),
        ("      command: [/bin/kms]\n      timeout: 0\n", 11, "greater than 0"),
        ("      directory: /k\n      timeout: 5\n", 9, "`timeout` is for a `command`"),
        ("      directory: k\n", 10, "should match pattern"),
    ],
    ids=["both", "neither", "relative", "empty", "timeout-0", "timeout-dir", "dir-relative"],
)
def test_the_key_source_config_is_checked(
    tmp_path: Path, keys_yaml: str, line: int, said: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: reconciler/v1\nkind: Config\n"
        f"state: {{dir: {tmp_path / 'state'}}}\npools:\n  p:\n    uri: test:///default\n"
        "    libvirtPool: p\n    backends: [flat]\n    keys:\n" + keys_yaml + "images: {}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert f"{path}:{line}:" in str(e.value) and "pools.p.keys" in str(e.value)
    assert said in str(e.value)


def test_the_config_schema_and_reference_describe_a_key_command() -> None:
    rc, out, _ = Env.main(["schema", "--kind", "config"])
    assert rc == 0
    props = json.loads(out)["$defs"]["KeySourceConfig"]["properties"]
    assert {"directory", "command", "timeout"} <= set(props)
    assert "get UUID" in props["command"]["description"]
    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    assert "PROG ARGS put UUID" in reference


# -- against the real daemon -----------------------------------------------------------------


def kms_env(env: Env, argv: list[str]) -> None:
    lp, _ = env.pools["local"]
    env.extra_pools = {
        "local": {"uri": env.uri, "libvirtPool": lp, "backends": ["flat", "qcow2"],
                  "keys": {"command": argv, "timeout": 10}}
    }  # fmt: skip
    env.write_config()


@pytest.mark.libvirtd
def test_a_create_while_the_kms_is_down_fails_before_a_secret_and_converges_later(
    env: Env, tmp_path: Path
) -> None:
    argv, store = kms(tmp_path)
    kms_env(env, argv)
    (store / "down").touch()
    inst = env.manifest("kms", [encrypted(disk("d", size="8MiB", template="blank"))])
    plan = env.plan_json()
    assert [a["action"] for a in plan["actions"]] == ["create"]
    rc, out, err = env.run()
    assert rc != 0
    (put,) = [ln for ln in (out + err).splitlines() if "put" in ln and "failed" in ln]
    assert "is not quoted" in put and "unreachable" not in put  # a put's stderr never is
    assert not env.volume(inst, "d").exists() and our_secrets(env) == {}
    assert [p.name for p in store.iterdir()] == ["down"]
    assert all(r.state.value == "creating" for r in records(env))
    (store / "down").unlink()
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert env.plan_json()["actions"] == []
    (rec,) = records(env)
    assert rec.encryption is not None and rec.state.value == "ready"
    assert set(our_secrets(env)) == {rec.encryption.secret}
    assert [p.name for p in store.iterdir()] == [rec.encryption.secret]
    key = (store / rec.encryption.secret).read_bytes()
    assert KEY_FORMAT.fullmatch(key) is not None
    assert key.decode() not in out + err


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


@pytest.mark.libvirtd
def test_an_encrypted_rbd_disk_is_taken_over_through_the_key_command(
    site: RbdSite, tmp_path: Path
) -> None:
    """Host A makes an encrypted rbd disk, its key put to the KMS, and hands it over
    (undefining its own secret); host B's take-over gets the key from the KMS and defines
    the same secret; the KMS's key decrypts the image's bytes; B's delete erases it all."""
    argv, store = kms(tmp_path)
    ns = f"ck{uuid.uuid4().hex[:6]}"

    def host(name: str) -> Env:
        env = site.env(tmp_path / name, namespace=ns)
        env.extra_pools["ceph"]["keys"] = {"command": argv, "timeout": 10}
        env.host = name
        env.safety = {"maxDeletePercent": 100}
        env.write_config()
        return env

    a, b = host("host-a"), host("host-b")
    disks = [encrypted(disk("d", backend="rbd", pool="ceph", template="ext4", label="kmsdisk",
                            size="8MiB"))]  # fmt: skip
    inst = a.manifest("vm", disks)
    rc, out, err = a.run()
    assert rc == 0, out + err
    (secret,) = [p.name for p in store.iterdir()]
    key = (store / secret).read_bytes()
    conn = libvirt.open(site.uri)
    try:
        assert conn.secretLookupByUUIDString(secret)
        a.remove_manifest("vm")
        rc, out, err = a.run("--prune")
        assert rc == 0 and "handed over" in out, out + err
        with pytest.raises(libvirt.libvirtError):  # A gave its copy up: the KMS keeps it
            conn.secretLookupByUUIDString(secret)
        b.manifest("vm", disks, instance=inst)
        plan = b.plan_json()
        assert [x["action"] for x in plan["actions"]] == ["take-over"], plan
        rc, out, err = b.run()
        assert rc == 0, out + err
        assert conn.secretLookupByUUIDString(secret).UUIDString() == secret
        assert b.plan_json()["actions"] == []
        rc, out, err = b.main(["disks", "--config", str(b.config_path), "-m", str(b.manifests),
                               "--output", "json", inst])  # fmt: skip
        assert rc == 0, err
        (el,) = [ET.fromstring(d["xml"]) for d in json.loads(out)[0]["disks"]]
        assert el.find("source/encryption/secret").get("uuid") == secret  # type: ignore[union-attr]
        # The KMS's key opens the image's LUKS volume: ext4's magic at 1080 of the payload.
        at_rest = site.read(f"{inst}_d", 2068480 + 8 * MiB)
        (tmp_path / "d.img").write_bytes(at_rest)
        keyfile = tmp_path / "key"
        keyfile.touch(0o600)
        keyfile.write_bytes(key)
        img = {"driver": "file", "filename": str(tmp_path / "d.img")}
        node: dict[str, Any] = {"driver": "luks", "key-secret": "k", "file": img}
        subprocess.run(
            ["qemu-img", "convert", "--object", f"secret,id=k,format=raw,file={keyfile}",
             "-f", "luks", "-O", "raw", "json:" + json.dumps(node), str(tmp_path / "d.plain")],
            check=True,
        )  # fmt: skip
        plain = (tmp_path / "d.plain").read_bytes()
        assert plain[1080:1082] == b"\x53\xef" and b"kmsdisk" in plain[:4096]
        b.manifest("vm", [], instance=inst, deleted=True)
        rc, out, err = b.run("--force")
        assert rc == 0, out + err
        assert list(store.iterdir()) == [] and f"{inst}_d" not in site.images()
        with pytest.raises(libvirt.libvirtError):
            conn.secretLookupByUUIDString(secret)
    finally:
        conn.close()


# -- a lost secret is planned --------------------------------------------------------------


def undefine(uri: str, uuid_: str) -> None:
    conn = libvirt.open(uri)
    try:
        conn.secretLookupByUUIDString(uuid_).undefine()
    finally:
        conn.close()


def disks_argv(env: Env, inst: str) -> list[str]:
    return ["disks", "--config", str(env.config_path), "-m", str(env.manifests), inst]


@pytest.mark.libvirtd
def test_a_lost_secret_is_restored_from_the_key_command(env: Env, tmp_path: Path) -> None:
    """A made disk whose secret is gone (a rebuilt daemon, an undefine by hand) gets a
    `restore-key` action, not destructive, planned dry as apply does it; a kill between
    the secret's define and its value leaves a secret marked unset, which counts as
    missing (libvirt says "secret is private" either way); then `disks` gives the element."""
    argv, store = kms(tmp_path)
    kms_env(env, argv)
    inst = env.manifest("lost", [encrypted(disk("d", size="4MiB", template="blank"))])
    assert env.run()[0] == 0
    (rec,) = records(env)
    assert rec.encryption is not None
    secret = rec.encryption.secret
    undefine(env.uri, secret)
    rc, out, err = env.main(disks_argv(env, inst))
    assert rc == 1 and "restore-key planned" in err, err
    rc, text, err = env.run("--dry-run")
    assert rc == 0, text + err
    assert f"~ restore-key {inst}/d\n" in text and "1 key(s) to restore" in text
    plan = env.plan_json()
    (a,) = plan["actions"]
    assert (a["action"], a["destructive"], a["patch"]) == ("restore-key", False, [])
    assert plan["errors"] == [] and plan["summary"]["restore-key"] == 1
    # Killed between the define (marked unset) and its value: a secret libvirt knows...
    killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": "1"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    conn = libvirt.open(env.uri)
    try:
        desc = ET.fromstring(conn.secretLookupByUUIDString(secret).XMLDesc(0)).findtext(
            "description"
        )
        assert desc is not None and desc.endswith("(value not yet set)")
        with pytest.raises(libvirt.libvirtError, match="secret is private"):
            conn.secretLookupByUUIDString(secret).value()
    finally:
        conn.close()
    # ...but counted as missing: planned again, as dry run said, and applied.
    assert env.plan_json()["actions"] == plan["actions"]
    assert env.main(disks_argv(env, inst))[0] == 1
    rc, out, err = env.run()
    assert rc == 0 and "key restored" in out, out + err
    assert secret in our_secrets(env) and "(value not yet set)" not in our_secrets(env)[secret]
    assert env.plan_json()["actions"] == []
    rc, out, err = env.main(disks_argv(env, inst))
    assert rc == 0 and f'uuid="{secret}"' in out, err
    assert (store / secret).read_bytes().decode() not in out + err


@pytest.mark.libvirtd
def test_a_lost_secret_without_a_key_source_is_a_terminal_error(env: Env, tmp_path: Path) -> None:
    """No key source: only that secret held the key; the plan says so (key-lost) and apply
    refuses the same, changing nothing. An export carries the secrets (format 3) and plans
    as the host; a format 2 state does not say, so the disk is state-incomplete."""
    inst = env.manifest("nokey", [encrypted(disk("d", size="4MiB", template="blank"))])
    assert env.run()[0] == 0
    (rec,) = records(env)
    assert rec.encryption is not None
    state = tmp_path / "state.json"
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, err
    doc = json.loads(state.read_text())
    assert doc["format_version"] == 3 and doc["pools"]["local"]["secrets"] == [
        rec.encryption.secret
    ]
    undefine(env.uri, rec.encryption.secret)
    plan = env.plan_json()
    assert plan["actions"] == [] and [e["code"] for e in plan["errors"]] == ["key-lost"]
    assert "has no key source" in plan["errors"][0]["message"]
    rc, out, err = env.run()
    assert rc == 1 and "[key-lost]" in out + err, out + err
    assert records(env) == [rec] and env.volume(inst, "d").exists()
    # The export, taken when the secret was there, plans nothing; one taken now, key-lost.
    assert env.plan_json("--observed", str(state))["errors"] == []
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, err
    assert env.plan_json("--observed", str(state)) == plan
    doc = json.loads(state.read_text())
    doc["format_version"] = 2
    del doc["pools"]["local"]["secrets"]
    state.write_text(json.dumps(doc))
    old = env.plan_json("--observed", str(state))
    assert [e["code"] for e in old["errors"]] == ["state-incomplete"], old
    assert "does not say secrets of pool local" in old["errors"][0]["message"]
