"""Taking a source image into a cache entry: streamed once from its location
(drivers/ingest/fetch.py, bounded in time and retried while that may help) into the
entry's file, checked as it streams (drivers/ingest/check.py: sha256, size, declared
format and safety, virtual size), written sparse, and synced before it is handed back.

DESIGN invariant 3: nothing about an image is taken from the image; a failed attempt
leaves a file the caller discards as after any failed fetch (flows/entries.py), and a
retry starts again from an empty file. A check's refusal is ImageRejected, never retried;
a fetch's failure FetchFailed, retried if another try may change it.
"""

from __future__ import annotations

import os
from typing import IO, cast

from reconciler.drivers.ingest.check import CHUNK, Checked, StreamChecks
from reconciler.drivers.ingest.fetch import (
    Deadline,
    DeadlineReader,
    open_location,
    with_retries,
)
from reconciler.schema.config import ImageConfig
from reconciler.util.logs import get_logger
from reconciler.util.progress import Task

log = get_logger(__name__)

_ZEROS = bytes(CHUNK)


def stream_into(
    image_id: str,
    image: ImageConfig,
    fd: int,
    *,
    max_virtual_size: int,
    progress: Task | None = None,
) -> Checked:
    """Stream the image into `fd`, checking as it goes; retried for transient failures."""

    def attempt(deadline: Deadline) -> Checked:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return _stream_once(image, fd, max_virtual_size, progress, deadline)

    return with_retries(image_id, image, attempt)


def _stream_once(
    image: ImageConfig,
    fd: int,
    max_virtual_size: int,
    progress: Task | None,
    deadline: Deadline,
) -> Checked:
    with open_location(image.location, image, deadline) as src:
        bounded = cast(IO[bytes], DeadlineReader(src, deadline, image.location))
        with StreamChecks(image, max_virtual_size, bounded) as checks:
            while chunk := checks.read():
                _write_sparse(fd, chunk)
                if progress is not None:
                    progress.advance(len(chunk))
                checks.header(chunk)
    checked = checks.finish()
    os.ftruncate(fd, checked.size)  # the length, where the image ends in skipped zeros
    os.fsync(fd)
    return checked


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
