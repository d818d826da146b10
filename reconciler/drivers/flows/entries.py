"""A cache entry's record and the flows that make and use an entry, the same in every pool:
what each driver's image cache writes before, after and while it uses an entry (invariant
2: the record before the volume), the one way an image is fetched and checked before a
driver stores its bytes, and the one way a disk is made from an entry (`_use_entry`: the
entry held shared while used, made again and used again, up to four tries, if it went
meanwhile). A driver says only where the bytes go and how a disk is made of an entry
(`Cache`, which a driver holds: composition, no hooks to override).

Order of a make and what a crash between its steps leaves (each found by the next run):
record `creating` -> the driver's fill (bytes into the entry; a partial entry is removed
by `begin` next time) -> record `ready` (lazily durable) -> the entry's record copy."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from reconciler.drivers.host.store import ConflictError, RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import image_entry_name, template_entry_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults, progress
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
    """Fetch `image_id` into `fd` with every check of drivers/ingest/check.py (digest, size,
    the declared format under limits) and `qemu-img info -f DECLARED` agreeing."""
    # Imported here: oslo.utils takes a quarter of a second to import, which every run
    # that fetches nothing (the common, converged case) should not pay.
    from reconciler.drivers.flows.qemuimg import fd_path
    from reconciler.drivers.ingest.check import qemu_img_agrees
    from reconciler.drivers.ingest.images import stream_into

    with progress.task(f"fetch {image_id}", image.size) as fetching:
        checked = stream_into(
            image_id, image, fd, max_virtual_size=max_virtual_size, progress=fetching
        )
    faults.point("cache.image.fetched")
    qemu_img_agrees(fd_path(fd), image.format.value, checked, fds=(fd,))
    return checked


class EntryGone(Exception):
    """Raised by a use of a cache entry that found it gone (its volume, or its record
    changed meanwhile): the entry is made again and used again."""


Use = Callable[[DiskRecord, str, DiskRecord], None]  # make disk (record) of entry (name, record)


class EntryPool(Protocol):
    """What the cache flows need of the pool driver that holds the Cache."""

    name: str

    @property
    def images(self) -> Mapping[str, ImageConfig]: ...

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]: ...

    def volume_exists(self, volume: str) -> bool: ...

    def keep_record_copy(self, rec: DiskRecord) -> None: ...

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry, unless a ready one exists."""
        ...

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        """Make the template cache entry unless a ready one exists."""
        ...


def entry_for(images: Mapping[str, ImageConfig], spec: Mapping[str, Any]) -> str | None:
    """The cache entry a disk made to `spec` is made from (none for blank disks)."""
    src = spec["source"]
    if "snapshot" in src:
        return None  # a restore is a copy of its snapshot (whose record names its backing)
    if "image" in src:
        image = images.get(src["image"])
        if image is None:
            raise ReconcileError(f"image {src['image']!r} is not in the config's catalog")
        return image_entry_name(src["image"], image.sha256)
    if src["template"] == "blank":
        return None
    return template_entry_name(src["template"], int(spec["size"]), src.get("label"))


class Cache:
    """A pool's image cache, the same flows in every pool: making an entry (under its
    lock, its `creating` record, then the driver's `fill`, then `ready`; on any failure
    the half-made entry and its record are discarded and the error raised) and using one
    (`use`). The driver says which store holds its entries' records (`store`), how an
    entry (a leftover, or a half-made one with what its fill left) is removed (`remove`),
    and where an image is fetched to (`scratch`: a readable, writable descriptor)."""

    def __init__(
        self,
        pool: EntryPool,
        backend: Backend,
        *,
        store: Callable[[], RecordStore],
        remove: Callable[[str], None],
        scratch: Callable[[str], AbstractContextManager[int]],
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.store = store
        self.remove = remove
        self.scratch = scratch

    def from_image(self, rec: DiskRecord, image_id: str, use: Use) -> None:
        """Make disk `rec` of image `image_id`'s cache entry with `use` (see use())."""
        pool = self.pool
        entry = image_entry_name(image_id, pool.images[image_id].sha256)
        self.use(rec, entry, lambda: pool.ensure_image(entry, image_id, rec.virtual_size), use)

    def from_template(self, rec: DiskRecord, template: TemplateSource, use: Use) -> None:
        """Make disk `rec` of a template's cache entry (one per kind, size and label)."""
        kind = template.template.value
        entry = template_entry_name(kind, rec.virtual_size, template.label)
        self.use(
            rec,
            entry,
            lambda: self.pool.ensure_template(entry, kind, rec.virtual_size, template.label),
            use,
        )

    def use(self, rec: DiskRecord, entry: str, ensure: Callable[[], None], use: Use) -> None:
        """Make disk `rec` of cache entry `entry` with `use`, under the entry's lock held
        shared (so garbage collection, an import and a removal, all exclusive, wait). The
        first look is optimistic (the entry is usually there); if it is missing or
        unfinished, or `use` finds it gone (EntryGone), `ensure` makes it (exclusively) and
        it is looked at again, four times at most."""
        pool, store = self.pool, self.store()
        for attempt in range(4):
            if attempt:
                ensure()
            with pool.lock(entry, shared=True):
                cached = store.get(pool.name, entry)
                if cached is None or cached.state is not RecordState.READY:
                    continue
                if cached.virtual_size > rec.virtual_size:
                    raise ReconcileError(
                        f"{entry} holds {cached.virtual_size} bytes, more than the disk's "
                        f"{rec.virtual_size}"
                    )
                try:
                    use(rec, entry, cached)
                except EntryGone:
                    continue
                touch(store, cached)
                return
        raise ReconcileError(f"cache entry {entry} kept disappearing while in use")

    def _discard(self, entry: str, rec: DiskRecord) -> None:
        """Remove a half-made cache entry and its record after a failure."""
        try:
            self.remove(entry)
            self.store().delete(self.pool.name, entry, rec.generation)
        except Exception as e:  # keep the original error; the next run cleans up
            log.warning("cache.discard_failed", entry=entry, error=str(e))

    def make(self, entry: str, spec: dict[str, Any], size: int, fill: Callable[[], int]) -> bool:
        """Make `entry` unless a ready one exists; `fill` writes its bytes and returns its
        virtual size. True if this call made it."""
        pool = self.pool
        with pool.lock(entry):
            store = self.store()
            new = begin(
                store,
                pool.name,
                self.backend,
                entry,
                spec,
                size,
                exists=pool.volume_exists,
                remove=self.remove,
            )
            if new is None:
                return False
            try:
                virtual_size = fill()
            except BaseException:
                self._discard(entry, new)
                raise
            pool.keep_record_copy(finish(store, new, virtual_size))
            return True

    def make_image(
        self,
        entry: str,
        image_id: str,
        disk_size: int,
        store: Callable[[int, Checked], None],
        *,
        filled: str | None = None,
    ) -> None:
        """Fetch, check and keep image `image_id` as raw cache entry `entry` unless a ready
        one exists: `scratch` gives the file it is fetched into, `store` puts the checked
        bytes into the entry (converting them to raw when the image is not); `filled`
        names the fault point passed once the scratch file is gone."""
        image = self.pool.images[image_id]
        spec: dict[str, Any] = {
            "image": image_id,
            "sha256": image.sha256,
            "format": image.format.value,
            "size": image.size,
        }

        made: list[Checked] = []

        def fill() -> int:
            with self.scratch(entry) as fd:
                made.append(fetch_checked(image_id, image, fd, disk_size))
                store(fd, made[0])
            if filled is not None:
                faults.point(filled)
            return made[0].virtual_size

        if self.make(entry, spec, max(image.size, 512), fill):
            log.info(
                "cache.image.stored",
                pool=self.pool.name,
                entry=entry,
                image=image_id,
                bytes=made[0].size,
                virtual_size=made[0].virtual_size,
            )

    def make_template(
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

        self.make(entry, spec, size, made)
