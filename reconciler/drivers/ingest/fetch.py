"""Reading a source image from its location, bounded in time: http(s), file:// and
rbd:// of another Ceph cluster (drivers/ingest/images.py streams it into a cache entry,
drivers/ingest/check.py checks it as it streams).

A fetch is bounded in time (the config's `fetch` section, FetchConfig): one deadline for
all its attempts, connectTimeout + slack + declared size / minRate, checked before every
read, and no connect or read waits longer than connectTimeout; so a server that sends a
byte every few seconds, or accepts and never answers, fails in bounded time. A failure
another try may change (a connection refused or reset, HTTP 5xx, 408, 425, 429) is tried
again, HTTP_ATTEMPTS in all with doubling delays, while the deadline allows; a file:// or
rbd:// location, or any other refusal, is not. A file:// location is opened as every input
file is (schema/bounded.py: a regular file only, never blocking); an rbd:// one through a
client of that cluster whose every wait is bounded by RBD_TIMEOUT.
"""

from __future__ import annotations

import io
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlparse

from reconciler.model.errors import ReconcileError
from reconciler.schema.bounded import NotRead, open_stream
from reconciler.schema.config import ImageConfig
from reconciler.util.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

HTTP_ATTEMPTS = 4
MISSING_BINDINGS = (
    "Ceph's Python bindings are not importable ({e}): install Debian's python3-rbd (it "
    "brings python3-rados), and run reconcile with the system's Python, or from a venv "
    "made with `python3 -m venv --system-site-packages` so it sees them"
)


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


class DeadlineReader:
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


RBD_READ = 4 << 20  # bytes per read from a remote RBD snapshot (the default object size)
RBD_TIMEOUT = 30.0  # seconds any one Ceph operation of a fetch may take


class _RbdReader(io.RawIOBase):
    """A snapshot of an RBD image, read front to back (what a fetch needs)."""

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


def with_retries(image_id: str, image: ImageConfig, attempt: Callable[[Deadline], T]) -> T:
    """`attempt(deadline)` until it succeeds, it fails for good, or the fetch's deadline or
    its HTTP_ATTEMPTS are spent; transient failures (FetchFailed.retry) are tried again."""
    delay = 0.5
    deadline = Deadline(image)
    for n in range(1, HTTP_ATTEMPTS + 1):
        try:
            return attempt(deadline)
        except FetchFailed as e:
            out_of_time = deadline.remaining() <= delay
            if (
                out_of_time
                or not e.retry
                or n == HTTP_ATTEMPTS
                or image.location.startswith(("file:", "rbd:"))
            ):
                if out_of_time and deadline.why not in str(e):
                    raise FetchFailed(
                        f"{image.location}: {deadline.why} (last attempt: {e})"
                    ) from None
                raise
            log.warning("image.fetch.retry", image=image_id, error=str(e), attempt=n, delay=delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")  # pragma: no cover
