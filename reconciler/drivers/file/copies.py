"""Each file volume's copy of its record, kept in the file's extended attributes by the host
for `records rebuild`; read from the attributes only, never from a volume's bytes.

Invariants: the copy is the file's extended attribute `trusted.reconciler.record`, which
only root can write; anyone who can write the file (its guest's qemu process, a tenant)
can set `user.*` attributes, so a `user.*` copy is trusted only when sealed with the host's
key (drivers/host/copykey.py; file systems without the trusted namespace, such as NFS), and
an apply replaces an unsealed one. Writing the trusted copy removes a `user.*` one. The
store stays the truth: a copy that cannot be written only costs `records rebuild` that
volume (logged, never fatal); a renewal writes, under the volume's lock, the store's
record as it is then, so a step under way is never overwritten by an older copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from reconciler.drivers.api import NoCopy, RecordCopies
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows.qemuimg import open_volume
from reconciler.drivers.host import copykey
from reconciler.drivers.host.store import RecordStore, SqliteRecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.record import DiskRecord
from reconciler.schema.bounded import check_json
from reconciler.util.logs import get_logger

log = get_logger(__name__)

# Each volume's copy of its record, kept by the host beside the volume for `records
# rebuild`: in the trusted namespace, which only root can read or write; where a file
# system has none (NFS), in the user namespace sealed with the host's key (copykey.py).
# A user.* copy that is not sealed with it can have been set by anyone who can write the
# file (a qemu process, a tenant), so it is never trusted.
TRUSTED_XATTR = "trusted.reconciler.record"
RECORD_XATTR = "user.reconciler.record"


class XattrCopies:
    """The record copies of one file pool's volumes."""

    def __init__(self, vols: PoolDir, store: RecordStore | None) -> None:
        self.vols = vols
        self.name = vols.name
        self.store = store

    def keep(self, rec: DiskRecord) -> None:
        """Write the volume's copy of its record: `trusted.*`, else a sealed `user.*`.

        The store stays the truth; a copy that cannot be written only costs `records
        rebuild` that volume, so it is logged, not fatal. Writing the trusted copy removes
        a `user.*` one (an old unsealed copy, or anyone's forgery).
        """
        data = rec.model_dump_json().encode()
        try:
            with open_volume(self.vols.path(rec.volume), write=False) as fd:
                try:
                    os.setxattr(fd, TRUSTED_XATTR, data)
                except OSError as e:
                    if not copykey.no_trusted_namespace(e):
                        raise
                    self._keep_sealed(fd, rec, data)
                    return
                with contextlib.suppress(OSError):  # ENODATA: there is none
                    os.removexattr(fd, RECORD_XATTR)
        except (OSError, ReconcileError) as e:
            log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))

    def _keep_sealed(self, fd: int, rec: DiskRecord, data: bytes) -> None:
        key_dir = self._key_dir()
        key = None if key_dir is None else copykey.load(key_dir, create=True)
        if key is None:
            with contextlib.suppress(OSError):
                os.removexattr(fd, RECORD_XATTR)
            log.warning(
                "record_copy.none",
                pool=self.name,
                volume=rec.volume,
                error="no trusted.* namespace here and no key to seal a user.* copy",
            )
            return
        os.setxattr(fd, RECORD_XATTR, copykey.seal(key, data))

    def _key_dir(self) -> Path | None:
        """Where the key sealing user.* copies lives: beside the host's database."""
        return self.store.path.parent if isinstance(self.store, SqliteRecordStore) else None

    def _trusted_copy(self, path: str) -> tuple[bytes | None, str]:
        """The trusted copy a file carries (bytes), or None and why there is none."""
        try:
            return os.getxattr(path, TRUSTED_XATTR, follow_symlinks=False), ""
        except OSError as e:
            if e.errno != errno.ENODATA and not copykey.no_trusted_namespace(e):
                raise
        try:
            raw = os.getxattr(path, RECORD_XATTR, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None, "no record copy"
            raise
        try:
            key_dir = self._key_dir()
            key = None if key_dir is None else copykey.load(key_dir, create=False)
        except copykey.CopyKeyError as e:
            return None, f"its copy in {RECORD_XATTR} cannot be checked: {e}"
        data = copykey.unseal(key, raw)
        if data is None:
            why = "no key to check it" if key is None else "not sealed with this host's key"
            return None, (
                f"its copy in {RECORD_XATTR} is not trusted ({why}; anyone who can write "
                "the file can set that attribute)"
            )
        return data, ""

    def read_all(self) -> RecordCopies:
        """The trusted records the pool's volumes carry, and why the others carry none
        (read from the files' attributes only: never from a volume's bytes)."""
        names = sorted(n for n in self.vols.list_volumes() if not n.startswith(TEMP_PREFIX))
        return RecordCopies.read(self.name, names, self._copy_of)

    def _copy_of(self, name: str) -> DiskRecord | None:
        path = os.path.join(self.vols.info().path, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise NoCopy("not a regular file")
            raw, why = self._trusted_copy(path)
        except FileNotFoundError:
            return None  # removed while we looked
        except OSError as e:
            raise NoCopy(e.strerror or str(e)) from None
        if raw is None:
            raise NoCopy(why)
        try:
            return DiskRecord.model_validate_json(check_json(raw, what="the copy"))
        except ValueError as e:
            raise NoCopy(f"its record copy is unreadable ({str(e).splitlines()[0]})") from None

    def renew(self, store: RecordStore, records: Sequence[DiskRecord]) -> int:
        """Write the trusted copy of each record whose volume lacks it (an older
        reconciler's unsealed user.* copy, or one set by someone else); how many. The
        caller has checked that `store` manages the pool: another's copies are its."""
        root = self.vols.info().path
        renewed = 0
        for rec in records:
            path = os.path.join(root, rec.volume)
            if self._copy_is_current(path, rec):
                continue
            # Under the volume's lock and from the store again: a step under way (the
            # loop's workers) writes its own copy, never overwritten by an older one.
            try:
                with self.vols.locks().hold(rec.volume):
                    fresh = store.get(self.name, rec.volume)
                    if fresh is not None and not self._copy_is_current(path, fresh):
                        self.keep(fresh)
                        renewed += 1
            except (OSError, ReconcileError) as e:  # left for the next run: never fatal
                log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))
        return renewed

    def _copy_is_current(self, path: str, rec: DiskRecord) -> bool:
        """Whether the file carries `rec`'s trusted copy and nothing untrusted beside it
        (True also for a volume that cannot be read: the plan reports it)."""
        try:
            raw, _ = self._trusted_copy(path)
            has_user = RECORD_XATTR in os.listxattr(path, follow_symlinks=False)
        except OSError:
            return True
        if raw != rec.model_dump_json().encode():
            return False
        return not (has_user and self._trusted_namespace(path))

    def _trusted_namespace(self, path: str) -> bool:
        try:
            os.getxattr(path, TRUSTED_XATTR, follow_symlinks=False)
        except OSError as e:
            return not copykey.no_trusted_namespace(e)
        return True
