"""Recognise the image format a volume's first bytes announce: for warnings only.

libvirt probes file headers (src/storage_file/storage_file_probe.c in libvirt 9): a raw
volume into which a guest wrote a qcow2 header is reported as qcow2, with a backing file of
the guest's choosing. The reconciler never acts on such a header (DESIGN invariant 1); it
only warns when what a header announces disagrees with the record, so an operator learns
that libvirt, or a tool that probes, would misread the disk. The magic numbers below are
those libvirt's prober uses for the formats that can name other files or hide data.
"""

from __future__ import annotations

import errno
import os
import struct

HEADER_BYTES = 4096

SYMLINK = "symlink"
NOT_A_FILE = "not-a-file"
UNREADABLE = "unreadable"


def header_format(head: bytes) -> str:
    """The format announced by `head` (the first bytes of a volume), or 'raw'."""
    if head[:4] == b"QFI\xfb" and len(head) >= 8:
        version = struct.unpack(">I", head[4:8])[0]
        return "qcow" if version == 1 else "qcow2"
    if head[:4] == b"QED\x00":
        return "qed"
    if head[:4] == b"KDMV" or head[:21] == b"# Disk DescriptorFile":
        return "vmdk"
    if head[:8] == b"conectix":
        return "vpc"
    if len(head) >= 0x44 and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    if head[:6] == b"LUKS\xba\xbe":
        return "luks"
    if head[:4] == b"OOOM":
        return "cow"
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "ploop"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:32].startswith(b"Bochs Virtual HD Image"):
        return "bochs"
    return "raw"


def file_header_format(path: str) -> str:
    """Open without following links or blocking, read the first bytes, classify them."""
    return file_header(path)[0]


def file_header(path: str) -> tuple[str, os.stat_result | None]:
    """file_header_format, with the fstat of the descriptor the bytes were read from (None
    where nothing was read: a link, not a file, unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return SYMLINK, None
        return UNREADABLE, None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            return NOT_A_FILE, None
        return header_format(os.pread(fd, HEADER_BYTES, 0)), st
    except OSError:
        return UNREADABLE, None
    finally:
        os.close(fd)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)
