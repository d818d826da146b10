"""A cache entry's record and the flow that makes an entry, the same in every pool: what
each driver's image cache writes before, after and while it uses an entry (invariant 2:
the record before the volume), and the one way an image is fetched and checked before a
driver stores its bytes. A driver says only where the bytes go (`EntryCache`)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from reconciler.drivers.host.store import ConflictError, RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import image_entry_name, template_entry_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.util import faults
from reconciler.util.logs import get_logger

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked
    from reconciler.schema.config import ImageConfig

log = get_logger(__name__)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def begin(
    store: RecordStore,
    pool: str,
    backend: Backend,
    entry: str,
    spec: dict[str, Any],
    size: int,
    *,
    exists: Callable[[str], bool],
    remove: Callable[[str], None],
) -> DiskRecord | None:
    """Under the entry's lock: None if a ready entry exists, else its `creating` record
    (written) after removing, with `remove`, what an interrupted run left."""
    rec = store.get(pool, entry)
    present = exists(entry)
    if rec is not None and rec.state is RecordState.READY and present:
        return None
    if present:
        if rec is None:
            raise ReconcileError(
                f"{entry} exists in pool {pool} without a record; it is left alone "
                "and cannot be used until it is removed"
            )
        remove(entry)  # a partial entry from an interrupted run
    gen = rec.generation if rec is not None else None
    new = DiskRecord(
        kind=RecordKind.CACHE,
        backend=backend,
        pool=pool,
        volume=entry,
        instance="",
        disk="",
        format=DiskFormat.RAW,
        virtual_size=size,
        spec=spec,
        source=dict(spec),
        state=RecordState.CREATING,
        generation=(gen or 0) + 1,
    )
    store.put(new, gen)
    faults.point("cache.record.creating")
    return new


def touch(store: RecordStore, entry: DiskRecord) -> None:
    """Note that an entry was used (for `cache gc --min-age`), at most once a minute."""
    if entry.unused_for(datetime.datetime.now(datetime.UTC)) < 60:
        return
    with contextlib.suppress(ConflictError):  # someone else touched it just now
        store.put(
            entry.model_copy(update={"generation": entry.generation + 1, "last_used": now()}),
            entry.generation,
        )


def finish(store: RecordStore, rec: DiskRecord, virtual_size: int) -> DiskRecord:
    """The entry is made: its record `ready`, lazily durable (store.py)."""
    ready = rec.model_copy(
        update={
            "state": RecordState.READY,
            "generation": rec.generation + 1,
            "virtual_size": virtual_size,
            "last_used": now(),
        }
    )
    store.put(ready, rec.generation, durable=False)
    faults.point("cache.record.ready")
    return ready


def fetch_checked(image_id: str, image: ImageConfig, fd: int, max_virtual_size: int) -> Checked:
    """Fetch `image_id` into `fd` with every check of drivers/ingest/images.py (digest, size,
    the declared format under limits) and `qemu-img info -f DECLARED` agreeing."""
    # Imported here: oslo.utils takes a quarter of a second to import, which every run
    # that fetches nothing (the common, converged case) should not pay.
    from reconciler.drivers.flows.qemuimg import fd_path
    from reconciler.drivers.ingest.check import qemu_img_agrees
    from reconciler.drivers.ingest.images import Progress, stream_into

    progress = Progress(f"fetch {image_id}", image.size)
    try:
        checked = stream_into(
            image_id, image, fd, max_virtual_size=max_virtual_size, progress=progress
        )
    finally:
        progress.finish()
    faults.point("cache.image.fetched")
    qemu_img_agrees(fd_path(fd), image.format.value, checked, fds=(fd,))
    return checked


class EntryCache:
    """Making a cache entry, for a pool driver: under the entry's lock, its `creating`
    record, then the driver's `fill` (the bytes), then `ready`; on any failure the half-made
    entry and its record are discarded (`_discard`) and the error raised. A driver has
    `name`, `images`, `lock`, `volume_exists` and `keep_record_copy`, and says which store
    holds its entries' records and how a leftover entry is removed."""

    ENTRY_BACKEND: ClassVar[Backend]
    name: str
    images: Mapping[str, ImageConfig]

    def close(self) -> None:
        """Release what the driver opened for its pool (a Ceph client, its leases' renewer);
        a file or LVM pool holds nothing open. The session closes every driver."""

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` is made from (none for blank disks)."""
        src = spec["source"]
        if "image" in src:
            image = self.images.get(src["image"])
            if image is None:
                raise ReconcileError(f"image {src['image']!r} is not in the config's catalog")
            return image_entry_name(src["image"], image.sha256)
        if src["template"] == "blank":
            return None
        return template_entry_name(src["template"], int(spec["size"]), src.get("label"))

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        raise NotImplementedError

    def volume_exists(self, volume: str) -> bool:
        raise NotImplementedError

    def keep_record_copy(self, rec: DiskRecord) -> None:
        raise NotImplementedError

    def _discard(self, entry: str, rec: DiskRecord) -> None:
        """Remove a half-made cache entry and its record after a failure."""
        try:
            self._remove_entry(entry)
            self._entry_store().delete(self.name, entry, rec.generation)
        except Exception as e:  # keep the original error; the next run cleans up
            log.warning("cache.discard_failed", entry=entry, error=str(e))

    def _entry_store(self) -> RecordStore:
        raise NotImplementedError

    def _remove_entry(self, entry: str) -> None:
        raise NotImplementedError

    def _touch(self, entry: DiskRecord) -> None:
        touch(self._entry_store(), entry)

    def _make_entry(
        self, entry: str, spec: dict[str, Any], size: int, fill: Callable[[], int]
    ) -> bool:
        """Make `entry` unless a ready one exists; `fill` writes its bytes and returns its
        virtual size. True if this call made it."""
        with self.lock(entry):
            store = self._entry_store()
            new = begin(
                store,
                self.name,
                self.ENTRY_BACKEND,
                entry,
                spec,
                size,
                exists=self.volume_exists,
                remove=self._remove_entry,
            )
            if new is None:
                return False
            try:
                virtual_size = fill()
            except BaseException:
                self._discard(entry, new)
                raise
            self.keep_record_copy(finish(store, new, virtual_size))
            return True

    def _make_image_entry(
        self,
        entry: str,
        image_id: str,
        disk_size: int,
        store: Callable[[int, Checked], None],
        *,
        filled: str | None = None,
    ) -> None:
        """Fetch, check and keep image `image_id` as raw cache entry `entry` unless a ready
        one exists: `_image_scratch` gives the file it is fetched into, `store` puts the
        checked bytes into the entry (converting them to raw when the image is not);
        `filled` names the fault point passed once the scratch file is gone."""
        image = self.images[image_id]
        spec: dict[str, Any] = {
            "image": image_id,
            "sha256": image.sha256,
            "format": image.format.value,
            "size": image.size,
        }

        made: list[Checked] = []

        def fill() -> int:
            with self._image_scratch(entry) as fd:
                made.append(fetch_checked(image_id, image, fd, disk_size))
                store(fd, made[0])
            if filled is not None:
                faults.point(filled)
            return made[0].virtual_size

        if self._make_entry(entry, spec, max(image.size, 512), fill):
            log.info(
                "cache.image.stored",
                pool=self.name,
                entry=entry,
                image=image_id,
                bytes=made[0].size,
                virtual_size=made[0].virtual_size,
            )

    def _image_scratch(self, entry: str) -> AbstractContextManager[int]:
        """A file descriptor, readable and writable, to fetch an image for `entry` into."""
        raise NotImplementedError

    def _make_template_entry(
        self, entry: str, kind: str, size: int, label: str | None, fill: Callable[[], None]
    ) -> None:
        """Make template entry `entry` (of `kind`, `size` bytes, `label`) with `fill`,
        unless a ready one exists."""
        spec: dict[str, Any] = {"template": kind, "size": size}
        if label:
            spec["label"] = label

        def made() -> int:
            fill()
            return size

        self._make_entry(entry, spec, size, made)
