"""Leases on RADOS objects: the locks every reconciler sharing a Ceph pool sees.

A lock named N is the cls_lock lock `reconciler` on object `lock.<sha256(N), 32 hex>` in
the records namespace. Each hold has a cookie of its own naming host, process, boot and a
counter (`host/pid/boot/n`), so two threads of one process exclude each other exactly as
two hosts do (the OSD refuses a second exclusive locker whatever its client). A hold is a
lease: it is taken with a duration and renewed (flag MUST_RENEW) every third of it by one
thread per LeaseLocks while held, so a holder that dies, hangs or loses the cluster stops
renewing and its lock expires; the OSD frees it a little after the duration (notes,
section 4: duration + 1.4-1.9 s). A renewal that fails (the lease was lost) is logged;
the records' compare-and-swap still fences whatever the holder writes afterwards.

A lock held by a process of this host and boot that no longer exists is broken at once
(cls_lock break_lock), instead of waiting for its lease: a SIGKILLed run's locks do not hold
up the next run. Other hosts' dead holders expire with their lease.

A lock that stays busy past `wait` seconds raises LockBusy: the step is requeued (the next
run or the loop's backoff tries again), it is not a failure of the disk. The lock object
is left in place after an unlock (an empty object) unless the holder says the thing it
protects is gone, then it is removed while still held exclusively, so no other holder's
lock goes with it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from reconciler.drivers.rbd.outage import Outage
from reconciler.model.errors import ReconcileError
from reconciler.util.logs import get_logger

log = get_logger(__name__)

LOCK_NAME = "reconciler"
LOCK_TAG = "reconciler"
LIBRADOS_LOCK_FLAG_MUST_RENEW = 2  # librados.h; the rados module has no constant for it
DEFAULT_DURATION = 15.0  # seconds a lease lasts unless renewed
DEFAULT_WAIT = 120.0  # seconds to wait for a busy lock before requeueing the step


class LockBusy(ReconcileError):
    """Another reconciler holds the lock: the step is retried later, it did not fail."""


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "noboot"


def lock_object(name: str) -> str:
    return f"lock.{hashlib.sha256(name.encode()).hexdigest()[:32]}"


class LeaseLocks:
    """Leases on objects of `ioctx` (its namespace already set), renewed while held."""

    def __init__(
        self,
        ioctx: Any,
        where: str,
        host: str,
        *,
        duration: float = DEFAULT_DURATION,
        wait: float = DEFAULT_WAIT,
        outage: Outage | None = None,
    ) -> None:
        self._io = ioctx
        self.outage = outage
        self.where = where
        self.host = host
        self.duration = duration
        self.wait = wait
        self._prefix = f"{host}/{os.getpid()}/{_boot_id()}"
        self._count = itertools.count(1)
        self._held: dict[str, tuple[str, bool, str]] = {}  # cookie -> (object, shared, desc)
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._closed = threading.Event()

    def _cookie(self) -> str:
        return f"{self._prefix}/{next(self._count)}"

    @contextlib.contextmanager
    def hold(
        self, name: str, *, shared: bool = False, wait: float | None = None
    ) -> Iterator[LeaseHold]:
        """Hold lock `name` (exclusive, or shared with other shared holders), waiting up
        to `wait` seconds (default: the instance's) for it to be free."""
        import rados

        oid = lock_object(name)
        cookie = self._cookie()
        desc = f"reconcile on host {self.host}, pid {os.getpid()}: {name}"
        wait = self.wait if wait is None else wait
        deadline = time.monotonic() + wait
        delay = 0.005
        while True:
            if self.outage is not None:
                self.outage.check()
            try:
                if shared:
                    self._io.lock_shared(oid, LOCK_NAME, cookie, LOCK_TAG, desc, self.duration, 0)
                else:
                    self._io.lock_exclusive(oid, LOCK_NAME, cookie, desc, self.duration, 0)
                break
            except (rados.ObjectBusy, rados.ObjectExists):
                if self._break_dead(oid):
                    continue
                if time.monotonic() + delay > deadline:
                    raise LockBusy(
                        f"{name} in {self.where} stayed locked by another reconciler for "
                        f"{wait:g} s; it is tried again later"
                    ) from None
                time.sleep(delay)  # polling a remote lock: there is nothing to wait on
                delay = min(delay * 2, 0.2)
            except rados.TimedOut:
                msg = (
                    f"{self.where}: locking {name} timed out (the client's op timeout); check "
                    "the cluster's OSDs (`ceph -s`), then run again"
                )
                if self.outage is not None:
                    self.outage.note(msg)
                raise ReconcileError(msg) from None
            except rados.Error as e:
                raise ReconcileError(f"{self.where}: cannot lock {name}: {e}") from None
        with self._held_lock:
            self._held[cookie] = (oid, shared, desc)
            self._start_renewer()
        h = LeaseHold()
        try:
            yield h
        finally:
            with self._held_lock:
                self._held.pop(cookie, None)
            if self.outage is not None and self.outage.cause() is not None:
                # The cluster just timed out: a release would wait the op timeout again
                # (and fail). The lease expires by itself after `duration` seconds.
                log.info("lock.release_skipped", lock=name, where=self.where)
            else:
                self._release(name, oid, cookie, remove=h.remove and not shared)

    def _release(self, name: str, oid: str, cookie: str, *, remove: bool) -> None:
        import rados

        try:
            if remove:
                # Still held exclusively: nobody else's lock is on the object.
                self._io.remove_object(oid)
            else:
                self._io.unlock(oid, LOCK_NAME, cookie)
        except rados.ObjectNotFound:
            pass  # the lease expired and someone else took and released it
        except rados.Error as e:
            # Not noted as an outage's cause: a release is cleanup, and a step's or run's
            # error must name what failed first in the work, not this.
            log.warning("lock.release_failed", lock=name, where=self.where, error=str(e))

    def lockers(self, oid: str) -> list[tuple[int, str]]:
        """(client gid, cookie) of each holder of the lock on `oid` (cls_lock get_info,
        decoded by hand: the bindings have no list_lockers for objects)."""
        try:
            _, reply = self._io.execute(
                oid, "lock", "get_info", _enc_start(_enc_str(LOCK_NAME)), 65536
            )
        except Exception:
            return []
        return _decode_lockers(bytes(reply))

    def _break_dead(self, oid: str) -> bool:
        """Break locks held by a process of this host and boot that is gone (its lease
        would expire anyway; on this host we know at once). True if one was broken."""
        broke = False
        for gid, cookie in self.lockers(oid):
            parts = cookie.split("/")
            if len(parts) != 4 or f"{parts[0]}/" != f"{self.host}/" or parts[2] != _boot_id():
                continue
            try:
                pid = int(parts[1])
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            payload = _enc_start(
                _enc_str(LOCK_NAME) + struct.pack("<Bq", 8, gid) + _enc_str(cookie)
            )
            try:
                self._io.execute(oid, "lock", "break_lock", payload)
            except Exception as e:
                log.info("lock.break_failed", oid=oid, cookie=cookie, error=str(e))
                continue
            log.warning("lock.broken", where=self.where, cookie=cookie, why="its process is gone")
            broke = True
        return broke

    @contextlib.contextmanager
    def attempt(self, name: str) -> Iterator[LeaseHold | None]:
        """Hold `name` exclusively if it is free right now, else yield None."""
        try:
            cm = self.hold(name, wait=0)
            h = cm.__enter__()
        except LockBusy:
            yield None
            return
        try:
            yield h
        finally:
            cm.__exit__(None, None, None)

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew, name="lease-renew", daemon=True)
            self._renewer.start()

    def _renew(self) -> None:
        import rados

        while not self._closed.wait(self.duration / 3):
            with self._held_lock:
                held = dict(self._held)
            if not held:
                with self._held_lock:
                    if not self._held:
                        self._renewer = None
                        return
                continue
            for cookie, (oid, shared, desc) in held.items():
                try:
                    if shared:
                        self._io.lock_shared(
                            oid,
                            LOCK_NAME,
                            cookie,
                            LOCK_TAG,
                            desc,
                            self.duration,
                            LIBRADOS_LOCK_FLAG_MUST_RENEW,
                        )
                    else:
                        self._io.lock_exclusive(
                            oid,
                            LOCK_NAME,
                            cookie,
                            desc,
                            self.duration,
                            LIBRADOS_LOCK_FLAG_MUST_RENEW,
                        )
                except rados.Error as e:
                    with self._held_lock:
                        released = cookie not in self._held
                    if released:
                        # Released (and its object maybe removed) while this renewal was
                        # on its way: nothing was lost.
                        continue
                    log.error("lock.lease_lost", cookie=cookie, where=self.where, error=str(e))

    def close(self) -> None:
        """Stop renewing. The renewer wakes at once and ends before this returns (a closed
        session leaves no thread behind: a process forks its manifest workers only when it
        has none), unless the cluster did not answer: a renewal under way then is not
        waited for (the lease expires by itself; a run that met an outage ends within
        opTimeout, bench/rbd_faults.py), nor one for over a second otherwise."""
        self._closed.set()
        renewer = self._renewer
        if renewer is None or renewer is threading.current_thread():
            return
        if self.outage is not None and self.outage.cause() is not None:
            return  # its renewal may wait out the op timeout: the lease expires by itself
        renewer.join(timeout=1.0)


def _enc_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def _enc_start(payload: bytes) -> bytes:
    return struct.pack("<BBI", 1, 1, len(payload)) + payload


def _decode_lockers(reply: bytes) -> list[tuple[int, str]]:
    """cls_lock_get_info_reply: header, u32 count, then per locker: header, u8 entity
    type, s64 gid, string cookie, locker_info (header + its length, skipped)."""
    out: list[tuple[int, str]] = []
    try:
        pos = 6
        (count,) = struct.unpack_from("<I", reply, pos)
        pos += 4
        for _ in range(count):
            pos += 6
            _, gid = struct.unpack_from("<Bq", reply, pos)
            pos += 9
            (n,) = struct.unpack_from("<I", reply, pos)
            pos += 4
            cookie = reply[pos : pos + n].decode(errors="replace")
            pos += n
            _, _, info_len = struct.unpack_from("<BBI", reply, pos)
            pos += 6 + info_len
            out.append((gid, cookie))
    except struct.error:
        return out
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseHold:
    """One hold; set `remove` when what the lock protects is gone, so the lock object goes."""

    __slots__ = ("remove",)

    def __init__(self) -> None:
        self.remove = False
