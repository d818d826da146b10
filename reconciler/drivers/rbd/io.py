"""An rbd image's raw bytes as drivers/api.py's RawSource and RawSink (python-rbd, through
the pool's one client), and the unnamed local files (O_TMPFILE) the driver stages bytes in:
a fetch, a template's file system, a format's conversion to raw, a raw export of an image.

Invariants: a source is read as a disk reads the image (a clone's parent data included),
so a copy of a clone is flat; its extents are where RBD objects exist (whole objects, from
the object map where the image has one). A sink is a new image, reading as zeros, so only
data chunks are written (flows/copy.py) and the copy stays sparse; it is flushed when
finished. A scratch file has no name: a crash leaves nothing to sweep; the cost is local
space (TMPDIR, default /var/tmp) for the data of one image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy, scratch
from reconciler.drivers.rbd.cluster import Cluster


class ImageSource:
    """An open image's bytes as a RawSource: its data is where RBD objects exist (its
    parent's included; whole objects, from the object map where the image has one)."""

    fd: int | None = None

    def __init__(self, c: Cluster, img: Any, volume: str) -> None:
        self.c, self.img, self.volume = c, img, volume
        self.what = f"{c.name}/{volume}"
        with c.op(f"reading {volume}'s size"):
            self.size = int(img.size())

    def extents(self) -> Iterator[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def note(offset: int, length: int, exists: bool) -> int:
            if exists:
                if out and out[-1][1] == offset:
                    out[-1] = (out[-1][0], offset + length)
                else:
                    out.append((offset, offset + length))
            return 0

        with self.c.op(f"listing {self.volume}'s data"):
            self.img.diff_iterate(0, self.size, None, note, include_parent=True, whole_object=True)
        for start, end in out:
            if start < min(end, self.size):
                yield start, min(end, self.size)

    def read(self, at: int, n: int) -> bytes:
        with self.c.op(f"reading {self.volume}"):
            return bytes(self.img.read(at, n))


class ImageSink:
    """An open new image (reading as zeros) as a RawSink; flushed when finished."""

    fd: int | None = None
    zeroed = True

    def __init__(self, c: Cluster, img: Any, volume: str) -> None:
        self.c, self.img, self.volume = c, img, volume
        self.what = f"{c.name}/{volume}"
        with c.op(f"reading {volume}'s size"):
            self.size = int(img.size())

    def write(self, data: bytes, at: int) -> None:
        with self.c.op(f"writing {self.volume}"):
            self.img.write(data, at)

    def finish(self) -> None:
        with self.c.op(f"flushing {self.volume}"):
            self.img.flush()


@contextmanager
def reader(c: Cluster, volume: str, snapshot: str | None = None) -> Iterator[ImageSource]:
    """The image (at `snapshot`, if given) as a disk reads it (a clone's parent data
    included), all of it."""
    with c.image(volume, read_only=True, snapshot=snapshot) as img:
        yield ImageSource(c, img, volume)


@contextmanager
def writer(c: Cluster, volume: str) -> Iterator[ImageSink]:
    """A new image (reading as zeros), written with python-rbd, flushed at the end."""
    with c.image(volume) as img:
        yield ImageSink(c, img, volume)


def write_file(c: Cluster, fd: int, tmp: str, length: int) -> None:
    """Copy `length` bytes of a local file into image `tmp`, skipping zero chunks."""
    with writer(c, tmp) as dst:
        raw_copy(FileSource(fd, tmp, length), dst)


@contextmanager
def export(c: Cluster, volume: str, snapshot: str | None = None) -> Iterator[int]:
    """The image's bytes (at `snapshot`, if given; its parent's data included) in an
    unnamed local file (O_TMPFILE: a crash leaves nothing), sparse: only data chunks are
    written."""
    with scratch() as fd:
        with reader(c, volume, snapshot) as src:
            os.ftruncate(fd, src.size)
            raw_copy(src, FileSink(fd, f"a local export of {c.name}/{volume}"))
        yield fd
