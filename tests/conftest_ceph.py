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

import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest_libvirtd import _script

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
