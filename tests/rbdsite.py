"""An rbd pool for one test module: a Ceph pool of its own on the test cluster, and on the
private libvirtd a secret holding client.admin's key and an `rbd` pool naming it, as a
production host would define them. Each module gets its own Ceph pool, so the images,
records and the pool's owner object of one never meet another's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest_ceph import Ceph, unique
from tests.env import Env


@dataclass
class RbdSite:
    ceph: Ceph
    pool: str  # the Ceph pool
    libvirt_pool: str
    uri: str
    secret: str  # the libvirt secret's uuid
    ioctx: Any  # of `pool`, default namespace (the images)

    def pool_config(self, namespace: str = "reconciler", op_timeout: float = 30) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "libvirtPool": self.libvirt_pool,
            "backends": ["rbd"],
            "ceph": {
                "conf": str(self.ceph.conf),
                "pool": self.pool,
                "namespace": namespace,
                "opTimeout": op_timeout,
                "secretUuid": self.secret,  # what a domain's disks authenticate with
            },
        }

    def env(self, root: Path, name: str = "ceph", **kw: Any) -> Env:
        """An Env whose only pool is this site's rbd pool, called `name`."""
        e = Env(root, self.uri, {})
        e.extra_pools = {name: self.pool_config(**kw)}
        e.write_config()
        return e

    def images(self) -> set[str]:
        import rbd

        return set(rbd.RBD().list(self.ioctx))

    def read(self, image: str, length: int, offset: int = 0) -> bytes:
        import rbd

        with rbd.Image(self.ioctx, image, read_only=True) as img:
            data: bytes = img.read(offset, length)
            return data

    def _in_child(self, body: str, request: Any) -> Any:
        """Run `body` (python-rbd; CHILD gives it `request`, `ioctx` on this pool and an
        `out` to fill) in a child process: its `out`. Once in a CI run, librbd aborted
        (SIGABRT) while this process read an image right after a SIGKILLed reconciler,
        taking the whole test session with it, and later once more opening an image for
        its parent in a crash test's check; in a child that fails one test, with what it
        printed. One child for all the images a call asks about, not one each: a crash
        test reads about ten images per kill point."""
        import subprocess
        import sys

        res = subprocess.run(
            [sys.executable, "-c", CHILD.format(body=body), str(self.ceph.conf), self.pool],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, f"reading {request}: rc {res.returncode}: {res.stderr}"
        return json.loads(res.stdout)

    def digests(self, lengths: Mapping[str, int | None]) -> dict[str, str]:
        """sha256 of each image's first `length` bytes (all of it for None)."""
        got: dict[str, str] = self._in_child(DIGESTS, dict(lengths))
        return got

    def parents(self, images: Sequence[str]) -> dict[str, tuple[str, str] | None]:
        """Each image's parent (image, snapshot), or None."""
        got: dict[str, list[str] | None] = self._in_child(PARENTS, list(images))
        return {k: (v[0], v[1]) if v else None for k, v in got.items()}

    def write(self, image: str, data: bytes, offset: int = 0) -> None:
        """Write into an image as a guest would (through its data, nothing else)."""
        import rbd

        with rbd.Image(self.ioctx, image) as img:
            img.write(data, offset)

    def size(self, image: str) -> int:
        import rbd

        with rbd.Image(self.ioctx, image, read_only=True) as img:
            return int(img.size())

    def parent(self, image: str) -> tuple[str, str] | None:
        import rbd

        with rbd.Image(self.ioctx, image, read_only=True) as img:
            try:
                spec = img.get_parent_image_spec()
            except rbd.ImageNotFound:
                return None
        return str(spec["image_name"]), str(spec["snap_name"])

    def metadata(self, image: str, key: str) -> str | None:
        import rbd

        with rbd.Image(self.ioctx, image, read_only=True) as img:
            try:
                return str(img.metadata_get(key))
            except KeyError:
                return None

    def refresh_libvirt(self) -> list[str]:
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            p = conn.storagePoolLookupByName(self.libvirt_pool)
            p.refresh(0)
            return sorted(v.name() for v in p.listAllVolumes(0))
        finally:
            conn.close()


# RbdSite._in_child's program: argv conf pool, stdin the request (JSON), stdout `out`.
CHILD = """
import hashlib, json, sys
import rados, rbd
request = json.load(sys.stdin)
cluster = rados.Rados(conffile=sys.argv[1], name="client.admin")
cluster.connect()
ioctx = cluster.open_ioctx(sys.argv[2])
out = {{}}
{body}
ioctx.close()
cluster.shutdown()
json.dump(out, sys.stdout)
"""

# request {image: length or null} -> out {image: sha256}
DIGESTS = """
for image, length in request.items():
    with rbd.Image(ioctx, image, read_only=True) as img:
        end = img.size() if length is None else min(length, img.size())
        h = hashlib.sha256()
        for off in range(0, end, 4 << 20):
            h.update(img.read(off, min(4 << 20, end - off)))
        out[image] = h.hexdigest()
"""

# request [image] -> out {image: [name, snap] or null}
PARENTS = """
for image in request:
    with rbd.Image(ioctx, image, read_only=True) as img:
        try:
            spec = img.get_parent_image_spec()
            out[image] = [spec["image_name"], spec["snap_name"]]
        except rbd.ImageNotFound:
            out[image] = None
"""


def mon(ceph: Ceph, prefix: str, **args: Any) -> Any:
    ret, out, err = ceph.cluster.mon_command(
        json.dumps({"prefix": prefix, "format": "json", **args}), b""
    )
    assert ret == 0, f"{prefix} failed ({ret}): {err}"
    return json.loads(out) if out else None


@contextmanager
def rbd_site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    import libvirt
    import rbd

    pool = unique("rcl")
    mon(ceph, "osd pool create", pool=pool, pg_num=8, pgp_num=8)
    ioctx = ceph.cluster.open_ioctx(pool)
    conn = libvirt.open(libvirt_uri)
    lv_pool = None
    secret = None
    try:
        rbd.RBD().pool_init(ioctx, False)
        sec_uuid = str(uuid.uuid4())
        secret = conn.secretDefineXML(
            f"<secret ephemeral='no' private='no'><uuid>{sec_uuid}</uuid><usage type='ceph'>"
            f"<name>client.admin secret {pool}</name></usage></secret>"
        )
        import base64

        secret.setValue(base64.b64decode(ceph.admin_key()))
        name = f"lv-{pool}"
        lv_pool = conn.storagePoolDefineXML(
            f"<pool type='rbd'><name>{name}</name><source><name>{pool}</name>"
            f"<host name='127.0.0.1' port='{ceph.mon_v1_port()}'/>"
            f"<auth username='admin' type='ceph'><secret uuid='{sec_uuid}'/></auth>"
            "</source></pool>"
        )
        lv_pool.create(0)
        yield RbdSite(ceph, pool, name, libvirt_uri, sec_uuid, ioctx)
    finally:
        for dom in conn.listAllDomains(0):
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:  # another test's, undefined since it was listed
                continue
            if pool in xml:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        if lv_pool is not None:
            if lv_pool.isActive():
                lv_pool.destroy()
            lv_pool.undefine()
        if secret is not None:
            secret.undefine()
        conn.close()
        ioctx.close()
        mon(
            ceph,
            "osd pool delete",
            pool=pool,
            pool2=pool,
            yes_i_really_really_mean_it=True,
        )
