"""Plain RBD images of one pool made and removed, with python-rbd: an empty image (a blank
disk, a copy's target, a temporary image), a clone's parent read, and a removal that waits
out a dead client's watch.

Invariants: a create never takes an existing name (VolumeExists); a removal of a
missing image is fine (what an interrupted RBD.remove leaves is removed too); an image with
a snapshot is never removed here (a clone in the trash holds it: the error says so), and
one still open by a client after WATCH_WAIT is an error naming the watchers (a running VM,
on any host, watches its disk), never forced. Temporary images `.reconciler-tmp-<name>`
are written under `<name>`'s lock and removed by sweep_temp (drivers/rbd/disks.py) when
nobody holds it; no disk is named so.
"""

from __future__ import annotations

import time
from typing import Any

from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.model.errors import ReconcileError
from reconciler.util.logs import get_logger

log = get_logger(__name__)

WATCH_WAIT = 45.0  # seconds to wait for a dead client's watch on an image to expire


def create_empty(c: Cluster, volume: str, size: int) -> None:
    """A plain image (never a clone), made as a blank disk is (RBD's default
    features), reading as zeros."""
    _, rbd = mods()
    with c.op(f"creating image {volume}"):
        try:
            rbd.RBD().create(c.io(), volume, size, old_format=False)
        except rbd.ImageExists:
            raise c.appeared(volume) from None


def parent(c: Cluster, img: Any, volume: str) -> str | None:
    """The image (in this pool's namespace) an open image is a clone of, if any."""
    _, rbd = mods()
    with c.op(f"reading {volume}'s parent"):
        try:
            spec = img.get_parent_image_spec()
        except rbd.ImageNotFound:
            return None
    if spec["pool_name"] != c.ceph.pool or spec["pool_namespace"]:
        return None
    return str(spec["image_name"])


def remove_temp(c: Cluster, tmp: str) -> None:
    """Remove a temporary image (an import), its snapshots first; a missing one is fine."""
    _, rbd = mods()
    with c.op(f"removing temporary image {tmp}"):
        try:
            with rbd.Image(c.io(), tmp) as img:
                for s in list(img.list_snaps()):
                    img.remove_snap(s["name"])
        except rbd.ImageNotFound:
            pass  # gone, or half made by an interrupted create: removed below
    remove_image(c, tmp, "temporary image")


def remove_image(c: Cluster, name: str, what: str) -> None:
    """RBD.remove, waiting while the image is busy: a client that died with the image
    open (a killed import or create) keeps its watch until the OSD times it out
    (osd_client_watch_timeout, 30 s by default). Still busy after WATCH_WAIT: an error
    naming the watchers (a running VM, on any host, watches its disk too)."""
    _, rbd = mods()
    deadline = time.monotonic() + WATCH_WAIT
    while True:
        with c.op(f"removing {what} {name}"):
            try:
                rbd.RBD().remove(c.io(), name)
                return
            except rbd.ImageNotFound:
                return
            except rbd.ImageHasSnapshots:
                raise ReconcileError(
                    f"not removing {what} {c.name}/{name}: it still has a snapshot "
                    "(a clone in the trash holds it)"
                ) from None
            except rbd.ImageBusy:
                if time.monotonic() > deadline:
                    watchers = _watchers(c, name)
                    raise ReconcileError(
                        f"pool {c.name}: {what} {name} is still open by client(s) "
                        f"{watchers or '?'} after {WATCH_WAIT:g} s: a VM using it, or a "
                        "reconciler that died with it open; it is removed on a later run"
                    ) from None
        log.info("image.busy", pool=c.name, image=name)
        time.sleep(0.5)  # the watch expires on the OSD: nothing here to wait on


def _watchers(c: Cluster, name: str) -> str:
    _, rbd = mods()
    try:
        with rbd.Image(c.io(), name, read_only=True) as img:
            return ", ".join(str(w.get("addr")) for w in img.watchers_list())
    except (rbd.Error, AttributeError):
        return ""
