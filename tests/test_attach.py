"""`reconcile disks`, `reconcile wait` and reconciler.client on real pools: the `<disk>`
elements of flat, qcow2, ploop, lvm and rbd disks, held to a real libvirtd (a domain
defined from them with VIR_DOMAIN_DEFINE_VALIDATE, which checks libvirt's schema, and
seen by the reconciler's own guard as using the disks), and every readiness state a
compute service can meet. Booting a guest from them is tests/test_boot.py."""

from __future__ import annotations

import hashlib
import json
import signal
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.client import Client, NotReady
from reconciler.model.record import RecordState
from reconciler.schema.manifest import AttachSpec
from tests.conftest_ceph import Ceph
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, disk
from tests.rbdsite import RbdSite, rbd_site
from tests.test_images import catalog_entry


def image_file(path: Path, n: int = 32768) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"".join(hashlib.sha256(f"{path.name}{i}".encode()).digest() for i in range(n))
    )
    return path


def disks(env: Env, *instances: str, output: str = "json") -> tuple[int, Any, str]:
    rc, out, err = env.main(
        ["disks", "--config", str(env.config_path), "-m", str(env.manifests),
         "--output", output, *instances]
    )  # fmt: skip
    return rc, (json.loads(out) if output == "json" else out), err


def wait(env: Env, instance: str, timeout: str = "0.5") -> tuple[int, str, str]:
    return env.main(
        ["wait", "--config", str(env.config_path), "-m", str(env.manifests),
         "--timeout", timeout, "--interval", "0.1", instance]
    )  # fmt: skip


def elements(doc: dict[str, Any]) -> dict[str, ET.Element]:
    return {d["disk"]: ET.fromstring(d["xml"]) for d in doc["disks"]}


def define(uri: str, disk_xml: list[str]) -> Any:
    """A domain defined from these `<disk>` elements, libvirt's schema checked."""
    import libvirt

    conn = libvirt.open(uri)
    name = f"attach-{uuid.uuid4().hex[:8]}"
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        + "".join(disk_xml)
        + "</devices></domain>"
    )
    try:
        return conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    finally:
        conn.close()


@pytest.fixture
def file_env(env: Env, tmp_path: Path) -> Env:
    env.backends = ["flat", "qcow2", "ploop"]
    env.images = {"img": catalog_entry(image_file(tmp_path / "images" / "img.raw"), "raw")}
    env.write_config()
    return env


def test_file_disks_name_their_format_and_chain_and_a_domain_takes_them(file_env: Env) -> None:
    env = file_env
    inst = env.manifest(
        "vm",
        [
            {**disk("root", image="img", size="2MiB"), "attach": {"serial": "root"}},
            disk("over", backend="qcow2", fmt="qcow2", image="img", size="4MiB"),
            disk("pl", backend="ploop", fmt="ploop", image="img", size="2MiB"),
            disk("fq", backend="flat", fmt="qcow2", template="ext4", label="eph", size="8MiB"),
            {
                **disk("eph", template="ext4", label="eph0", size="8MiB"),
                "attach": {
                    "target": {"dev": "sdb", "bus": "sata"},
                    "iotune": {"totalBytesSec": "50MiB/s", "readIopsSec": 200},
                },
            },
        ],
    )
    assert env.run()[0] == 0
    rc, doc, err = disks(env, inst)
    assert rc == 0, err
    (got,) = doc
    els = elements(got)
    fmt = {n: e.find("driver").get("type") for n, e in els.items()}  # type: ignore[union-attr]
    assert fmt == {"root": "raw", "over": "qcow2", "pl": "ploop", "fq": "qcow2", "eph": "raw"}
    src = {n: e.find("source").get("file") for n, e in els.items()}  # type: ignore[union-attr]
    assert src == {n: str(env.volume(inst, n)) for n in els}
    # The overlay names the cache entry its record names, with the entry's format.
    store = els["over"].find("backingStore")
    assert store is not None and store.find("format").get("type") == "raw"  # type: ignore[union-attr]
    entry = Path(store.find("source").get("file"))  # type: ignore[union-attr, arg-type]
    recs = {r.volume: r for r in env.store().load_all()[0]}
    assert recs[f"{inst}_over"].backing == entry.name and entry.parent == env.pool_dir()
    assert len(store.find("backingStore")) == 0  # type: ignore[arg-type]
    # Every other disk says it has no backing, so libvirt probes no header.
    for n in ("root", "pl", "fq", "eph"):
        assert [len(b) for b in els[n].findall("backingStore")] == [0]
    devs = {n: e.find("target").attrib for n, e in els.items()}  # type: ignore[union-attr]
    assert devs == {
        "root": {"dev": "vda", "bus": "virtio"},
        "over": {"dev": "vdb", "bus": "virtio"},
        "pl": {"dev": "vdc", "bus": "virtio"},
        "fq": {"dev": "vdd", "bus": "virtio"},
        "eph": {"dev": "sdb", "bus": "sata"},
    }
    assert els["root"].findtext("serial") == "root"
    tune = {c.tag: c.text for c in els["eph"].find("iotune")}  # type: ignore[union-attr]
    assert tune == {"total_bytes_sec": str(50 << 20), "read_iops_sec": "200"}
    # libvirt takes them (its schema checked), and the guard sees them used.
    dom = define(env.uri, [d["xml"] for d in got["disks"]])
    try:
        env.remove_manifest("vm")
        plan = env.plan_json("--prune")
        used = {e["disk"] for e in plan["errors"] if e["code"] == "volume-in-use"}
        assert used == {"root", "over", "pl", "fq", "eph"}
    finally:
        dom.undefine()
    # The xml output is one well-formed <devices> document per instance, of the disks
    # its manifest names now (those it dropped are still there, to be deleted).
    env.manifest("vm", [disk("root", image="img", size="2MiB")], instance=inst)
    rc, text, err = disks(env, inst, output="xml")
    assert rc == 0, err
    root = ET.fromstring(text)
    assert root.tag == "devices" and root.get("instance") == inst
    assert [d.find("target").get("dev") for d in root] == ["vda"]  # type: ignore[union-attr]


def test_pool_disk_options_reach_every_element(file_env: Env) -> None:
    env = file_env
    env.extra_pools = {
        "tuned": {
            "uri": env.uri,
            "libvirtPool": env.pools["local"][0],
            "backends": ["flat"],
            "disk": {"cache": "writeback", "io": "threads", "discard": "unmap",
                     "detectZeroes": "unmap"},
        }
    }  # fmt: skip
    env.write_config()
    inst = env.manifest("t", [disk("d", pool="tuned", size="1MiB")])
    assert env.run()[0] == 0
    rc, doc, err = disks(env, inst)
    assert rc == 0, err
    driver = elements(doc[0])["d"].find("driver")
    assert driver is not None and driver.attrib == {
        "name": "qemu", "type": "raw", "cache": "writeback", "io": "threads",
        "discard": "unmap", "detect_zeroes": "unmap",
    }  # fmt: skip
    define(env.uri, [doc[0]["disks"][0]["xml"]]).undefine()


def test_readiness_states_and_wait_exit_codes(file_env: Env) -> None:
    env = file_env
    inst = env.manifest("r", [disk("a", size="1MiB"), disk("b", image="img", size="2MiB")])
    # Not made yet: no element, each disk's state named; wait times out (2).
    rc, doc, err = disks(env, inst)
    assert rc == 1 and doc[0]["ready"] is False and not doc[0]["terminal"]
    assert [d["state"] for d in doc[0]["disks"]] == ["not-made", "not-made"]
    assert f"instance {inst}: 2 of 2 disk(s) not ready" in err
    assert "disk a (local/" in err and "not-made: not made yet (new disk" in err
    rc, out, err = wait(env, inst)
    assert rc == 2 and "timed out after 0.5s" in err
    # Made: ready, and wait says so at once.
    assert env.run()[0] == 0
    rc, out, err = wait(env, inst)
    assert rc == 0 and f"instance {inst}: ready (2 disk(s))" in out
    # A change still to apply: not at the manifest's content, so not given.
    env.manifest("r", [disk("a", size="2MiB"), disk("b", image="img", size="2MiB")], instance=inst)
    rc, doc, err = disks(env, inst)
    assert rc == 1 and [d["state"] for d in doc[0]["disks"]] == ["changing", "ready"]
    assert "resize planned" in doc[0]["disks"][0]["message"]
    assert wait(env, inst)[0] == 2
    # A change the reconciler refuses: terminal, wait ends at once with the reason.
    env.manifest(
        "r", [disk("a", size="512KiB"), disk("b", image="img", size="2MiB")], instance=inst
    )
    rc, doc, err = disks(env, inst)
    assert rc == 1 and doc[0]["terminal"] is True
    assert doc[0]["disks"][0]["state"] == "failed" and "shrink-refused" in err
    rc, out, err = wait(env, inst, timeout="60")
    assert rc == 1 and "shrink-refused" in err
    # An invalid manifest, a deleted instance, an unknown one: terminal, named.
    (env.manifests / "r.yaml").write_text((env.manifests / "r.yaml").read_text()[:-3])
    rc, out, err = wait(env, inst, timeout="60")
    assert rc == 1 and "r.yaml" in err
    env.manifest("r", [], instance=inst, deleted=True)
    rc, out, err = wait(env, inst, timeout="60")
    assert rc == 1 and "marks it deleted" in err
    other = str(uuid.uuid4())
    rc, out, err = wait(env, other, timeout="60")
    assert rc == 1 and f"instance {other}: no manifest in {env.manifests} names it" in err


def test_a_disk_being_made_is_not_given(file_env: Env) -> None:
    env = file_env
    inst = env.manifest("c", [disk("a", image="img", size="2MiB")])
    killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (rec,) = [r for r in env.store().load_all()[0] if r.instance == inst]
    assert rec.state is RecordState.CREATING
    rc, doc, err = disks(env, inst)
    assert rc == 1 and doc[0]["disks"][0]["state"] == "creating"
    assert "being made (or its making was interrupted)" in err
    assert env.run()[0] == 0  # the next apply finishes it
    assert disks(env, inst)[0] == 0


def test_wait_returns_once_another_process_made_the_disks(file_env: Env) -> None:
    import subprocess
    import sys

    env = file_env
    inst = env.manifest("w", [disk("a", image="img", size="2MiB"), disk("s", template="swap")])
    waiting = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "wait", "--config", str(env.config_path),
         "-m", str(env.manifests), "--timeout", "120", "--interval", "0.2", inst],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Progress is printed as what wait sees changes: once it has looked, apply.
        assert waiting.stderr is not None
        first = waiting.stderr.readline()
        assert "2 of 2 disk(s) not ready" in first, first
        assert env.run()[0] == 0
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert f"instance {inst}: ready (2 disk(s))" in out


def test_the_client_api_overrides_and_refuses_half_an_instance(file_env: Env) -> None:
    env = file_env
    inst = env.manifest("api", [disk("a", size="1MiB"), disk("b", size="1MiB")])
    with Client(str(env.config_path), [str(env.manifests)]) as c:
        with pytest.raises(NotReady) as e:
            c.disks(inst)
        assert not e.value.terminal
        assert [d.state for d in e.value.readiness.disks] == ["not-made", "not-made"]
        assert env.run()[0] == 0
        got = c.disks(
            inst, {"b": AttachSpec.model_validate({"target": {"dev": "vda"}, "serial": "bb"})}
        )
        assert [(d.name, d.dev, d.serial) for d in got] == [("a", "vdb", None), ("b", "vda", "bb")]
        assert got[1].element.findtext("serial") == "bb"
        assert ET.fromstring(got[1].xml).find("target").get("dev") == "vda"  # type: ignore[union-attr]
        with pytest.raises(Exception, match="has no disk nope"):
            c.disks(inst, {"nope": AttachSpec()})
        with pytest.raises(Exception, match="both have target vda"):
            vda = AttachSpec.model_validate({"target": {"dev": "vda"}})
            c.disks(inst, {"a": vda, "b": vda})


def test_lvm_disks_are_block_devices_at_their_lv_path(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    """This kernel has no device-mapper, so LVs cannot be activated nor a guest boot from
    one: the element's shape and libvirt's schema are what is tested here."""
    env = lvm_env
    inst = env.manifest("l", [disk("d", backend="lvm", pool="vg", size="8MiB", template="ext4")])
    assert env.run()[0] == 0
    rc, doc, err = disks(env, inst)
    assert rc == 0, err
    el = elements(doc[0])["d"]
    assert el.get("type") == "block"
    assert el.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert el.find("source").attrib == {"dev": f"/dev/{lvm_vg.vg}/{inst}_d"}  # type: ignore[union-attr]
    define(env.uri, [doc[0]["disks"][0]["xml"]]).undefine()


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def test_rbd_disks_name_the_image_monitors_and_secret(
    site: RbdSite, tmp_path: Path, ceph: Ceph
) -> None:
    env = site.env(tmp_path / "env")
    env.images = {"img": catalog_entry(image_file(tmp_path / "images" / "img.raw"), "raw")}
    env.write_config()
    inst = env.manifest(
        "c", [disk("root", backend="rbd", pool="ceph", image="img", size="4MiB"),
              disk("swap", backend="rbd", pool="ceph", template="swap", size="4MiB")]
    )  # fmt: skip
    assert env.run()[0] == 0
    rc, doc, err = disks(env, inst)
    assert rc == 0, err
    for name, el in elements(doc[0]).items():
        assert el.get("type") == "network"
        assert el.find("driver").get("type") == "raw"  # type: ignore[union-attr]
        src = el.find("source")
        assert src is not None and src.attrib == {
            "protocol": "rbd",
            "name": f"{site.pool}/{inst}_{name}",
        }
        # The monitors of the pool's ceph.conf (its v1 address), the secret of its config.
        assert [h.attrib for h in src.findall("host")] == [
            {"name": "127.0.0.1", "port": str(ceph.mon_v1_port())}
        ]
        assert src.find("auth").get("username") == "admin"  # type: ignore[union-attr]
        assert src.find("auth/secret").attrib == {"type": "ceph", "uuid": site.secret}  # type: ignore[union-attr]
        # A clone's parent is librbd's: the domain opens the clone as raw, no chain.
        assert [len(b) for b in el.findall("backingStore")] == [0]
    define(env.uri, [d["xml"] for d in doc[0]["disks"]]).undefine()
    # Without the secret in the config: a clear error, no element.
    cfg = json.loads(env.config_path.read_text())
    del cfg["pools"]["ceph"]["ceph"]["secretUuid"]
    env.config_path.write_text(json.dumps(cfg))
    rc, doc, err = disks(env, inst)
    assert rc == 1 and "ceph.secretUuid is not set" in err


def test_a_disk_being_moved_is_not_given(file_env: Env) -> None:
    env = file_env
    inst = env.manifest("m", [disk("d", size="8MiB")])
    assert env.run()[0] == 0
    env.manifest("m", [disk("d", backend="qcow2", fmt="qcow2", size="8MiB")], instance=inst)
    rc, doc, err = disks(env, inst)  # planned, not started: a change still to apply
    assert rc == 1 and doc[0]["disks"][0]["state"] == "changing" and "migrate planned" in err
    killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (rec,) = [r for r in env.store().load_all()[0] if r.instance == inst]
    assert rec.migration is not None  # killed right after the record said where it goes
    rc, doc, err = disks(env, inst)
    assert rc == 1 and doc[0]["disks"][0]["state"] == "migrating"
    assert f"moving to local/{inst}_d (qcow2, qcow2): copying" in err
    assert env.run()[0] == 0
    rc, doc, err = disks(env, inst)
    assert rc == 0 and elements(doc[0])["d"].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
