"""qemu-img over encrypted volumes with keys given for one command: a migration that changes
a disk's encryption or moves it under a new key (apply/steps/migrate.py; which case is
model/keying.py's), and growing an encrypted qcow2 with its key from a key source.

- A key reaches qemu-img only as `--object secret,id=ID,format=raw,file=/proc/self/fd/N`
  of a memfd (host/keys.py's key_object, as secret_object does for a create); here two
  can be named at once: the new key as keys.SECRET_ID (`sec0`, what flows/qemuimg.py's
  encrypted create and images name) and the old one as OLD_ID (`sec1`).
- A volume is opened as its driver's qemu_image() says (a `json:` node naming its format
  and, for an overlay, its recorded backing), with the encryption layered on top: qemu's
  `luks` over the raw node (a raw disk), or the qcow2 node's `encrypt.key-secret`. So the
  driver's way to reach its bytes (a file, an LV's range of its PV, an rbd export) is
  used unchanged, and every format stays named (-f/-O/-F).
- An encrypted copy is made in an unnamed local file (O_TMPFILE under TMPDIR, default
  /var/tmp: a crash leaves nothing) and then copied into the target volume as raw bytes:
  what that file holds is ciphertext only (its LUKS header, or an encrypted qcow2). A
  decrypted copy (keying `decrypt`) is plain there, as its target is.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.drivers.api import QemuImage
from reconciler.drivers.flows.qemuimg import QEMU_ENCRYPTED_FORMAT
from reconciler.model.errors import ReconcileError
from reconciler.schema.common import DiskFormat

OLD_ID = "sec1"


def _node(img: QemuImage) -> dict[str, Any]:
    if not img.filename.startswith("json:"):
        raise ReconcileError(f"{img.filename}: a volume is opened by its json: node only")
    node: dict[str, Any] = json.loads(img.filename[len("json:") :])
    return node


def keyed_view(
    img: QemuImage, fmt: DiskFormat, secret_id: str, limit: int | None = None
) -> QemuImage:
    """The encrypted disk of recorded `fmt` in the volume `img` reaches (its driver's
    node of the volume as raw, for a raw disk; as qcow2, for a qcow2), opened with the key
    `secret_id`; `limit`: only its first bytes (a raw LUKS payload read past what was
    written is noise, not zeros, so a copy is compared up to the original's size)."""
    node = _node(img)
    top: dict[str, Any]
    if fmt is DiskFormat.RAW:
        top = {"driver": QEMU_ENCRYPTED_FORMAT[fmt], "key-secret": secret_id, "file": node}
    elif fmt is DiskFormat.QCOW2:
        top = {**node, "encrypt": {"key-secret": secret_id}}
    else:
        raise ReconcileError(f"a {fmt.value} disk is never encrypted")
    qfmt = str(top["driver"])
    if limit is not None:
        top = {"driver": "raw", "size": limit, "file": top}
        qfmt = "raw"
    return QemuImage(qfmt, "json:" + json.dumps(top, sort_keys=True), img.fds)


def file_image(fmt: str, fd: int) -> QemuImage:
    """A local file (a scratch) as an image of qemu format `fmt`."""
    node = {"driver": fmt, "file": {"driver": "file", "filename": f"/proc/self/fd/{fd}"}}
    return QemuImage(fmt, "json:" + json.dumps(node, sort_keys=True), (fd,))
