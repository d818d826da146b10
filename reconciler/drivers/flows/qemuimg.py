"""Every qemu-img (and mkfs) command line the reconciler runs, built here and only here, on
files opened without following links. Invariant 1: each names its formats (-f, and -O, -F
or a backing format where there is one); nothing here lets qemu-img probe a format. The
runner itself is reconciler/drivers/host/run.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from reconciler.model.errors import ReconcileError
from reconciler.schema.common import DiskFormat

# qemu-img's name for each recorded format (a ploop disk is qemu's `parallels` image).
QEMU_FORMAT = {DiskFormat.RAW: "raw", DiskFormat.QCOW2: "qcow2", DiskFormat.PLOOP: "parallels"}


class NotAFile(ReconcileError):
    """A path where a volume is expected is a symlink or not a regular file."""


@contextmanager
def open_volume(path: str, write: bool = True) -> Iterator[int]:
    """Open a volume file, refusing symlinks and anything but a regular file."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink
            raise NotAFile(f"{path} is a symlink; refusing to touch it or its target") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFile(f"{path} is not a regular file; refusing to touch it")
        yield fd
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """A path a child process can open to reach exactly the file behind `fd`."""
    return f"/proc/self/fd/{fd}"


def convert_argv(
    src_fmt: str, dst_fmt: str, src: str, dst: str, *, out_of_order: bool = False
) -> list[str]:
    """qemu-img convert with both formats named, into an existing volume (-n, made by
    libvirt or the driver at the disk's size), leaving runs of zeros unallocated (-S 4k,
    qemu-img's default, named); `out_of_order` (-W) where the target is ours alone."""
    return [
        *("qemu-img", "convert", "-n", *(["-W"] if out_of_order else [])),
        *("-f", src_fmt, "-O", dst_fmt, "-S", "4k", src, dst),
    ]


def compare_argv(src_fmt: str, dst_fmt: str, src: str, dst: str) -> list[str]:
    """qemu-img compare, quiet (exit status 0: equal, 1: differ), both formats named."""
    return ["qemu-img", "compare", "-q", "-f", src_fmt, "-F", dst_fmt, src, dst]


def info_argv(fmt: str, target: str) -> list[str]:
    """qemu-img info as JSON, of the declared format (never probed)."""
    return ["qemu-img", "info", "-f", fmt, "--output=json", target]


def create_argv(fmt: str, target: str, size: int) -> list[str]:
    """qemu-img create of an image of `fmt` and `size` bytes, with no backing."""
    return ["qemu-img", "create", "-q", "-f", fmt, target, str(size)]


def resize_argv(fmt: str, target: str, size: int) -> list[str]:
    """qemu-img resize (grow) of an image of the recorded `fmt`."""
    return ["qemu-img", "resize", "-q", "-f", fmt, target, str(size)]


def rebase_argv(fmt: str, target: str, backing: str, backing_fmt: str) -> list[str]:
    """qemu-img rebase -u: rewrite only the header's backing and its format (no data)."""
    return ["qemu-img", "rebase", "-u", "-f", fmt, "-b", backing, "-F", backing_fmt, target]


def mkfs_argv(kind: str, label: str | None, target: str) -> list[str]:
    """The mkfs command for a template; explicit arguments, forced onto a plain file."""
    if kind == "swap":
        return ["mkswap", "-f", target]
    if kind == "ext4":
        return [
            "mkfs.ext4",
            "-F",
            "-q",
            "-E",
            "nodiscard",
            *(["-L", label] if label else []),
            target,
        ]
    if kind == "xfs":
        return ["mkfs.xfs", "-f", "-q", "-K", *(["-L", label] if label else []), target]
    if kind == "vfat":
        return ["mkfs.vfat", *(["-n", label] if label else []), target]
    raise ValueError(f"no filesystem tool for template {kind}")
