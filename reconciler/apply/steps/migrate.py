"""Moving a disk to another pool, backend or format without losing it (the `migrate` action).

The disk's record holds both locations while it moves (`DiskRecord.migration`), and every
step is written down before it is taken:

  record: migration `copying` (durable) -> copy made empty -> data copied (qemu-img convert
  with both formats named, or the target driver's own path) -> copy made durable ->
  compared (qemu-img compare, both formats named; a raw file and its raw copy, both files
  of this host, byte for byte in this process) -> record: migration `switched` (durable)
  -> same pool: the old volume renamed away (Retain) or replaced by the copy in one
  rename; another pool: the record written at the new location -> old volume removed
  (Delete) or released (Retain) -> old record removed.

So a SIGKILL anywhere leaves, for the next run, either `copying` (the old volume is the
disk; the partial copy is removed and made again, or removed for good where the manifest
went back) or `switched` (the copy is the disk; what is left of the old one is finished).
Window by window (the fault points' names in brackets):
  - [record.migrating], [volume.copied], [volume.verified]: `copying`; the copy absent,
    partial, or whole but not known to be durable and equal: it is removed and made again.
  - [record.switched], same pool: the copy under its temporary name; the old volume is
    renamed away or replaced next time ([volume.retained]: the old one kept under its
    retained name, the copy not yet at the disk's name; [volume.switched]: the copy at the
    disk's name) and the record written `ready` ([record.ready]).
  - [record.switched], another pool: the record at the new location is written next time
    ([record.moved], durable), then the old volume removed (Delete) and the old record
    removed ([record.deleted]); between those two records name the disk, the old one
    `switched` and pointing at the new one, so nothing is claimed twice.
  - A failed copy or compare (not a crash) is rolled back at once: the copy removed, the
    migration forgotten ([record.ready]).
Never both lost (the old volume goes only after the switch is durable), never both claimed
(one record names both until the old one is gone). The old disk's cache entry stays in its
record (`backing`) until the old volume is gone, so `cache gc` cannot take it from under
the copy or the old disk.

Checks, under the disk's lock (and, to another pool, the old volume's too): a migration
begins only from a `ready` record, never shrinks, and never over a volume at the copy's
name that has no record; before the old volume is copied (also when an earlier run began
the migration), renamed away or replaced by the copy, or removed, libvirt is asked that no
defined domain uses it (check_unused); a record already at the new location must be this
disk's, or nothing is finished.

A disk whose encryption changes, or an encrypted disk that moves, is migrated as its
keying says (model/keying.py; decided in `_begin` and recorded in the migration with the
copy's encryption, a new secret's UUID among it, before anything else): `keep` copies the
LUKS volume's header and ciphertext as raw bytes (the plain path above, over header +
size); `new`, `rekey` and `decrypt` read the disk (with its old key from its pool's key
source) and write the copy (under a new key) through drivers/flows/keyed.py. Their
order: record `copying` (the new secret's UUID) -> key stored [key.stored] -> secret
defined [secret.defined] -> copy -> `switched` -> old volume gone -> old secret undefined
[secret.undefined] -> old stored key deleted [key.deleted] -> record moved or ready. A
rollback removes the copy, then its new secret and stored key, then the migration.

Nothing here knows a backend: the drivers say how qemu-img reaches a volume (qemu_image)
or copy by their own means (native_copy); see drivers/api.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from reconciler.apply.preconditions import StalePlan
from reconciler.apply.steps import snapshot
from reconciler.apply.steps.context import Held, StepContext, StepResult, moved
from reconciler.drivers.api import (
    Access,
    Encrypts,
    ManagingDriver,
    QemuImage,
    VolumeExists,
    check_unused,
    encrypts_of,
)
from reconciler.drivers.flows.copy import FileSource, files_equal, raw_copy, scratch
from reconciler.drivers.flows.keyed import OLD_ID, file_image, keyed_view
from reconciler.drivers.flows.qemuimg import (
    QEMU_FORMAT,
    compare_argv,
    convert_argv,
    create_argv,
    encrypted_create_argv,
    run_create,
)
from reconciler.drivers.host import keys
from reconciler.drivers.host.keys import Secrets
from reconciler.drivers.host.run import execute, last_line
from reconciler.drivers.host.run import run as run_command
from reconciler.model import keying
from reconciler.model.errors import ReconcileError
from reconciler.model.keying import Keying
from reconciler.model.naming import migration_name, retained_name
from reconciler.model.plan import Action
from reconciler.model.record import (
    MIGRATING_SCHEMA_VERSION,
    RECORD_SCHEMA_VERSION,
    DiskRecord,
    Encryption,
    Migration,
    MigrationPhase,
    RecordKind,
    RecordState,
)
from reconciler.schema.common import Backend, DiskFormat
from reconciler.util import faults, progress
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class CopyDiffers(ReconcileError):
    """The copy does not read back equal to the original: it is removed, nothing switched."""


def run(ctx: StepContext, h: Held) -> StepResult:
    """A `migrate` action; to another pool, the old volume is locked too (after the new
    location's, which the executor holds), and its record read again under that lock."""
    a, rec, rec_old = h.action, h.rec, h.rec_old
    migrator = Migrator(ctx)
    if a.replaces is None or not moved(a):
        if rec is None:
            raise ReconcileError(f"{a.pool}/{a.volume} has no record; nothing to migrate")
        return "done", migrator.run(a, rec)
    if rec_old is None:
        return "skipped", "already migrated (the old location has no record)"
    with ctx.lock(a.replaces):
        fresh = ctx.records.get(*a.replaces)
        if fresh is None or fresh.generation != rec_old.generation:
            raise StalePlan("the disk's record changed while waiting for its lock")
        return "done", migrator.run(a, fresh)


class Migrator:
    """One disk's migration, carried on from whatever step an earlier run reached."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.records = ctx.records
        self.driver = ctx.driver
        # Keys at hand while one copy is made and compared (secret UUID -> key), never
        # longer: a private secret cannot be read back, so a new key is kept here from
        # its definition to the comparison.
        self._held: dict[str, bytes] = {}

    def run(self, a: Action, rec: DiskRecord) -> str:
        if rec.migration is None:  # a move begins: never of a disk with snapshots
            snapshot.refuse_if_snapshotted(self.ctx, rec, "moving")
        """Carry `rec` (the disk's record at its old location) to where `a` says, from
        whatever step an earlier run reached; returns a message for the report."""
        assert a.spec is not None
        spec = dict(a.spec)
        src = self.driver(rec.pool)
        checked = False  # whether no domain was found using the old volume just now
        if rec.migration is None:
            if spec == rec.spec:
                return "already in the desired layout"
            rec = self._begin(a, rec, spec, src)
            checked = True
        mig = rec.migration
        assert mig is not None
        if mig.phase is MigrationPhase.COPYING:
            if (mig.target(), mig.spec) != ((a.pool, a.volume), spec):
                rec = self._abandon(rec, mig)
                if spec == rec.spec:
                    return "the interrupted migration was rolled back; its copy is removed"
                raise ReconcileError(
                    "the manifest asks for another layout than the interrupted migration's; "
                    "its copy is removed, run again to migrate"
                )
            if not checked:  # a migration an earlier run began
                self._check_unused(src, rec)
            try:
                self._copy(src, rec, mig)
            except KeyboardInterrupt:
                raise  # the record stays `copying`: the next run makes the copy again
            except BaseException:
                self._abandon(rec, mig, quiet=True)
                raise
            rec = self.records.change(
                rec, migration=mig.model_copy(update={"phase": MigrationPhase.SWITCHED})
            )
            faults.point("record.switched")
            src.keep_record_copy(rec)
        return self._finish(rec)

    # -- the steps --------------------------------------------------------------------

    def _begin(
        self, a: Action, rec: DiskRecord, spec: dict[str, Any], src: ManagingDriver
    ) -> DiskRecord:
        if rec.state is not RecordState.READY:
            raise ReconcileError(f"{rec.pool}/{rec.volume} is {rec.state}, not ready; not migrated")
        self._check_unused(src, rec)
        same_pool = a.pool == rec.pool
        size = int(spec["size"])
        if size < rec.virtual_size:
            raise ReconcileError(f"refusing to shrink {rec.volume} while migrating it")
        gen = rec.generation + 1
        retain = spec.get("deletionPolicy") == "Retain"
        dst = self.driver(a.pool)
        keyed = keying.decide(rec.spec, spec, same_keys(src, dst))
        self._check_keying(rec, keyed, retain, src)
        enc: Encryption | None = None
        if keyed is Keying.KEEP:
            enc = rec.encryption
        elif keying.makes_new_key(keyed):
            enc = keys.new_encryption(spec)  # a new secret's UUID, recorded first
        mig = Migration(
            pool=a.pool,
            volume=migration_name(a.volume) if same_pool else a.volume,
            final_volume=a.volume,
            backend=Backend(spec["backend"]),
            format=DiskFormat(spec["format"]),
            virtual_size=size,
            spec=spec,
            phase=MigrationPhase.COPYING,
            retained_as=retained_name(rec.volume, gen) if same_pool and retain else None,
            preallocation=a.preallocation,
            keying=keyed,
            encryption=enc,
        )
        if dst.volume_exists(mig.volume):
            raise VolumeExists(
                f"volume {mig.volume} exists in pool {a.pool} without a record; it is left "
                "untouched and the disk is not migrated"
            )
        rec = self.records.change(rec, migration=mig, schema_version=MIGRATING_SCHEMA_VERSION)
        faults.point("record.migrating")
        src.keep_record_copy(rec)
        return rec

    def _check_unused(self, src: ManagingDriver, rec: DiskRecord) -> None:
        check_unused(src, rec.volume, "migrating")

    def _check_keying(
        self, rec: DiskRecord, keyed: Keying | None, retain: bool, src: ManagingDriver
    ) -> None:
        """What the planner refuses of a keyed migration, refused again before anything is
        recorded (a saved plan, a config changed since)."""
        if rec.encryption is not None and retain:
            raise ReconcileError(
                f"{rec.pool}/{rec.volume}: deletionPolicy Retain would keep the old encrypted "
                "volume, whose key no record would name; not migrated"
            )
        if keying.needs_old_key(keyed) and encrypts_of(src).secrets().source is None:
            raise ReconcileError(
                f"{rec.pool}/{rec.volume}: the copy reads the disk with its key; "
                f"{keying.key_source_needed(rec.pool)}; not migrated"
            )

    def _copy(self, src: ManagingDriver, rec: DiskRecord, mig: Migration) -> None:
        """The copy, as the migration's keying says (model/keying.py)."""
        try:
            self._copy_as_keyed(src, rec, mig)
        finally:
            self._held.clear()

    def _copy_as_keyed(self, src: ManagingDriver, rec: DiskRecord, mig: Migration) -> None:
        if mig.keying is None:
            self._copy_plain(src, rec, mig)
        elif mig.keying is Keying.KEEP:
            # Header and ciphertext are the volume's bytes: copied and compared as a raw
            # volume of header + size; the secret stays as it is, no key is read.
            header = _header(rec.encryption) or 0
            view = rec.model_copy(
                update={"virtual_size": rec.virtual_size + header, "encryption": None}
            )
            into = mig.model_copy(
                update={
                    "virtual_size": mig.virtual_size + header,
                    "encryption": None,
                    "keying": None,
                }
            )
            self._copy_plain(src, view, into)
        else:
            self._copy_keyed(src, rec, mig)

    def _copy_plain(self, src: ManagingDriver, rec: DiskRecord, mig: Migration) -> None:
        dst = self.driver(mig.pool)
        dst.delete_volume(mig.volume)  # a partial copy an interrupted run left (ours)
        dst.prepare_copy(mig.volume, mig.backend, mig.format, mig.virtual_size, mig.preallocation)
        what = f"migrate {rec.pool}/{rec.volume} to {mig.pool}/{mig.volume}"
        if not dst.native_copy(src, rec, mig):
            with (
                src.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s,
                dst.qemu_image(mig.volume, mig.format, None, write=True) as t,
                progress.task(f"convert to {mig.pool}/{mig.volume}", rec.virtual_size),
            ):
                run_command(
                    # -W: out-of-order writes (the target is ours alone); -S 4k keeps
                    # runs of zeros unallocated; -n: into the volume the driver made. A
                    # preallocated copy reads as zeros: told so, qemu-img writes no zeros,
                    # which it would otherwise write by unmapping what was allocated.
                    convert_argv(
                        s.format,
                        t.format,
                        s.filename,
                        t.filename,
                        out_of_order=True,
                        target_is_zero=mig.preallocation is not None,
                    ),
                    fds=s.fds + t.fds,
                    what=what,
                )
        faults.point("volume.copied")
        if _host_files(src, rec, dst, mig):
            self._compare_files(src, rec, dst, mig, what)
        else:
            self._compare_images(src, rec, dst, mig, what)
        faults.point("volume.verified")

    def _compare_images(
        self, src: ManagingDriver, rec: DiskRecord, dst: ManagingDriver, mig: Migration, what: str
    ) -> None:
        """The copy compared with the original by qemu-img compare, both formats named."""
        with (
            ThreadPoolExecutor(1, thread_name_prefix="sync") as syncing,
            src.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s,
            dst.qemu_image(mig.volume, mig.format, None, write=False) as t,
            progress.task(f"verify {mig.pool}/{mig.volume}", rec.virtual_size),
        ):
            # The copy is made durable while it is compared (both only read it); both end
            # before the switch. Without -s a larger copy (a migration that also grows)
            # must read zeros past the original's end. 0: equal; 1: differs; else: failed.
            synced = syncing.submit(dst.finish_copy, mig.volume)
            res = execute(
                compare_argv(s.format, t.format, s.filename, t.filename),
                s.fds + t.fds,
                f"verify {what}",
            )
            synced.result()
        if res.returncode == 1:
            raise CopyDiffers(f"{what}: the copy differs from the original; nothing is switched")
        if res.returncode != 0:
            raise ReconcileError(f"verify {what}: qemu-img compare failed: {last_line(res)}")

    def _compare_files(
        self, src: ManagingDriver, rec: DiskRecord, dst: ManagingDriver, mig: Migration, what: str
    ) -> None:
        """A raw file copied to a raw file of this host: compared in this process
        (flows/copy.py files_equal: what qemu-img compare -f raw -F raw judges, without
        its process: 20 copies of 16 MiB spent more starting qemu-img than comparing)."""
        with (
            ThreadPoolExecutor(1, thread_name_prefix="sync") as syncing,
            src.reader(rec.volume) as s,
            dst.reader(mig.volume) as t,
            progress.task(f"verify {mig.pool}/{mig.volume}", rec.virtual_size) as comparing,
        ):
            # As above: made durable while it is compared; a larger copy reads zeros past
            # the original's end.
            synced = syncing.submit(dst.finish_copy, mig.volume)
            try:
                if s.fd is None or t.fd is None:
                    raise ReconcileError(f"verify {what}: a side is not a file of this host")
                equal = files_equal(s, t, comparing)
            finally:
                synced.result()
        if not equal:
            raise CopyDiffers(f"{what}: the copy differs from the original; nothing is switched")

    def _copy_keyed(self, src: ManagingDriver, rec: DiskRecord, mig: Migration) -> None:
        """new, rekey, decrypt: the disk read (with its old key, from its pool's key
        source) and written (under the new key, stored and defined first) into an unnamed
        local file by qemu-img, that file's bytes copied into the new volume, then the
        copy compared with the original, both opened with their keys."""
        dst = self.driver(mig.pool)
        dst.delete_volume(mig.volume)  # a partial copy an interrupted run left (ours)
        what = f"migrate {rec.pool}/{rec.volume} to {mig.pool}/{mig.volume}"
        with ExitStack() as stack:
            objects: list[str] = []
            key_fds: list[int] = []
            if keying.needs_old_key(mig.keying):
                assert rec.encryption is not None
                source = encrypts_of(src).secrets().source
                if source is None:
                    raise ReconcileError(
                        f"{what}: {keying.key_source_needed(rec.pool)}; nothing is copied"
                    )
                old = source.get(rec.encryption.secret)
                self._held[rec.encryption.secret] = old
                argv, fd = stack.enter_context(keys.key_object(old, OLD_ID))
                objects += argv
                key_fds.append(fd)
            enc = mig.encryption
            if keying.makes_new_key(mig.keying):
                assert enc is not None
                argv, fd = stack.enter_context(
                    keys.key_object(self._new_key(dst, mig), keys.SECRET_ID)
                )
                objects += argv
                key_fds.append(fd)
            made = stack.enter_context(scratch())
            self._make_scratch(made, mig, objects, tuple(key_fds), what)
            with src.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s:
                s_ = _opened(s, rec.encryption, rec.format, OLD_ID)
                t = file_image(_qemu_format(mig), made)
                t_ = _opened(t, enc, mig.format, keys.SECRET_ID)
                argv = convert_argv(s_.format, t_.format, s_.filename, t_.filename)
                argv[2:2] = objects
                with progress.task(f"convert to {mig.pool}/{mig.volume}", rec.virtual_size):
                    run_command(argv, fds=(*key_fds, *s_.fds, made), what=what)
            size = os.fstat(made).st_size
            raw_prealloc = mig.preallocation if mig.format is DiskFormat.RAW else None
            # The volume holds the image's bytes as they are (a LUKS volume, a qcow2).
            dst.prepare_copy(mig.volume, mig.backend, DiskFormat.RAW, size, raw_prealloc)
            with dst.writer(mig.volume) as sink:
                raw_copy(FileSource(made, f"{what}: its local copy"), sink)
        faults.point("volume.copied")
        self._verify(src, rec, mig, what)
        faults.point("volume.verified")

    def _new_key(self, dst: ManagingDriver, mig: Migration) -> bytes:
        """A new key for the copy: stored in the target pool's key source (if any), then
        defined as the secret the migration recorded (a redo makes another: the partial
        copy it was for is gone)."""
        enc = mig.encryption
        assert enc is not None
        e = encrypts_of(dst)
        secrets_ = e.secrets()
        key = keys.new_key()
        if secrets_.source is not None:
            secrets_.source.put(enc.secret, key)
        # A usage of its own: the old disk's secret (same pool, same name) still holds
        # the volume's path until the old volume is gone, and libvirt keeps usages unique.
        usage = e.key_usage(f"{mig.final_volume}+key-{enc.secret}")
        self._held[enc.secret] = key
        secrets_.define(enc.secret, usage, mig.final_volume, key)
        return key

    def _make_scratch(
        self, fd: int, mig: Migration, objects: list[str], key_fds: tuple[int, ...], what: str
    ) -> None:
        """The copy's empty image in the local file at `fd`: encrypted under the new key,
        or plain."""
        path = f"/proc/self/fd/{fd}"
        enc = mig.encryption
        if enc is None:
            if mig.format is DiskFormat.RAW:
                os.ftruncate(fd, mig.virtual_size)
                return
            run_command(
                create_argv(QEMU_FORMAT[mig.format], path, mig.virtual_size),
                fds=(fd,),
                what=f"{what}: make its copy",
            )
            return
        secret = [w for w in objects if w.startswith(f"secret,id={keys.SECRET_ID},")]
        run_create(
            encrypted_create_argv(mig.format, ["--object", *secret], path, mig.virtual_size),
            fds=(*key_fds, fd),
            what=f"{what}: encrypt its copy",
        )
        if enc.header is not None and os.fstat(fd).st_size != enc.header + mig.virtual_size:
            raise ReconcileError(
                f"{what}: qemu-img made a LUKS volume of {os.fstat(fd).st_size} bytes, not "
                f"the recorded header {enc.header} + {mig.virtual_size}; nothing is switched"
            )

    def _verify(self, src: ManagingDriver, rec: DiskRecord, mig: Migration, what: str) -> None:
        """The copy compared with the original, each opened with the key the copy was
        read or written with (held since)."""
        dst = self.driver(mig.pool)
        with ExitStack() as stack:
            objects: list[str] = []
            fds: list[int] = []
            for enc, sid in ((rec.encryption, OLD_ID), (mig.encryption, keys.SECRET_ID)):
                if enc is None:
                    continue
                key = self._held.get(enc.secret)
                if key is None:
                    raise ReconcileError(f"{what}: the key of secret {enc.secret} is not at hand")
                argv, fd = stack.enter_context(keys.key_object(key, sid))
                objects += argv
                fds.append(fd)
            syncing = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sync"))
            s = stack.enter_context(
                src.qemu_image(rec.volume, rec.format, rec.backing, write=False)
            )
            t = stack.enter_context(dst.qemu_image(mig.volume, mig.format, None, write=False))
            s_ = _opened(s, rec.encryption, rec.format, OLD_ID)
            # A raw LUKS copy is compared up to the original's size: past what was
            # written, its payload reads as noise, not zeros.
            limit = rec.virtual_size if _header(mig.encryption) is not None else None
            t_ = _opened(t, mig.encryption, mig.format, keys.SECRET_ID, limit)
            stack.enter_context(progress.task(f"verify {mig.pool}/{mig.volume}", rec.virtual_size))
            synced = syncing.submit(dst.finish_copy, mig.volume)
            argv = compare_argv(s_.format, t_.format, s_.filename, t_.filename)
            argv[2:2] = objects
            res = execute(argv, (*fds, *s_.fds, *t_.fds), f"verify {what}")
            synced.result()
        if res.returncode == 1:
            raise CopyDiffers(f"{what}: the copy differs from the original; nothing is switched")
        if res.returncode != 0:
            raise ReconcileError(f"verify {what}: qemu-img compare failed: {last_line(res)}")

    def _abandon(self, rec: DiskRecord, mig: Migration, *, quiet: bool = False) -> DiskRecord:
        """Remove a copy that is not (yet) the disk and forget the migration."""
        try:
            self.driver(mig.pool).delete_volume(mig.volume)
            drop_new_key(self.driver(mig.pool), rec)  # the copy's key, after the copy
            rec = self.records.change(rec, migration=None, schema_version=RECORD_SCHEMA_VERSION)
            faults.point("record.ready")
            self.driver(rec.pool).keep_record_copy(rec)
        except Exception as e:
            if not quiet:
                raise
            log.warning("migrate.rollback_failed", volume=rec.volume, error=str(e))
        return rec

    def _finish(self, rec: DiskRecord) -> str:
        mig = rec.migration
        assert mig is not None and mig.phase is MigrationPhase.SWITCHED
        retain = mig.spec.get("deletionPolicy") == "Retain"
        layout: dict[str, Any] = {
            "backend": mig.backend,
            "format": mig.format,
            "virtual_size": mig.virtual_size,
            "spec": dict(mig.spec),
            "source": dict(mig.spec["source"]),
            "backing": None,  # a copy is standalone (flattened)
            "migration": None,
            "schema_version": RECORD_SCHEMA_VERSION,
            "state": RecordState.READY,
            "pending_size": None,
            "preallocation": mig.preallocation,  # the copy is the disk, as it was made
            "encryption": mig.encryption,
        }
        dst = self.driver(mig.pool)
        if mig.pool == rec.pool:
            if dst.volume_exists(mig.volume):  # not renamed yet
                if dst.volume_exists(rec.volume):
                    # The old volume is renamed away or replaced by the copy: a domain
                    # defined since the copy began would lose (or silently swap) its disk.
                    self._check_unused(dst, rec)
                if mig.retained_as is not None and dst.volume_exists(rec.volume):
                    dst.rename_volume(rec.volume, mig.retained_as, replace=False)
                    faults.point("volume.retained")
                # One rename: the name holds the old disk, then the copy, never neither.
                dst.rename_volume(mig.volume, mig.final_volume, replace=True)
                faults.point("volume.switched")
            self._erase_old_key(rec)  # the old volume is gone: replaced by the copy
            new = self.records.change(rec, durable=False, **layout)
            faults.point("record.ready")
            dst.keep_record_copy(new)
        else:
            src = self.driver(rec.pool)
            if not retain and src.volume_exists(rec.volume):
                # Before the record moves: a domain defined since the copy began keeps its
                # disk, and the disk stays where that domain's definition says it is.
                self._check_unused(src, rec)
            new = self.records.get(mig.pool, mig.final_volume) or self._claim_target(rec, layout)
            if new.instance != rec.instance or new.disk != rec.disk or new.spec != mig.spec:
                raise ReconcileError(
                    f"{mig.pool}/{mig.final_volume} has a record of another disk; the "
                    "migration is not finished"
                )
            dst.keep_record_copy(new)
            if not retain and src.volume_exists(rec.volume):
                src.delete_volume(rec.volume)
            self._erase_old_key(rec)
            self.records.remove(rec, durable=False)
            faults.point("record.deleted")
        if retain:
            kept = mig.retained_as or rec.volume
            return f"the old volume is kept as {rec.pool}/{kept} and no longer managed"
        return ""

    def _erase_old_key(self, rec: DiskRecord) -> None:
        """rekey, decrypt: once the old volume is gone, its secret undefined and its
        stored key deleted (crypto-erase), before the record that names them changes."""
        mig = rec.migration
        assert mig is not None
        if keying.erases_old_key(mig.keying) and rec.encryption is not None:
            _erase(encrypts_of(self.driver(rec.pool)).secrets(), rec.encryption.secret, rec.volume)

    def _claim_target(self, rec: DiskRecord, layout: dict[str, Any]) -> DiskRecord:
        """The record at the new location, written (durably, before the old volume goes)."""
        mig = rec.migration
        assert mig is not None
        new = DiskRecord(
            kind=RecordKind.DISK,
            pool=mig.pool,
            volume=mig.final_volume,
            instance=rec.instance,
            disk=rec.disk,
            generation=1,
            **layout,
        )
        self.records.add(new, None)
        faults.point("record.moved")
        return new


def drop_partial_copy(ctx: StepContext, rec: DiskRecord) -> None:
    """Before a migrating disk's record is removed (its instance deleted): remove its copy,
    unless a record at the copy's location already owns it."""
    mig = rec.migration
    if mig is None or ctx.records.get(*mig.target()) is not None:
        return
    ctx.driver(mig.pool).delete_volume(mig.volume)
    drop_new_key(ctx.driver(mig.pool), rec)


def same_keys(a: ManagingDriver, b: ManagingDriver) -> bool:
    """Whether two pools' disks' keys live in one libvirt daemon and one key source (what
    the planner reads from the config: model/keying.py's `keep` needs it)."""
    if not (isinstance(a, Encrypts) and isinstance(b, Encrypts)):
        return False
    sa, sb = a.secrets(), b.secrets()
    return sa.uri == sb.uri and _same_source(sa, sb)


def _same_source(a: Secrets, b: Secrets) -> bool:
    if a.source is None or b.source is None:
        return a.source is None and b.source is None
    return type(a.source) is type(b.source) and vars(a.source) == vars(b.source)


def _host_files(src: ManagingDriver, rec: DiskRecord, dst: ManagingDriver, mig: Migration) -> bool:
    """Whether the original and its copy are both raw files of this host, whose bytes are
    the disks' (no format to read, no backing): compared in this process."""
    return (
        src.access is Access.FILE
        and src.raw_readable(rec)
        and dst.access is Access.FILE
        and mig.format is DiskFormat.RAW
    )


def _header(enc: Encryption | None) -> int | None:
    return None if enc is None else enc.header


def _opened(
    img: QemuImage,
    enc: Encryption | None,
    fmt: DiskFormat,
    secret_id: str,
    limit: int | None = None,
) -> QemuImage:
    """`img` (a volume as its driver reaches it, or a local copy) as the disk it holds:
    with its key where it is encrypted."""
    return img if enc is None else keyed_view(img, fmt, secret_id, limit)


def _qemu_format(mig: Migration) -> str:
    """The qemu-img format of the copy's image under any encryption (a LUKS volume is
    raw bytes to its driver; a qcow2 holds its own encryption)."""
    return QEMU_FORMAT[mig.format]


def _erase(secrets_: Secrets, uuid: str, volume: str) -> None:
    """A key's secret undefined, then its stored key deleted (each gone already is fine)."""
    secrets_.undefine(uuid, volume)
    if secrets_.source is not None:
        secrets_.source.delete(uuid)


def drop_new_key(d: ManagingDriver, rec: DiskRecord) -> None:
    """The new key a migration that is forgotten made for its copy (the copy gone)."""
    mig = rec.migration
    if mig is None or not keying.makes_new_key(mig.keying) or mig.encryption is None:
        return
    _erase(encrypts_of(d).secrets(), mig.encryption.secret, mig.final_volume)
