"""Every qemu-img (and mkfs) command line the reconciler runs, built here and only here, on
files opened without following links. Invariant 1: each names its formats (-f, and -O, -F
or a backing format where there is one); nothing here lets qemu-img probe a format. The
runner itself is reconciler/drivers/host/run.py.

Preallocation (a file pool's `preallocation`), as qemu-img 7.2 takes it, measured:
- `create -o preallocation=`: raw takes off, falloc, full (metadata: "Unsupported
  preallocation mode"); qcow2 takes all four; parallels refuses metadata and accepts
  falloc and full but ignores them (the option is the file protocol's, applied before the
  header is written: a 64 MiB image stays 1 MiB), so a ploop disk is allocated by writing
  every cluster (`fill_argv`). A qcow2 with a backing file takes a preallocation only with
  `extended_l2=on` ("Backing file and preallocation can only be used at the same time if
  extended_l2 is on"): its preallocated clusters are subclusters marked unallocated, which
  still read through to the backing file.
- `resize --preallocation=`: raw off, falloc, full; qcow2 all four, overlays included;
  parallels cannot resize at all.
- `convert -n` into a preallocated target writes its zeros by unmapping (a falloc'd raw
  file ends sparse again): told `--target-is-zero` (true of a volume just made), it writes
  none, and what was allocated stays allocated.

Encryption (a disk's `encryption: {format: luks}`), as qemu-img 7.2 takes it, measured:
- a raw disk is qemu's `luks` format over the volume: a LUKS1 header (aes-256-xts,
  plain64, sha256; 2,068,480 bytes, keys.LUKS_HEADER, recorded per disk) then the
  payload, which runs to the volume's end: a 64 MiB disk is a 69,177,344-byte file. A
  qcow2 disk has qemu's native LUKS encryption (`encrypt.format=luks`): its clusters
  are encrypted, its tables not, and an overlay's backing file (a plain cache entry) is
  read as it is.
- the key reaches qemu-img as `--object secret,...,file=/proc/self/fd/N` of a memfd
  (host/keys.py), never on the command line; an encrypted image is opened as a `json:`
  filename naming `key-secret` (`encrypt.key-secret` for qcow2), its format named too.
- `iter-time` (the PBKDF's work per unlock) is LUKS_ITER_TIME_MS, not qemu's 2000: the
  passphrase is 256 random bits, which stretching cannot strengthen, and every open
  (each domain start) pays it. Whatever it is, create spends about 2.3 s measuring the
  PBKDF's speed (two runs of over 500 ms of CPU), and that measurement fails on a host
  whose thread CPU time reads 0 ms for a short run ("Unable to get accurate CPU usage"):
  here 1 try in 6 when idle, 9 in 12 with both cores busy; a failed try ends within
  10-50 ms, so such a create is run again, up to CREATE_TRIES times.
- a LUKS payload is not zeros until written (it decrypts the file's zeros): a raw
  encrypted disk reads noise where nothing was written (past an image's end, a blank
  disk), as a fresh dm-crypt device does; so its fill writes every zero (no
  `--target-is-zero`). An encrypted qcow2 reads zeros where no cluster is allocated."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from reconciler.drivers.host.keys import SECRET_ID
from reconciler.drivers.host.run import ToolError, execute, last_line
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.common import DiskFormat, Preallocation

# qemu-img's name for each recorded format (a ploop disk is qemu's `parallels` image).
QEMU_FORMAT = {DiskFormat.RAW: "raw", DiskFormat.QCOW2: "qcow2", DiskFormat.PLOOP: "parallels"}
# qemu-img's name for each encrypted format (a raw disk is a LUKS volume).
QEMU_ENCRYPTED_FORMAT = {DiskFormat.RAW: "luks", DiskFormat.QCOW2: "qcow2"}
LUKS_ITER_TIME_MS = 10
CREATE_TRIES = 30
PBKDF_FLAKE = "Unable to get accurate CPU usage"


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
    src_fmt: str,
    dst_fmt: str,
    src: str,
    dst: str,
    *,
    out_of_order: bool = False,
    target_is_zero: bool = False,
) -> list[str]:
    """qemu-img convert with both formats named, into an existing volume (-n, made by
    libvirt or the driver at the disk's size), leaving runs of zeros unallocated (-S 4k,
    qemu-img's default, named); `out_of_order` (-W) where the target is ours alone;
    `target_is_zero` where the target is known to read as zeros (just made), so no zeros
    are written to it (nor what it has allocated unmapped)."""
    return [
        *("qemu-img", "convert", "-n", *(["-W"] if out_of_order else [])),
        *(["--target-is-zero"] if target_is_zero else []),
        *("-f", src_fmt, "-O", dst_fmt, "-S", "4k", src, dst),
    ]


def zeros_source(size: int) -> str:
    """A raw source of `size` bytes of zeros that opens no file (qemu's null-co driver)."""
    node = {"driver": "raw", "file": {"driver": "null-co", "size": size, "read-zeroes": True}}
    return "json:" + json.dumps(node, sort_keys=True)


def fill_argv(dst_fmt: str, sources: list[str], dst: str) -> list[str]:
    """qemu-img convert of raw `sources`, one after the other (qemu-img concatenates
    them), into the existing volume `dst`, every byte written as data (-S 0: no run of
    zeros skipped), so every cluster of `dst` is allocated (a ploop disk's `full`)."""
    return ["qemu-img", "convert", "-n", "-S", "0", "-f", "raw", *sources, "-O", dst_fmt, dst]


def compare_argv(src_fmt: str, dst_fmt: str, src: str, dst: str) -> list[str]:
    """qemu-img compare, quiet (exit status 0: equal, 1: differ), both formats named."""
    return ["qemu-img", "compare", "-q", "-f", src_fmt, "-F", dst_fmt, src, dst]


def info_argv(fmt: str, target: str) -> list[str]:
    """qemu-img info as JSON, of the declared format (never probed)."""
    return ["qemu-img", "info", "-f", fmt, "--output=json", target]


def create_argv(
    fmt: str,
    target: str,
    size: int,
    *,
    preallocation: Preallocation | None = None,
    backing: str | None = None,
) -> list[str]:
    """qemu-img create of an image of `fmt` and `size` bytes (over what `target` holds),
    allocated as `preallocation` says (None: qemu-img's default, off). A qcow2 is
    compat 1.1 (as libvirt makes one); with `backing` (a raw cache entry's path, never
    opened: -u) it is an overlay, with extended L2 entries where it is preallocated
    (qemu-img takes a preallocation with a backing file only so)."""
    opts = []
    if preallocation is not None:
        opts.append(f"preallocation={preallocation.value}")
    back: list[str] = []
    if fmt == "qcow2":
        opts.append("compat=1.1")
        if backing is not None:
            back = ["-u", "-b", backing, "-F", "raw"]
            if preallocation is not None:
                opts.append("extended_l2=on")
    elif backing is not None:
        raise ValueError(f"a {fmt} image has no backing file")
    return [
        *("qemu-img", "create", "-q", "-f", fmt, *back),
        *(["-o", ",".join(opts)] if opts else []),
        *(target, str(size)),
    ]


def encrypted_create_argv(
    fmt: DiskFormat,
    secret: list[str],
    target: str,
    size: int,
    *,
    preallocation: Preallocation | None = None,
    backing: str | None = None,
) -> list[str]:
    """qemu-img create of an encrypted image of the recorded `fmt` (a raw disk: a `luks`
    volume; a qcow2: LUKS inside, an overlay of `backing` (a raw entry's path, never
    opened: -u) where given), its key the held secret `secret` (keys.secret_object)."""
    opts = [] if preallocation is None else [f"preallocation={preallocation.value}"]
    back: list[str] = []
    if fmt is DiskFormat.RAW:
        if backing is not None:
            raise ValueError("a luks volume has no backing file")
        opts += [f"key-secret={SECRET_ID}", f"iter-time={LUKS_ITER_TIME_MS}"]
    elif fmt is DiskFormat.QCOW2:
        opts += [
            "compat=1.1",
            "encrypt.format=luks",
            f"encrypt.key-secret={SECRET_ID}",
            f"encrypt.iter-time={LUKS_ITER_TIME_MS}",
        ]
        if backing is not None:
            back = ["-u", "-b", backing, "-F", "raw"]
            if preallocation is not None:
                opts.append("extended_l2=on")
    else:
        raise ValueError(f"a {fmt.value} image is never encrypted")
    return [
        *("qemu-img", "create", "-q", *secret, "-f", QEMU_ENCRYPTED_FORMAT[fmt], *back),
        *("-o", ",".join(opts), target, str(size)),
    ]


def run_create(argv: list[str], *, fds: tuple[int, ...], what: str) -> None:
    """Run an encrypted create, again (up to CREATE_TRIES) where qemu-img's measurement
    of the PBKDF failed on a host counting thread CPU time in ticks (the docstring)."""
    for attempt in range(1, CREATE_TRIES + 1):
        res = execute(argv, fds, what)
        if res.returncode == 0:
            return
        if PBKDF_FLAKE not in res.stderr or attempt == CREATE_TRIES:
            raise ToolError(f"{what}: {argv[0]} failed: {last_line(res)}")


def create_encrypted(
    rec: DiskRecord, secret: list[str], key_fd: int, fd: int, *, backing: str | None = None
) -> None:
    """Make `rec`'s encrypted image (its recorded format and preallocation) in the file
    at descriptor `fd`, its key the held secret `secret` read from `key_fd`; a LUKS
    volume (a raw disk) must then be exactly its recorded header + size, which growing it
    without its key relies on."""
    enc = rec.encryption
    assert enc is not None
    run_create(
        encrypted_create_argv(
            rec.format,
            secret,
            fd_path(fd),
            rec.virtual_size,
            preallocation=rec.preallocation,
            backing=backing,
        ),
        fds=(key_fd, fd),
        what=f"encrypt {rec.volume}",
    )
    if enc.header is not None and os.fstat(fd).st_size != enc.header + rec.virtual_size:
        raise ReconcileError(
            f"{rec.volume}: qemu-img made a LUKS volume of {os.fstat(fd).st_size} "
            f"bytes, not its recorded header {enc.header} + {rec.virtual_size}; "
            "this qemu lays LUKS out otherwise, and the disk is not made"
        )


def encrypted_image(fmt: DiskFormat, filename: str) -> str:
    """A `json:` filename opening the encrypted image of recorded `fmt` in the file at
    `filename` with the key secret qemu-img was given (keys.SECRET_ID)."""
    node: dict[str, object] = {"driver": QEMU_ENCRYPTED_FORMAT[fmt]}
    if fmt is DiskFormat.RAW:
        node["key-secret"] = SECRET_ID
    else:
        node["encrypt"] = {"key-secret": SECRET_ID}
    node["file"] = {"driver": "file", "filename": filename}
    return "json:" + json.dumps(node, sort_keys=True)


def encrypted_convert_argv(
    secret: list[str], src_fmt: str, dst_fmt: DiskFormat, src: str, dst: str
) -> list[str]:
    """qemu-img convert of `src` into the existing encrypted image at file `dst` (-n),
    every zero written (its payload reads as zeros only where written)."""
    return [
        *("qemu-img", "convert", "-n", *secret, "-f", src_fmt),
        *("-O", QEMU_ENCRYPTED_FORMAT[dst_fmt], "-S", "4k", src, encrypted_image(dst_fmt, dst)),
    ]


def resize_argv(
    fmt: str, target: str, size: int, preallocation: Preallocation | None = None
) -> list[str]:
    """qemu-img resize (grow) of an image of the recorded `fmt`, the new part allocated as
    the disk was made (`preallocation`; None: off, qemu-img's default)."""
    mode = [f"--preallocation={preallocation.value}"] if preallocation is not None else []
    return ["qemu-img", "resize", "-q", "-f", fmt, *mode, target, str(size)]


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


def keyed_convert_argv(
    secret: list[str], src_fmt: str, dst_fmt: str, src: str, dst: str
) -> list[str]:
    """qemu-img convert of the encrypted `src` (a `json:` node naming its key secret,
    keys.secret_object's `secret`) into the existing plain file `dst` (-n), which reads
    as zeros (--target-is-zero), runs of zeros left unallocated (-S 4k)."""
    return [
        *("qemu-img", "convert", "-n", "-W", "--target-is-zero", *secret),
        *("-f", src_fmt, "-O", dst_fmt, "-S", "4k", src, dst),
    ]
