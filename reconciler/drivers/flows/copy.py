"""Copying a volume's raw bytes into another volume, written once for every pair of backends:
`raw_copy(src, dst)` with a RawSource a driver's reader() gives and a RawSink its writer()
gives (reconciler/drivers/api.py). Nothing here knows a backend.

Invariants:
- raw to raw only: nothing is read as a format (a format to convert, an overlay to flatten
  is qemu-img's, built in flows/qemuimg.py);
- a source larger than the room of its copy is refused before a byte is written;
- into a sink that reads as zeros (a new file, a new RBD image) only the source's data
  extents are read and only chunks that are not all zeros are written, so the copy stays
  sparse; into one that does not (an LV, whose extents may hold an earlier tenant's bytes)
  every byte of the sink is written, zeros past the source's end included;
- between two regular files of this host the data extents (SEEK_DATA/SEEK_HOLE) are copied
  in the kernel (copy_file_range: a reflink where the file system shares blocks), their
  write-back started as they go, holes left holes.
A sink's finish() ends every copy (a flush, an fsync); a copy that fails part way leaves a
partial volume that its caller removes (a migration's copy, a temporary volume).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Iterator

from reconciler.drivers.api import RawSink, RawSource
from reconciler.model.errors import ReconcileError
from reconciler.util import progress
from reconciler.util.progress import Task

CHUNK = 4 << 20  # bytes per read and write (RBD's default object size)
_ZERO = bytes(CHUNK)

# copy_file_range refuses some pairs of file systems (EXDEV) or files (EINVAL, ENOSYS,
# EOPNOTSUPP); those ranges are copied through this process instead.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range, do not wait


def is_zero(data: bytes) -> bool:
    """Whether every byte is zero: one memcmp, which stops at the first other byte (and
    none at all for _ZERO itself, which a bytes comparison knows by identity)."""
    return data == (_ZERO if len(data) == CHUNK else bytes(len(data)))


def data_extents(fd: int, length: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of the file's first `length` bytes that hold data
    (SEEK_DATA/SEEK_HOLE); the rest reads as zeros."""
    at = 0
    while at < length:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole remains
            raise
        if start >= length:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        yield start, end
        at = end


class FileSource:
    """A regular file of this host, opened by its driver, as a RawSource."""

    def __init__(self, fd: int, what: str, size: int | None = None) -> None:
        self.fd: int | None = fd
        self.what = what
        self.size = os.fstat(fd).st_size if size is None else size

    def extents(self) -> Iterator[tuple[int, int]]:
        assert self.fd is not None
        return data_extents(self.fd, self.size)

    def read(self, at: int, n: int) -> bytes:
        assert self.fd is not None
        return os.pread(self.fd, min(n, self.size - at), at)


class FileSink:
    """A new (sparse) regular file of this host, opened by its driver, as a RawSink."""

    zeroed = True

    def __init__(self, fd: int, what: str) -> None:
        self.fd: int | None = fd
        self.what = what
        self.size = os.fstat(fd).st_size

    def write(self, data: bytes, at: int) -> None:
        assert self.fd is not None
        pwrite_all(self.fd, data, at)

    def finish(self) -> None:
        pass  # made durable by its driver's finish_copy, or by the caller's fsync


def raw_copy(src: RawSource, dst: RawSink, *, room: int | None = None) -> None:
    """Copy every byte of `src` into `dst` at the same offsets (see the module docstring);
    `room`: the bytes the copy may hold (default: the sink's size)."""
    if src.size > (dst.size if room is None else room):
        raise ReconcileError(f"{src.what} is larger than its copy; not copied")
    # Progress counts the source's bytes, holes as they are passed (their zeros are read
    # by nobody: a sparse 4 GiB disk with 1 GiB of data is done at 4 GiB).
    with progress.task(f"copy {src.what}", max(src.size, 1)) as copying:
        if src.fd is not None and dst.fd is not None:
            for start, end in src.extents():
                copying.reach(start / max(src.size, 1))
                copy_range(src.fd, dst.fd, start, end, src.what, copying)
        elif dst.zeroed:
            for start, end in src.extents():
                copying.reach(start / max(src.size, 1))
                for at in range(start, end, CHUNK):
                    n = min(CHUNK, end - at)
                    data = src.read(at, n)
                    if len(data) != n:
                        raise ReconcileError(f"{src.what}: short read at {at}")
                    if not is_zero(data):
                        dst.write(data, at)
                    copying.advance(n)
        else:
            for at in range(0, dst.size, CHUNK):
                n = min(CHUNK, dst.size - at)
                data = src.read(at, min(n, src.size - at)) if at < src.size else b""
                if at + len(data) < min(at + n, src.size):
                    raise ReconcileError(f"{src.what}: short read at {at}")
                if not data:
                    data = _ZERO if n == CHUNK else bytes(n)  # past the source: zeros
                elif len(data) < n:
                    data += bytes(n - len(data))
                dst.write(data, at)
                copying.reach(min(at + n, src.size) / max(src.size, 1))
        dst.finish()


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2), which Python's os module lacks; None without one."""
    import ctypes  # only when a copy is made

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a copied range to disk without waiting for it, so the copy goes to
    disk while the rest is copied and its fsync has less left to wait for (20 migrations
    of 128 MiB each between dir pools on ext4 here: 2.6 s -> 2.4 s; with removals outside
    libvirt's pool lock, see the file driver's _delete_in, 2.0 s). Only a hint: a
    write-back error is reported by that fsync."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# The most one copy_file_range call copies: a step of the copy's progress.
KERNEL_STEP = 64 << 20


def copy_range(
    src: int, dst: int, start: int, end: int, what: str, copying: Task | None = None
) -> None:
    """Copy [start, end) of `src` to the same offsets of `dst`, its write-back started."""
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, min(end - pos, KERNEL_STEP), pos, pos)
            start_writeback(dst, pos, n)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            data = os.pread(src, min(end - pos, 1 << 20), pos)
            n = len(data)
            if n:
                pwrite_all(dst, data, pos)
        if n == 0:
            raise ReconcileError(f"{what} shrank while it was copied")
        pos += n
        if copying is not None:
            copying.advance(n)


def _merged(*spans: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of (start, end) ranges, in order, overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for rs in spans for r in rs):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _read_into(fd: int, buf: memoryview, at: int, size: int) -> None:
    """`len(buf)` bytes of the file at `at` into `buf`; past the file's `size` (or a
    short read at its end) zeros, as a raw image reads past its end when compared."""
    n = len(buf)
    got = 0
    while got < n and at + got < size:
        k = os.preadv(fd, [buf[got : min(n, size - at)]], at + got)
        if k == 0:
            break  # the file ends before its recorded size: zeros, as qemu-img reads it
        got += k
    if got < n:
        buf[got:n] = bytes(n - got)


def files_equal(a: RawSource, b: RawSource, compared: Task | None = None) -> bool:
    """Whether two regular files of this host read the same byte for byte, as `qemu-img
    compare -f raw -F raw` (without -s) judges them: over the longer one's size, the
    shorter reading as zeros past its end. Only ranges where either holds data (its
    SEEK_DATA/SEEK_HOLE extents) are read; a range that is a hole in both reads as zeros
    in both. The same reads through the page cache as qemu-img's, in this process: no
    process started for it, nothing copied but by the reads (bytearray.startswith takes
    the other buffer's view, a memcmp; a memoryview's == compares item by item)."""
    assert a.fd is not None and b.fd is not None
    total = max(a.size, b.size)
    x, y = bytearray(CHUNK), bytearray(CHUNK)
    with memoryview(x) as xv, memoryview(y) as yv:
        for start, end in _merged(data_extents(a.fd, total), data_extents(b.fd, total)):
            if compared is not None:
                compared.reach(start / max(total, 1))
            for at in range(start, end, CHUNK):
                n = min(CHUNK, end - at)
                _read_into(a.fd, xv[:n], at, a.size)
                _read_into(b.fd, yv[:n], at, b.size)
                if not x.startswith(yv[:n]):
                    return False
                if compared is not None:
                    compared.advance(n)
    return True


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


@contextlib.contextmanager
def scratch() -> Iterator[int]:
    """An unnamed local file (O_TMPFILE under TMPDIR, default /var/tmp) for a fetch, a
    template or an encrypted copy: a crash leaves nothing to sweep."""
    base = os.environ.get("TMPDIR", "/var/tmp")
    try:
        fd = os.open(base, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ReconcileError(f"cannot make a scratch file in {base}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)
