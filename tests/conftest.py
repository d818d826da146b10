"""Fixtures: a private libvirtd and a one-node Ceph cluster (each started by the project's
script), and fresh pools per test."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest_ceph import Ceph, not_installed, start_ceph
from tests.conftest_guest import guest_image
from tests.conftest_libvirtd import start_libvirtd
from tests.conftest_lvm import VolumeGroup, lvm_vg
from tests.conftest_xdist import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
    pytest_xdist_node_collection_finished,
)
from tests.env import Env, qemu_uri

# pytest started in the background of a non-interactive shell inherits SIGINT ignored,
# and so would every reconcile process the tests start (Python keeps an ignored SIGINT):
# test_crash's Ctrl-C test would then see a run that cannot be interrupted. A handler set
# here is reset to the default in each child at exec (no preexec_fn, which is unsafe
# while the crash tests' threads run).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class DirPool:
    name: str
    path: Path
    uri: str


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    """The private daemon's URI: $RECONCILER_LIBVIRT_URI (set by `make test`), else the
    daemon `make libvirtd` would use, started here."""
    uri = os.environ.get("RECONCILER_LIBVIRT_URI")
    if not uri:
        try:
            uri = start_libvirtd()
        except RuntimeError as e:
            pytest.fail(f"could not start the private libvirtd: {e}", pytrace=False)
    return qemu_uri(uri)


@pytest.fixture(scope="module")
def ceph() -> Iterator[Ceph]:
    """client.admin connected to this checkout's Ceph cluster, with an ioctx of pool rbd:
    the cluster of $RECONCILER_CEPH_CONF (set by `make test`), else the one `make ceph`
    would start, started here. Skips only where Ceph is not installed; a cluster that does
    not start or answer is a failure. Per module: the client's threads end with the
    module, so later tests run in a process of one thread (the manifest worker forks only
    then)."""
    reason = not_installed()
    if reason:
        pytest.skip(reason)
    conf = os.environ.get("RECONCILER_CEPH_CONF")
    if conf:
        path = Path(conf)
        if not path.is_file():
            pytest.fail(f"RECONCILER_CEPH_CONF={conf}: no such file", pytrace=False)
    else:
        try:
            path = start_ceph()
        except RuntimeError as e:
            pytest.fail(f"could not start the Ceph test cluster: {e}", pytrace=False)
    try:
        c = Ceph.open(path)
    except Exception as e:
        pytest.fail(f"could not connect to the Ceph cluster of {path}: {e!r}", pytrace=False)
    yield c
    c.close()


def daemon_dir(uri: str) -> Path:
    """The private daemon's directory, from its socket path (DIR/sock/libvirt-sock)."""
    sock = uri.split("socket=", 1)[1]
    return Path(sock).parent.parent


class Pools:
    """Makes libvirt dir pools for one test and removes them (and their domains) after."""

    def __init__(self, uri: str, tag: str) -> None:
        import libvirt

        self.uri = uri
        self.tag = tag
        self.conn = libvirt.open(uri)
        self.made: list[tuple[str, Path]] = []
        self.lock = threading.Lock()  # for tests that make pools from two threads

    def make(self, path: Path) -> DirPool:
        with self.lock:
            return self._make(path)

    def _make(self, path: Path) -> DirPool:
        import libvirt

        name = f"t-{self.tag}-{len(self.made)}"
        path.mkdir(parents=True, exist_ok=True)
        try:  # a pool left by an interrupted earlier run
            old = self.conn.storagePoolLookupByName(name)
            if old.isActive():
                old.destroy()
            old.undefine()
        except libvirt.libvirtError:
            pass
        pool = self.conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
        )
        pool.create(0)
        self.made.append((name, path))
        return DirPool(name, path, self.uri)

    def define_logical(self, vg: str) -> str:
        """A libvirt `logical` pool over `vg`, defined only: starting one runs
        `vgchange -aly`, which needs device-mapper (absent here)."""
        import libvirt

        with self.lock:
            name = f"t-{self.tag}-{len(self.made)}"
            with suppress(libvirt.libvirtError):
                self.conn.storagePoolLookupByName(name).undefine()
            self.conn.storagePoolDefineXML(
                f"<pool type='logical'><name>{name}</name><source><name>{vg}</name>"
                f"<format type='lvm2'/></source><target><path>/dev/{vg}</path></target></pool>"
            )
            self.made.append((name, Path(f"/dev/{vg}")))
            return name

    def close(self) -> None:
        import libvirt

        for dom in self.conn.listAllDomains(0):
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:  # another test's, undefined since it was listed
                continue
            if any(str(path) in xml for _, path in self.made):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        for name, _ in self.made:
            pool = self.conn.storagePoolLookupByName(name)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
        self.conn.close()


@pytest.fixture
def pools(libvirt_uri: str, request: pytest.FixtureRequest) -> Iterator[Pools]:
    p = Pools(libvirt_uri, hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12])
    yield p
    p.close()


@pytest.fixture
def dir_pool(pools: Pools, tmp_path: Path) -> DirPool:
    return pools.make(tmp_path / "pool")


def make_lvm_env(pools: Pools, root: Path, vg: VolumeGroup) -> Env:
    """A config with a dir pool `local` (flat, qcow2) and an lvm pool `vg` on `vg`, its
    VG emptied first (each Env has a store of its own, which claims the VG)."""
    vg.reset()
    local = pools.make(root / "pool")
    logical = pools.define_logical(vg.vg)
    e = Env(
        root / "env",
        local.uri,
        {"local": (local.name, local.path), "vg": (logical, Path(f"/dev/{vg.vg}"))},
        lvm={"vg": vg.section()},
    )
    e.write_config()
    return e


@pytest.fixture
def lvm_env(pools: Pools, tmp_path: Path, lvm_vg: VolumeGroup) -> Iterator[Env]:
    e = make_lvm_env(pools, tmp_path, lvm_vg)
    yield e
    lvm_vg.reset()


@pytest.fixture
def env(dir_pool: DirPool, tmp_path: Path) -> Env:
    e = Env(tmp_path / "env", dir_pool.uri, {"local": (dir_pool.name, dir_pool.path)})
    e.write_config()
    return e


SCRIPT = str(Path(__file__).resolve().parent.parent / "scripts" / "libvirtd.sh")


@contextmanager
def own_daemon_pool(tmp_path: Path, name: str) -> Iterator[tuple[str, str, Path]]:
    """A dir pool `name` (autostarted, so a restarted daemon serves it again) on a private
    libvirtd of its own, for tests that stop their daemon: (daemon dir, uri, pool path)."""
    import libvirt

    d = Path("/tmp") / f"rcl-{name}-{abs(hash(str(tmp_path))) % 10**8}"
    out = subprocess.run([SCRIPT, "start", str(d)], capture_output=True, text=True, check=True)
    uri = out.stdout.strip().splitlines()[-1]
    path = tmp_path / name
    path.mkdir()
    conn = libvirt.open(uri)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    pool.setAutostart(1)
    pool.create(0)
    conn.close()
    try:
        yield str(d), uri, path
    finally:
        subprocess.run([SCRIPT, "stop", str(d)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


__all__ = [
    "guest_image",
    "lvm_vg",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_logreport",
    "pytest_runtest_protocol",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "pytest_testnodedown",
    "pytest_xdist_node_collection_finished",
]
