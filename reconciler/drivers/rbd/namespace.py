"""The record store's namespace of a Ceph pool: every RADOS call the store makes goes
through Namespace, which bounds it and names what went wrong.

Every wait is bounded: the client made by `client_conf`'s options (RadosRecordStore.connect)
sets `rados_osd_op_timeout` and `client_mount_timeout`, reads of many objects keep at most
IN_FLIGHT aio reads in flight and never leave one behind, and every object read is cut at
MAX_RECORD bytes. Every rados exception becomes a StoreError naming the pool, namespace
and what was being done (the cluster or the namespace cannot be used: the run stops); a
timeout is also noted in the shared Outage (drivers/rbd/outage.py), after which calls fail
at once for op_timeout seconds. `refused` tells a guarded write that failed its guard (the
caller's ConflictError) from any other fault.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from reconciler.drivers.host.store import StoreError
from reconciler.drivers.rbd.layout import FORMAT, MAX_RECORD, STORE_OBJECT
from reconciler.drivers.rbd.outage import CephUnreachable, Outage
from reconciler.model.errors import RecordError

DEFAULT_OP_TIMEOUT = 30.0  # seconds; rados_osd_op_timeout and client_mount_timeout
IN_FLIGHT = 128  # aio reads at once: enough to hide the round trip; 8 MiB of buffers at most
_OMAP_PAGE = 1000


def rados_module() -> Any:
    import rados  # Debian's python3-rados: a system dependency, imported only when used

    return rados


def client_conf(op_timeout: float = DEFAULT_OP_TIMEOUT) -> dict[str, str]:
    """Options every client of the store gets: without them an op on a down OSD blocks
    forever and connect() to a down mon for 300 s (notes, section 6)."""
    if not (0 < op_timeout < math.inf):
        raise ValueError(f"op_timeout must be a finite number of seconds > 0, not {op_timeout}")
    t = f"{op_timeout:g}"
    return {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t}


class Namespace:
    """An Ioctx of the pool set to the store's namespace, and the operations on it."""

    def __init__(self, where: str, op_timeout: float, outage: Outage | None) -> None:
        self.where = where
        self.op_timeout = op_timeout  # for messages: the client's options bound the waits
        # Shared with the client's other users (the rbd driver): after a timeout, calls
        # fail at once naming it, for op_timeout seconds (drivers/rbd/outage.py).
        self.outage = outage
        self.io: Any = None

    def open(self, open_ioctx: Callable[[], Any], namespace: str) -> None:
        with self.errors("opening the pool"):
            self.io = open_ioctx()
        try:
            self.io.set_namespace(namespace)
        except BaseException:
            self.io.close()
            raise

    # -- the store object: the namespace's format, identity and shard count --------------

    def open_store(self, shards: int) -> tuple[str, int]:
        rados = rados_module()
        for _ in range(2):
            meta = self.omap(STORE_OBJECT, "format", "id", "shards")
            if meta is not None:
                break
            # Another host may create it first; then we read theirs.
            with self.errors("creating the store"), contextlib.suppress(rados.ObjectExists):
                self.create_exclusive(
                    STORE_OBJECT,
                    b"",
                    {"format": str(FORMAT), "id": str(uuid.uuid4()), "shards": str(shards)},
                )
        else:
            raise StoreError(f"{self.where}: object {STORE_OBJECT} vanished while opened")
        if meta.get("format") != str(FORMAT).encode():
            raise StoreError(
                f"{self.where}: object {STORE_OBJECT} has stored format "
                f"{meta.get('format')!r}, this reconciler knows {FORMAT}; use a reconciler "
                "that knows it"
            )
        try:
            return meta["id"].decode(), int(meta["shards"])
        except (KeyError, ValueError) as e:
            raise StoreError(f"{self.where}: object {STORE_OBJECT} is damaged ({e!r})") from None

    # -- faults ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        rados = rados_module()
        if self.outage is not None:
            try:
                self.outage.check()
            except CephUnreachable as e:
                raise StoreError(str(e)) from None
        try:
            yield
        except rados.Error as e:
            fault = self.fault(doing, e)
            if self.outage is not None and self._timed_out(e):
                self.outage.note(str(fault))
            raise fault from e

    @staticmethod
    def _timed_out(e: Exception) -> bool:
        code = getattr(e, "errno", None)
        return isinstance(e, rados_module().TimedOut) or code in (errno.ETIMEDOUT, -errno.ETIMEDOUT)

    def fault(self, doing: str, e: Exception) -> StoreError:
        rados = rados_module()
        code = getattr(e, "errno", None)
        if isinstance(e, rados.TimedOut) or code in (errno.ETIMEDOUT, -errno.ETIMEDOUT):
            why = (
                f"timed out after {self.op_timeout:g} s (rados_osd_op_timeout); check the "
                "cluster's OSDs (`ceph -s`, `ceph osd stat`), then run again"
            )
        elif code in (errno.ESHUTDOWN, -errno.ESHUTDOWN):
            why = (
                f"refused: this client was fenced ({e}); another host took this host's "
                "instances over after its heartbeat expired (`ceph osd blocklist ls`). A new "
                "run is a new client and sees who owns each disk now"
            )
        elif isinstance(e, rados.PermissionError) or code in (errno.EPERM, errno.EACCES):
            why = f"permission denied ({e}); give the client rw caps on the pool and namespace"
        elif isinstance(e, rados.ObjectNotFound) and doing == "opening the pool":
            why = f"the pool does not exist ({e}); create it or fix the config"
        else:
            why = f"failed ({e}); run again, and check `ceph -s` if it fails again"
        return StoreError(f"{self.where}: {doing} {why}")

    def _aio_fault(self, doing: str, oid: str, ret: int) -> StoreError:
        """The error of an aio operation that returned `ret` (< 0); a timeout is noted in
        the outage, as `errors` notes a synchronous one."""
        err = OSError(-ret, f"{errno.errorcode.get(-ret, ret)} reading {oid}")
        fault = self.fault(doing, err)
        if self.outage is not None and -ret == errno.ETIMEDOUT:
            self.outage.note(str(fault))
        return fault

    # -- primitives -------------------------------------------------------------------------

    def omap(self, oid: str, *keys: str) -> dict[str, bytes] | None:
        """Values of `keys` in `oid`'s omap; None if the object does not exist."""
        rados = rados_module()
        with self.errors(f"reading {oid}"):
            try:
                with rados.ReadOpCtx() as rop:
                    it, _ = self.io.get_omap_vals_by_keys(rop, keys)
                    self.io.operate_read_op(rop, oid)
                    return dict(it)
            except rados.ObjectNotFound:
                return None

    def omap_all(self, oid: str) -> dict[str, bytes]:
        """All of `oid`'s omap, page by page ({} if the object does not exist)."""
        return self.omap_pages(oid, f"reading index {oid}") or {}

    def omap_pages(
        self, oid: str, doing: str, first: dict[str, bytes] | None = None
    ) -> dict[str, bytes] | None:
        """All of `oid`'s omap, page by page (after the `first` page, if it was read);
        None if the object does not exist."""
        rados = rados_module()
        out: dict[str, bytes] = dict(first or {})
        after = max(out) if out else ""
        while True:
            with self.errors(doing):
                try:
                    with rados.ReadOpCtx() as rop:
                        it, _ = self.io.get_omap_vals(rop, after, "", _OMAP_PAGE)
                        self.io.operate_read_op(rop, oid)
                        page = dict(it)
                except rados.ObjectNotFound:
                    return None
            out.update(page)
            if len(page) < _OMAP_PAGE:
                return out
            after = max(page)

    def omap_many(self, oids: list[str], doing: str) -> dict[str, dict[str, bytes]]:
        """All of each object's omap ({} for a missing object), the first page of every
        object in flight at once (one round trip instead of one per object: a host's
        index is 16 shards); an object with more than a page is read on page by page."""
        rados = rados_module()
        out: dict[str, dict[str, bytes]] = {}
        pending: list[tuple[str, Any, Any, Any]] = []  # (oid, op, iterator, completion)
        failed: tuple[str, int] | None = None
        try:
            for oid in oids:
                with self.errors(doing):
                    op = rados.ReadOpCtx()
                    op.__enter__()  # released in `finally`, after its completion
                    try:
                        it, _ = self.io.get_omap_vals(op, "", "", _OMAP_PAGE)
                        comp = self.io.operate_aio_read_op(op, oid)
                    except BaseException:
                        op.__exit__(None, None, None)
                        raise
                    pending.append((oid, op, it, comp))
        finally:
            for oid, op, it, comp in pending:  # never leave a read in flight behind us
                try:
                    comp.wait_for_complete()
                    ret = comp.get_return_value()
                    if ret == -errno.ENOENT:
                        out[oid] = {}
                    elif ret < 0:
                        failed = failed or (oid, ret)
                    else:
                        out[oid] = dict(it)
                finally:
                    op.__exit__(None, None, None)
        if failed is not None:
            raise self._aio_fault(doing, *failed)
        for oid, page in out.items():
            if len(page) >= _OMAP_PAGE:  # more than one page: the rest in order
                out[oid] = self.omap_pages(oid, doing, page) or {}
        return out

    def create_exclusive(self, oid: str, data: bytes, omap: dict[str, str]) -> None:
        rados = rados_module()
        with rados.WriteOpCtx() as op:  # outside `with` the op is unallocated: segfault
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            self.io.set_omap(op, tuple(omap), tuple(v.encode() for v in omap.values()))
            self.io.operate_write_op(op, oid)

    def read(self, oid: str) -> bytes | None:
        rados = rados_module()
        with self.errors(f"reading record {oid}"):
            try:
                data: bytes = self.io.read(oid, MAX_RECORD, 0)
            except rados.ObjectNotFound:
                return None
        self.check_size(oid, data)
        return data

    def check_size(self, oid: str, data: bytes) -> None:
        if len(data) >= MAX_RECORD:
            raise RecordError(
                f"record object {oid} in {self.where} is {MAX_RECORD} bytes or more, more than "
                "any record this reconciler writes: it was not written by this reconciler"
            )

    def read_many(self, oids: list[str]) -> dict[str, bytes | None]:
        """Each object's data (None: missing), IN_FLIGHT aio reads at a time."""
        got: dict[int, bytes] = {}
        lock = threading.Lock()

        def done(completion: Any, data: bytes) -> None:  # runs in a librados thread
            with lock:
                got[id(completion)] = data

        out: dict[str, bytes | None] = {}
        pending: deque[tuple[str, Any]] = deque()
        failed: tuple[str, int] | None = None

        def finish() -> None:
            nonlocal failed
            oid, comp = pending.popleft()
            comp.wait_for_complete_and_cb()  # the callback has run, too
            ret = comp.get_return_value()
            with lock:
                data = got.pop(id(comp), b"")
            if ret == -errno.ENOENT:
                out[oid] = None
            elif ret < 0:
                failed = failed or (oid, ret)
            else:
                out[oid] = data

        try:
            for oid in oids:
                if len(pending) >= IN_FLIGHT:
                    finish()
                with self.errors(f"reading record {oid}"):
                    pending.append((oid, self.io.aio_read(oid, MAX_RECORD, 0, done)))
        finally:
            while pending:  # never leave a read in flight behind us
                finish()
        if failed is not None:
            raise self._aio_fault(f"reading record {failed[0]}", *failed)
        for oid, data in out.items():
            if data is not None:
                self.check_size(oid, data)
        return out


def refused(e: StoreError) -> bool:
    """Whether a guarded write failed its guard (omap_cmp: ECANCELED; or no object)."""
    rados = rados_module()
    cause = e.__cause__
    if isinstance(cause, rados.ObjectNotFound):
        return True
    return isinstance(cause, rados.OSError) and cause.errno == errno.ECANCELED
