"""This checkout's Ceph test cluster, for tests/conftest.py's `ceph` fixture.

The cluster (one mon, one memstore OSD, pool `rbd`) is started with scripts/ceph.sh in the
directory that scripts/ceph-dir.sh names, the one `make ceph` uses; `make test` starts it
and passes its conf as $RECONCILER_CEPH_CONF. It is left running for later sessions:
`make stop` ends it. Python reaches it through Debian's rados and rbd modules, which
scripts/setup.sh links into .venv.

Tests share the cluster (and may share it with another session of the same checkout):
each names what it makes uniquely (`unique()`) and removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_libvirtd import SCRIPTS, _script

POOL = "rbd"
# What scripts/ceph.sh runs; the Debian packages of scripts/setup.sh's CEPH_PACKAGES.
TOOLS = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")


def not_installed() -> str | None:
    """Why the Ceph tests cannot run here, or None. The only reasons they skip."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"Ceph is not installed ({', '.join(missing)} not found): run scripts/setup.sh"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as e:
        return (
            f"Ceph is not installed for this Python (import failed: {e}): run "
            "scripts/setup.sh, which links Debian's python3-rados and python3-rbd into .venv"
        )
    return None


def ceph_dir() -> Path:
    """This checkout's cluster directory, as the Makefile computes it."""
    return Path(_script("ceph-dir.sh"))


def start_ceph() -> Path:
    """Start this checkout's cluster unless it runs; its ceph.conf."""
    return Path(_script("ceph.sh", "start", str(ceph_dir())))


def ceph_sh(*args: str, **env: str) -> str:
    """scripts/ceph.sh ARGS with `env` added (at most 120 s): its last line of output."""
    res = subprocess.run(
        ["bash", str(SCRIPTS / "ceph.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, f"ceph.sh {' '.join(args)}: {res.stderr}"
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


@contextmanager
def private_cluster(tag: str, **env: str) -> Iterator[Ceph]:
    """A one-node cluster of the caller's own, apart from the shared test cluster: started
    fresh in /tmp/rcl-TAG-<hash of this checkout's path> (`env` for scripts/ceph.sh, e.g.
    its object store), the test skipped where Ceph is missing; stopped and removed after.
    The cluster's directory is `.dir`."""
    reason = not_installed()
    if reason:
        pytest.skip(reason)
    here = hashlib.sha256(str(SCRIPTS.parent).encode()).hexdigest()[:8]
    d = Path("/tmp") / f"rcl-{tag}-{here}"
    ceph_sh("stop", str(d))  # one an interrupted session left
    c = Ceph.open(Path(ceph_sh("start", str(d), **env)))
    c.dir = d  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.close()
        ceph_sh("stop", str(d))
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def unique(prefix: str) -> str:
    """A name no other test (or session sharing the cluster) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Ceph:
    """A connected client.admin (`cluster`, a rados.Rados) and an ioctx of pool `rbd`."""

    conf: Path
    pool: str
    cluster: Any
    ioctx: Any

    @classmethod
    def open(cls, conf: Path, pool: str = POOL) -> Ceph:
        cluster = connect(conf)
        try:
            ioctx = cluster.open_ioctx(pool)
        except BaseException:
            cluster.shutdown()
            raise
        return cls(conf, pool, cluster, ioctx)

    def connect(self, **options: str) -> Any:
        """Another client (its own connection, its own instance id); the caller shuts it down."""
        return connect(self.conf, **options)

    def mon_v1_port(self) -> int:
        """The mon's msgr v1 port (libvirt's rbd pool names the mon by host and port)."""
        mon_host = self.cluster.conf_get("mon_host")
        m = re.search(r"v1:127\.0\.0\.1:(\d+)", mon_host)
        assert m, f"no v1 address on 127.0.0.1 in mon_host {mon_host!r}"
        return int(m[1])

    def admin_key(self) -> str:
        """client.admin's cephx key (base64), as a libvirt secret holds it."""
        cmd = {"prefix": "auth get-key", "entity": "client.admin", "format": "json"}
        ret, out, err = self.cluster.mon_command(json.dumps(cmd), b"")
        assert ret == 0, f"auth get-key failed ({ret}): {err}"
        key: str = json.loads(out)["key"]
        return key

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


def connect(conf: Path, **options: str) -> Any:
    """A connected rados.Rados as client.admin. The conf's [client] section bounds every
    wait (connect, OSD and mon ops), so a stopped daemon fails a test instead of hanging it."""
    import rados

    cluster = rados.Rados(conffile=str(conf), name="client.admin", conf=options)
    try:
        cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster
