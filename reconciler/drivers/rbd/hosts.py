"""The hosts sharing a RADOS record store: who has records, who is alive, and fencing
the ones that are gone.

- `hosts` names every host that has ever created a record (only `references()` reads it,
  to find every host's index). A host adds itself once per store object, keeping the
  first registration's time (an omap_cmp on the missing key).
- `heartbeats` has one key per process (`<host> <client address>`) renewed by `beat`;
  other hosts take a host's instances only once its newest beat is older than
  `ownership.heartbeatExpiry` (`gone`). Hosts sharing a pool are expected to keep their
  clocks in step (NTP); the expiry, minutes by default, dwarfs the skew NTP leaves. A
  process's key a day stale is removed by its host's next beat; an unreadable beat counts
  as none (expired).
- `fence` blocklists every address a gone host's beats name (`ceph osd blocklist add`)
  before anything of it is taken, so a process that was only paused fails its next
  operation instead of changing a disk it no longer owns.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from typing import Any

from reconciler.drivers.host.store import StoreError
from reconciler.drivers.rbd.layout import HEARTBEATS_OBJECT, HOSTS_OBJECT, Beat
from reconciler.drivers.rbd.namespace import Namespace, rados_module
from reconciler.schema.bounded import load_json

DEFAULT_HEARTBEAT_EXPIRY = 300.0  # ownership.heartbeatExpiry's default
BEAT_KEEP = 86400.0  # seconds a process's heartbeat key outlives its last beat
FENCE_FOR = (
    30 * 86400.0
)  # seconds a fenced client stays blocklisted (`ceph osd blocklist rm` ends it)


class Hosts:
    """This host among the others of one namespace: registration, heartbeats, fencing."""

    def __init__(self, ns: Namespace, host: str, cluster: Any, heartbeat_expiry: float) -> None:
        self.ns = ns
        self.host = host
        # The client, for fencing and this client's address; None: this store cannot fence
        # (and its heartbeats name no address).
        self.cluster = cluster
        self.heartbeat_expiry = heartbeat_expiry  # ownership.heartbeatExpiry
        self.registered = False
        self._lock = threading.Lock()

    def register(self, *, again: bool = False) -> None:
        """Name this host in `hosts` (once per store object), so others find its index."""
        with self._lock:
            if self.registered and not again:
                return
            rados = rados_module()
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
            with self.ns.errors(f"registering host {self.host}"), rados.WriteOpCtx() as op:
                # Keep the first registration's time: only set the key where it is missing.
                op.omap_cmp(self.host, "", rados.LIBRADOS_CMPXATTR_OP_EQ)
                self.ns.io.set_omap(op, (self.host,), (since,))
                try:
                    self.ns.io.operate_write_op(op, HOSTS_OBJECT)
                except rados.ObjectNotFound:
                    self._create_hosts(since)
                except rados.OSError as e:
                    if e.errno != errno.ECANCELED:  # already registered
                        raise
            self.registered = True

    def known(self) -> list[str]:
        """Every host that has ever created a record in this namespace, sorted."""
        return sorted(self.ns.omap_all(HOSTS_OBJECT))

    def _create_hosts(self, since: bytes) -> None:
        rados = rados_module()
        with rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            self.ns.io.set_omap(op, (self.host,), (since,))
            self.ns.io.operate_write_op(op, HOSTS_OBJECT)

    def beat(self, if_older_than: float | None = None) -> float | None:
        """Renew this process's heartbeat: other hosts take this host's instances only
        once its newest heartbeat is older than their `ownership.heartbeatExpiry`. Each
        process that writes beats under its own key (host and client address), so a host
        that is taken over can be fenced process by process (`fence`); this host's keys a
        day stale are removed as it beats. With `if_older_than`, nothing is written while
        this host's newest heartbeat is younger than that (a run that changes nothing).
        When it beat, returns the time it wrote."""
        rados = rados_module()
        at = time.time()
        beats = self.beats()
        if if_older_than is not None:
            newest = max((b.at for b in beats.values() if b.host == self.host), default=None)
            if newest is not None and at - newest < if_older_than:
                return None
        addr = self.addr()
        value = json.dumps({"at": at, "pid": os.getpid(), "boot": _boot_id(), "addr": addr})
        stale = [
            key
            for key, beat in beats.items()
            if beat.host == self.host and key != self._beat_key(addr) and at - beat.at > BEAT_KEEP
        ]
        with (
            self.ns.errors(f"renewing the heartbeat of host {self.host}"),
            rados.WriteOpCtx() as op,
        ):
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            self.ns.io.set_omap(op, (self._beat_key(addr),), (value.encode(),))
            if stale:
                self.ns.io.remove_omap_keys(op, tuple(stale))
            self.ns.io.operate_write_op(op, HEARTBEATS_OBJECT)
        return at

    def _beat_key(self, addr: str) -> str:
        return f"{self.host} {addr}"

    def addr(self) -> str:
        """This client's address (what `ceph osd blocklist` names); "" if unknown."""
        if self.cluster is None:
            return ""
        try:
            return str(self.cluster.get_addrs())
        except Exception:  # the binding's errors are not typed: an address is optional
            return ""

    def beats(self) -> dict[str, Beat]:
        out: dict[str, Beat] = {}
        for key, raw in self.ns.omap_all(HEARTBEATS_OBJECT).items():
            try:
                doc = load_json(raw, what="the heartbeat")
                out[key] = Beat(key.split(" ", 1)[0], float(doc["at"]), str(doc.get("addr", "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # unreadable: counts as no heartbeat (expired)
        return out

    def heartbeats(self) -> dict[str, float]:
        """Each host's newest heartbeat (time.time() of the host that wrote it). Hosts
        sharing a pool are expected to keep their clocks in step (NTP); the expiry,
        minutes by default, dwarfs the skew NTP leaves."""
        out: dict[str, float] = {}
        for beat in self.beats().values():
            out[beat.host] = max(out.get(beat.host, 0.0), beat.at)
        return out

    def fence(self, host: str) -> list[str]:
        """Make the cluster refuse every operation of `host`'s reconcilers (each address
        its heartbeats name) with `ceph osd blocklist add`, before its instances are taken:
        a process that was only paused then fails its next image or record operation
        instead of changing a disk it no longer owns. The addresses blocklisted."""
        if self.cluster is None:
            raise StoreError(
                f"{self.ns.where}: cannot fence host {host}: this store has no cluster handle"
            )
        addrs = sorted({b.addr for b in self.beats().values() if b.host == host and b.addr})
        for addr in addrs:
            cmd = {
                "prefix": "osd blocklist",
                "blocklistop": "add",
                "addr": addr,
                "expire": FENCE_FOR,
            }
            ret, _, err = self.cluster.mon_command(json.dumps(cmd), b"")
            if ret != 0:
                raise StoreError(
                    f"{self.ns.where}: cannot fence host {host} ({addr}): `ceph osd blocklist "
                    f"add` failed ({ret}: {err}); the client needs the mon cap `profile rbd`. "
                    "Its instances are not taken"
                )
        return addrs

    def gone(self, host: str) -> bool:
        beat = self.heartbeats().get(host)
        return beat is None or time.time() - beat >= self.heartbeat_expiry


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
