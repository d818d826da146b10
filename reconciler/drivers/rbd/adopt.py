"""Taking an existing RBD image under management (`reconcile adopt`): it is adopted as raw
at RBD's size (never its bytes'), its first bytes read only to report a header that
announces another format (a guest may have written it; it is never followed).

Invariants: a clone is refused (no record would hold a reference on its parent, so `cache
gc`, or its owner, could not see it), and so is an image whose record copy names another
record; nothing is written to the image here. Importing a host file (`import-nova`) fills
a temporary image, renamed when whole (drivers/flows/takein.py); a qcow2 overlay cannot be
taken into an rbd pool, whose disks are raw.
"""

from __future__ import annotations

from reconciler.drivers.api import Inspected
from reconciler.drivers.ingest.headers import HEADER_BYTES, header_format
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.copies import check_copy
from reconciler.model.errors import ReconcileError
from reconciler.schema.common import DiskFormat


def inspect_unmanaged(c: Cluster, volume: str, fmt: DiskFormat) -> Inspected:
    """An existing image is adopted as raw, its size RBD's (never its bytes'); its first
    bytes are read only to report a header that announces another format (a guest may
    have written it; it is never followed). A clone is refused: no record would hold
    a reference on its parent, so `cache gc` (or its owner) could not see it."""
    _, rbd = mods()
    if fmt is not DiskFormat.RAW:
        raise ReconcileError(
            f"pool {c.name} is an rbd pool: its disks are raw images, so {volume} "
            f"cannot be adopted as {fmt}"
        )
    with c.image(volume, read_only=True) as img:
        check_copy(c, img, volume, "adopting")
        with c.op(f"reading {volume}"):
            try:
                parent = img.get_parent_image_spec()
            except rbd.ImageNotFound:
                parent = None
            size = int(img.size())
            head = bytes(img.read(0, min(HEADER_BYTES, size))) if size else b""
    if parent is not None:
        raise ReconcileError(
            f"{c.name}/{volume} is a clone of {parent['pool_name']}/"
            f"{parent['image_name']}@{parent['snap_name']}; an adopted disk would depend "
            "on an image no record holds a reference to, so it is not adopted (flatten "
            "it first: rbd flatten)"
        )
    return Inspected(size, None, header_format(head))
