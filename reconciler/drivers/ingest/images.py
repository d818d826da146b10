"""Fetching and checking source images before they enter a pool's cache.

DESIGN invariant 3: an image is streamed once, and while it streams its sha256 is computed
and oslo.utils' format inspector reads it, so a qcow2 with a backing file or data-file,
unknown incompatible features, a VMDK whose extents are outside itself, content that
matches another format than the declared one (or more than one), or a virtual size larger
than the disk it is for, is refused, the last before more than its header has been read.
`qemu-img info` then runs with the declared format under CPU and memory limits and must
agree. Nothing about an image is ever taken from the image: format, sha256 and size are
declared in the catalog and only checked here. A partition table (GPT or MBR), which the
inspector calls "gpt", is raw content: it is accepted for a raw declaration once the
inspector's own check of the table passes, and refused for any other.

A fetch is bounded in time (the config's `fetch` section, FetchConfig): one deadline for
all its attempts, connectTimeout + slack + declared size / minRate, checked before every
read, and no connect or read waits longer than connectTimeout; so a server that sends a
byte every few seconds, or accepts and never answers, fails in bounded time, and the
half-made entry is discarded as after any failed fetch (entries.Cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, cast
from urllib.parse import unquote, urlparse

from oslo_utils.imageutils import format_inspector as fi

from reconciler.drivers.flows.qemuimg import info_argv
from reconciler.drivers.host.run import execute, last_line
from reconciler.model.errors import ReconcileError
from reconciler.model.units import format_size
from reconciler.schema.bounded import NotRead, open_stream
from reconciler.schema.config import ImageConfig
from reconciler.util.logs import get_logger

log = get_logger(__name__)

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
# Limits for qemu-img on untrusted images, as Nova uses (nova/virt/images.py): 1 GiB of
# address space and 30 s of CPU. A run over them is killed and its output removed.
QEMU_IMG_MEMORY = 1 << 30
QEMU_IMG_CPU_SECONDS = 30
HTTP_ATTEMPTS = 4


class ImageRejected(ReconcileError):
    """The image is not what the catalog declares, or is unsafe to use."""


class FetchFailed(ReconcileError):
    """The image could not be read from its location; `retry`: another try may succeed."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


# HTTP statuses another try may change: a server's trouble (5xx), a timeout or a rate
# limit. Any other refusal (401, 403, 404, ...) answers the same every time.
_HTTP_TRANSIENT = frozenset({408, 425, 429})


class Deadline:
    """When a fetch must be done by (time.monotonic()), and why that long."""

    def __init__(self, image: ImageConfig) -> None:
        self.seconds = image.fetch.deadline(image.size)
        self.at = time.monotonic() + self.seconds
        self.connect_timeout = image.fetch.connect_timeout
        self.why = (
            f"not fetched within {self.seconds:.0f} s, the deadline for "
            f"{format_size_approx(image.size)} at the config's fetch.minRate "
            f"({format_size_approx(image.fetch.min_rate)}/s) plus connectTimeout and slack"
        )

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def timeout(self) -> float:
        """The longest one connect or read may wait now."""
        return max(min(self.connect_timeout, self.remaining()), 0.01)

    def check(self, location: str) -> None:
        if self.remaining() <= 0:
            raise FetchFailed(f"{location}: {self.why}")


class _DeadlineReader:
    """`read(n)` of a source as pieces that each wait at most one socket timeout, the
    deadline checked before each: a plain read(n) of a trickling server blocks until all
    n bytes are in, however long that takes."""

    def __init__(self, src: IO[bytes], deadline: Deadline, location: str) -> None:
        self._src = src
        self._deadline = deadline
        self._location = location
        read1 = getattr(src, "read1", None)
        self._read1: Callable[[int], bytes] = read1 if read1 is not None else src.read

    def read(self, n: int) -> bytes:
        self._deadline.check(self._location)
        first = self._read1(n)
        if len(first) in (0, n):
            return first
        parts = [first]
        got = len(first)
        while got < n:
            self._deadline.check(self._location)
            piece = self._read1(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def close(self) -> None:
        self._src.close()


@dataclass(frozen=True)
class Checked:
    """What the checks established about a fetched image."""

    sha256: str
    size: int
    format: str
    virtual_size: int


class Progress:
    """Bytes and rate, on a terminal as one updating line, and in the log every 10%."""

    def __init__(self, what: str, total: int, out: IO[str] | None = None) -> None:
        self.what = what
        self.total = total
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.start = time.monotonic()
        self.done = 0
        self._next_log = 0.1

    def update(self, n: int) -> None:
        self.done += n
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        if self.tty:
            self.out.write(
                f"\r\x1b[2K{self.what}: {format_size_approx(self.done)} of "
                f"{format_size_approx(self.total)} ({frac:.0%}) at "
                f"{format_size_approx(int(rate))}/s"
            )
            self.out.flush()
        if frac >= self._next_log:
            log.info(
                "image.fetch.progress",
                image=self.what,
                bytes=self.done,
                total=self.total,
                rate_bytes_per_s=int(rate),
            )
            while self._next_log <= frac:
                self._next_log += 0.1

    def finish(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
            self.out.flush()


RBD_READ = 4 << 20  # bytes per read from a remote RBD snapshot (the default object size)
RBD_TIMEOUT = 30.0  # seconds any one Ceph operation of a fetch may take


class _RbdReader(io.RawIOBase):
    """A snapshot of an RBD image, read front to back (what `_stream_once` needs)."""

    def __init__(self, image: Any, size: int) -> None:
        self._image = image
        self._size = size
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._offset, RBD_READ)
        if n <= 0:
            return 0
        data: bytes = self._image.read(self._offset, n)
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)


@contextmanager
def open_rbd(location: str, image: ImageConfig | None) -> Iterator[IO[bytes]]:
    """Read an rbd://FSID/POOL/IMAGE/SNAP location of another cluster through a client of
    that cluster (the catalog's cephConf), every wait bounded."""
    m = re.fullmatch(r"rbd://([0-9a-fA-F-]{36})/([^/@]+)/([^/@]+)/([^/@]+)", location)
    if m is None:
        raise FetchFailed(f"{location} is not rbd://FSID/POOL/IMAGE/SNAP")
    fsid, pool, name, snap = m[1].lower(), m[2], m[3], m[4]
    if image is None or image.ceph_conf is None:
        raise FetchFailed(
            f"{location} is a snapshot in another Ceph cluster than the pool's; give its "
            "catalog entry `cephConf` (that cluster's ceph.conf) so it can be fetched, or "
            "serve the image over http(s) or file://"
        )
    from reconciler.drivers.rbd.cluster import MISSING_BINDINGS

    try:
        import rados
        import rbd
    except ImportError as e:
        raise FetchFailed(f"{location}: {MISSING_BINDINGS.format(e=e)}") from None
    t = f"{RBD_TIMEOUT:g}"
    conf = {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t}
    cluster = rados.Rados(conffile=image.ceph_conf, name=image.ceph_client, conf=conf)
    try:
        try:
            cluster.connect()
            found = str(cluster.get_fsid()).lower()
            if found != fsid:
                raise FetchFailed(
                    f"{location}: cephConf {image.ceph_conf} is of cluster {found}, not {fsid}"
                )
            ioctx = cluster.open_ioctx(pool)
        except (rados.Error, OSError) as e:
            raise FetchFailed(
                f"{location}: cannot reach it through {image.ceph_conf}: {e}"
            ) from None
        try:
            try:
                img = rbd.Image(ioctx, name, snapshot=snap, read_only=True)
            except (rbd.Error, rados.Error) as e:
                raise FetchFailed(f"{location}: cannot open the snapshot: {e}") from None
            try:
                reader = _RbdReader(img, int(img.size()))
                try:
                    yield io.BufferedReader(reader, RBD_READ)
                except (rbd.Error, rados.Error) as e:
                    raise FetchFailed(f"{location}: transfer failed: {e}") from None
            finally:
                img.close()
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def format_size_approx(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@contextmanager
def open_location(
    location: str, image: ImageConfig | None = None, deadline: Deadline | None = None
) -> Iterator[IO[bytes]]:
    url = urlparse(location)
    if url.scheme == "rbd":
        # An rbd pool of the same cluster clones from it directly and never gets here.
        with open_rbd(location, image) as f:
            yield f
        return
    if url.scheme == "file":
        path = unquote(url.path)
        # Without blocking (a FIFO would wait for a writer for ever), and only if it is a
        # regular file: bounded.py's opener, the one for every input file.
        try:
            f = open_stream(path, what=path, follow_symlinks=True)
        except NotRead as e:
            raise FetchFailed(str(e)) from None
        except FileNotFoundError as e:
            raise FetchFailed(f"{path}: cannot read: {e.strerror}") from None
        try:
            yield f
        finally:
            f.close()
        return
    req = urllib.request.Request(location, headers={"User-Agent": "reconcile"})
    try:
        # The connect and every read of the response wait at most this long.
        timeout = deadline.timeout() if deadline is not None else 30.0
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        transient = e.code >= 500 or e.code in _HTTP_TRANSIENT
        raise FetchFailed(f"{location}: HTTP {e.code} {e.reason}", retry=transient) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchFailed(f"{location}: {reason}") from None
    try:
        yield resp
    finally:
        resp.close()


# oslo.utils' GPTInspector matches any sector 0 with the boot signature 0x55AA: a GPT's
# protective MBR and a plain MBR alike, both named "gpt". Partition type 0xEE marks the
# protective entry of a GPT (the same test its check_mbr_partitions makes).
_MBR_ENTRIES = 446
_GPT_PROTECTIVE = 0xEE


def _partition_table(found: fi.FileInspector) -> str | None:
    """Oslo's "gpt" verdict named as what it is, a GPT or an MBR partition table; else None."""
    if not isinstance(found, fi.GPTInspector):
        return None
    mbr = bytes(found.region("mbr").data)
    types = {mbr[_MBR_ENTRIES + 16 * i + 4] for i in range(4)}
    return "GPT partition table" if _GPT_PROTECTIVE in types else "MBR partition table"


def _describe(found: fi.FileInspector) -> str:
    return _partition_table(found) or str(found.NAME)


def _inspector_verdict(wrapper: fi.InspectWrapper, declared: str) -> fi.FileInspector:
    """The inspector's one verdict, which must be the declared format or, for raw, a
    partition table that passes its check; oslo's safety checks of it must pass."""
    try:
        found = wrapper.format
    except fi.ImageFormatError as e:
        matches = wrapper.formats or []
        if len(matches) > 1:  # one header may hide another: never choose between them
            names = ", ".join(sorted(_describe(m) for m in matches))
            raise ImageRejected(f"the image matches more than one format ({names})") from None
        raise ImageRejected(f"format inspection refused the image: {e}") from None
    if found is None:  # pragma: no cover - the stream is finished, a decision exists
        raise ImageRejected("format inspection reached no decision")
    table = _partition_table(found)
    # A raw disk with a partition table is raw (most raw cloud images are); as Ironic
    # does, accept it for a raw declaration, once oslo's check of the table passes.
    if declared == "raw" and table is not None:
        what = f"the image's {table} failed its safety check"
    elif declared == found.NAME:
        what = f"the image failed the {declared} safety checks"
    else:
        raise ImageRejected(
            f"the image is declared {declared} but its content is {_describe(found)}"
        )
    try:
        found.safety_check()
    except fi.SafetyCheckFailed as e:
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(e.failures.items()))
        if table == "MBR partition table":
            reasons = reasons.replace("GPT MBR", "MBR")  # oslo's messages call every MBR GPT
        raise ImageRejected(f"{what} ({reasons})") from None
    except fi.ImageFormatError as e:
        raise ImageRejected(f"the image cannot be checked as {declared}: {e}") from None
    return found


def stream_into(
    image_id: str,
    image: ImageConfig,
    fd: int,
    *,
    max_virtual_size: int,
    progress: Progress | None = None,
) -> Checked:
    """Stream the image into `fd`, checking as it goes; retried for transient failures."""
    delay = 0.5
    deadline = Deadline(image)
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            return _stream_once(image, fd, max_virtual_size, progress, deadline)
        except FetchFailed as e:
            out_of_time = deadline.remaining() <= delay
            if (
                out_of_time
                or not e.retry
                or attempt == HTTP_ATTEMPTS
                or image.location.startswith(("file:", "rbd:"))
            ):
                if out_of_time and deadline.why not in str(e):
                    raise FetchFailed(
                        f"{image.location}: {deadline.why} (last attempt: {e})"
                    ) from None
                raise
            log.warning(
                "image.fetch.retry", image=image_id, error=str(e), attempt=attempt, delay=delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")  # pragma: no cover


class _Hasher:
    """sha256 on a thread of its own, so hashing overlaps the transfer and the writes.

    hashlib drops the GIL while it digests a large buffer, so on a host with a spare CPU
    the 0.8 s that sha256 costs per GiB here disappears behind the network. Chunks are
    immutable bytes handed over through a short queue, which bounds the memory held.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        """Stop the thread (also on an error: the thread never outlives the fetch)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_once(
    image: ImageConfig,
    fd: int,
    max_virtual_size: int,
    progress: Progress | None,
    deadline: Deadline,
) -> Checked:
    declared = image.format.value
    total = 0
    size_checked = False
    with _Hasher() as digest, open_location(image.location, image, deadline) as src:
        bounded = _DeadlineReader(src, deadline, image.location)
        wrapper = fi.InspectWrapper(cast(IO[bytes], bounded), expected_format=declared)
        # A second inspector of the declared format, to see its header as soon as it is in.
        kind = fi.get_inspector(declared) if declared != "raw" else None
        mine = kind() if kind is not None else None
        while True:
            chunk = _next_chunk(wrapper, declared, image.location)
            if not chunk:
                break
            total += len(chunk)
            if total > image.size:
                raise ImageRejected(
                    f"the image is larger than the {image.size} bytes the catalog declares"
                )
            digest.update(chunk)
            _write_sparse(fd, chunk)
            if progress is not None:
                progress.update(len(chunk))
            if mine is not None and not size_checked:
                size_checked = _header_checked(mine, chunk, declared, max_virtual_size)
        wrapper.close()
    if total != image.size:
        raise FetchFailed(
            f"{image.location}: got {total} bytes, the catalog declares {image.size} "
            "(a truncated transfer?)"
        )
    sha = digest.hexdigest()
    if sha != image.sha256:
        raise ImageRejected(f"sha256 mismatch: the catalog declares {image.sha256}, got {sha}")
    found = _inspector_verdict(wrapper, declared)
    virtual = total if declared == "raw" else int(found.virtual_size)
    if virtual > max_virtual_size:
        raise ImageRejected(
            f"the image's virtual size {format_size(virtual)} is larger than the disk "
            f"({format_size(max_virtual_size)})"
        )
    os.ftruncate(fd, total)  # the length, where the image ends in skipped zeros
    os.fsync(fd)
    return Checked(sha, total, declared, virtual)


def _next_chunk(wrapper: Any, declared: str, location: str) -> bytes:
    """The next chunk through the format inspector, its failures said as a rejection (not
    the declared format) or a failed fetch (the transfer)."""
    try:
        chunk: bytes = wrapper.read(CHUNK)
    except fi.ImageFormatError as e:
        raise ImageRejected(f"the image is not {declared}: {e}") from None
    except FetchFailed:  # past the deadline
        raise
    except (OSError, TimeoutError) as e:
        raise FetchFailed(f"{location}: transfer failed: {e}") from None
    except Exception as e:  # the inspector of the declared format choked on it
        raise ImageRejected(f"the image is not a valid {declared}: {e}") from None
    return chunk


def _header_checked(mine: Any, chunk: bytes, declared: str, max_virtual_size: int) -> bool:
    """Feed `chunk` to the declared format's own inspector: True once it is done with
    (the header is in and its virtual size fits, or it choked: the wrapper's verdict
    judges that); an oversized image is refused before the rest is read."""
    try:
        mine.eat_chunk(chunk)
    except Exception:  # judged by the wrapper's verdict
        return True
    if not (mine.complete and mine.format_match):
        return False
    if declared != "raw" and mine.virtual_size > max_virtual_size:
        raise ImageRejected(
            f"the image's virtual size {format_size(mine.virtual_size)} is larger "
            f"than the disk ({format_size(max_virtual_size)})"
        )
    return True


def _write_sparse(fd: int, data: bytes) -> None:
    """Write a chunk, or skip it if it is all zeros: the cached image stays sparse (disk
    images are mostly empty), and what is not written is neither stored nor synced."""
    # Compared with a block of zeros of the same length: a memcmp, where counting the
    # zero bytes took 0.6 s per GiB.
    if data == (_ZEROS if len(data) == CHUNK else bytes(len(data))):
        os.lseek(fd, len(data), os.SEEK_CUR)
        return
    _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def limited(argv: Sequence[str]) -> list[str]:
    """Run a command under the qemu-img CPU and address-space limits."""
    return ["prlimit", f"--as={QEMU_IMG_MEMORY}", f"--cpu={QEMU_IMG_CPU_SECONDS}", "--", *argv]


def run_limited(
    argv: Sequence[str],
    *,
    fds: Sequence[int] = (),
    what: str,
    cleanup: Callable[[], None] | None = None,
) -> str:
    """Run a command on an untrusted image under the limits; a failure refuses the image."""
    res = execute(limited(argv), fds, what)
    if res.returncode != 0:
        if cleanup is not None:
            cleanup()
        if res.returncode < 0:
            raise ImageRejected(
                f"{what}: qemu-img was killed by signal {-res.returncode} "
                "(over its CPU or memory limit)"
            )
        raise ImageRejected(f"{what}: {last_line(res)}")
    return res.stdout


def qemu_img_agrees(path: str, declared: str, checked: Checked, fds: Sequence[int] = ()) -> None:
    """`qemu-img info -f DECLARED` must see the declared format, no backing, no data file."""
    out = run_limited(
        info_argv(declared, path),
        fds=fds,
        what="qemu-img info",
    )
    info: dict[str, Any] = json.loads(out)
    if info.get("format") != declared:
        raise ImageRejected(f"qemu-img reads the image as {info.get('format')}, not {declared}")
    if "backing-filename" in info or "full-backing-filename" in info:
        raise ImageRejected("qemu-img reports a backing file")
    data = info.get("format-specific", {}).get("data", {})
    if isinstance(data, dict) and data.get("data-file"):
        raise ImageRejected("qemu-img reports an external data file")
    if int(info.get("virtual-size", -1)) != checked.virtual_size:
        raise ImageRejected(
            f"qemu-img reports virtual size {info.get('virtual-size')}, the inspector "
            f"{checked.virtual_size}"
        )


def check_local_raw(fd: int, what: str) -> str:
    """Read a local file declared raw through the format inspector, as a fetched image is
    read; refuse content that is another format. Returns its sha256."""
    digest = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as src:
        src.seek(0)
        wrapper = fi.InspectWrapper(src, expected_format="raw")
        while True:
            try:
                chunk = wrapper.read(CHUNK)
            except fi.ImageFormatError as e:
                raise ImageRejected(f"{what} is not raw: {e}") from None
            if not chunk:
                break
            digest.update(chunk)
        wrapper.close()
    try:
        _inspector_verdict(wrapper, "raw")
    except ImageRejected as e:
        raise ImageRejected(f"{what}: {e}") from None
    return digest.hexdigest()
