"""Checking a source image before it enters a cache: the declared format, sha256 and
size, and safety, all under limits (DESIGN invariant 3).

While an image streams (StreamChecks) its sha256 is computed on a thread of its own and
oslo.utils' format inspector reads it, so a qcow2 with a backing file or data-file,
unknown incompatible features, a VMDK whose extents are outside itself, content that
matches another format than the declared one (or more than one), more bytes than declared,
or a virtual size larger than the disk it is for, is refused, the last before more than
its header has been read. `qemu-img info` then runs with the declared format under CPU and
memory limits (`run_limited`, as Nova's nova/virt/images.py) and must agree. Nothing about
an image is ever taken from the image: format, sha256 and size are declared in the catalog
and only checked here. A partition table (GPT or MBR), which the inspector calls "gpt", is
raw content: it is accepted for a raw declaration once the inspector's own check of the
table passes, and refused for any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from oslo_utils.imageutils import format_inspector as fi

from reconciler.drivers.flows.qemuimg import info_argv
from reconciler.drivers.host.run import execute, last_line
from reconciler.drivers.ingest.fetch import FetchFailed
from reconciler.model.errors import ReconcileError
from reconciler.model.units import format_size
from reconciler.schema.config import ImageConfig

CHUNK = 1 << 20
# Limits for qemu-img on untrusted images, as Nova uses (nova/virt/images.py): 1 GiB of
# address space and 30 s of CPU. A run over them is killed and its output removed.
QEMU_IMG_MEMORY = 1 << 30
QEMU_IMG_CPU_SECONDS = 30


class ImageRejected(ReconcileError):
    """The image is not what the catalog declares, or is unsafe to use."""


@dataclass(frozen=True)
class Checked:
    """What the checks established about a fetched image."""

    sha256: str
    size: int
    format: str
    virtual_size: int


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


class StreamChecks:
    """The checks of one attempt at streaming an image from `src`, read chunk by chunk
    through `read`; `finish` gives what they established once the stream has ended."""

    def __init__(self, image: ImageConfig, max_virtual_size: int, src: IO[bytes]) -> None:
        self.image = image
        self.declared = image.format.value
        self.max_virtual_size = max_virtual_size
        self.total = 0
        self._digest = _Hasher()
        self._wrapper = fi.InspectWrapper(src, expected_format=self.declared)
        # A second inspector of the declared format, to see its header as soon as it is in.
        kind = fi.get_inspector(self.declared) if self.declared != "raw" else None
        self._mine = kind() if kind is not None else None
        self._size_checked = self._mine is None

    def __enter__(self) -> StreamChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._digest.close()

    def read(self) -> bytes:
        """The next chunk (b"" at the end), counted against the declared size and hashed."""
        declared = self.declared
        try:
            chunk = self._wrapper.read(CHUNK)
        except fi.ImageFormatError as e:
            raise ImageRejected(f"the image is not {declared}: {e}") from None
        except FetchFailed:  # past the deadline
            raise
        except (OSError, TimeoutError) as e:
            raise FetchFailed(f"{self.image.location}: transfer failed: {e}") from None
        except Exception as e:  # the inspector of the declared format choked on it
            raise ImageRejected(f"the image is not a valid {declared}: {e}") from None
        if not chunk:
            self._wrapper.close()
            return chunk
        self.total += len(chunk)
        if self.total > self.image.size:
            raise ImageRejected(
                f"the image is larger than the {self.image.size} bytes the catalog declares"
            )
        self._digest.update(chunk)
        return chunk

    def header(self, chunk: bytes) -> None:
        """Feed the declared format's own inspector until its header is in; then refuse an
        oversized image before the rest is read."""
        mine = self._mine
        if mine is None or self._size_checked:
            return
        try:
            mine.eat_chunk(chunk)
        except Exception:  # judged by the wrapper's verdict in finish()
            self._size_checked = True
            return
        if mine.complete and mine.format_match:
            if mine.virtual_size > self.max_virtual_size:
                raise ImageRejected(
                    f"the image's virtual size {format_size(mine.virtual_size)} is larger "
                    f"than the disk ({format_size(self.max_virtual_size)})"
                )
            self._size_checked = True

    def finish(self) -> Checked:
        """What the whole stream established: its size is the declared one, its sha256
        too, the inspector's verdict is the declared format and its virtual size fits."""
        image, total = self.image, self.total
        if total != image.size:
            raise FetchFailed(
                f"{image.location}: got {total} bytes, the catalog declares {image.size} "
                "(a truncated transfer?)"
            )
        sha = self._digest.hexdigest()
        if sha != image.sha256:
            raise ImageRejected(f"sha256 mismatch: the catalog declares {image.sha256}, got {sha}")
        found = _inspector_verdict(self._wrapper, self.declared)
        virtual = total if self.declared == "raw" else int(found.virtual_size)
        if virtual > self.max_virtual_size:
            raise ImageRejected(
                f"the image's virtual size {format_size(virtual)} is larger than the disk "
                f"({format_size(self.max_virtual_size)})"
            )
        return Checked(sha, total, self.declared, virtual)


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
