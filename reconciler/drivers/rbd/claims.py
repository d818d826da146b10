"""Instance claims: all of an instance's disks have one owner host.

Object `inst.<sha256 of instance>` (omap `host`, `instance`; drivers/rbd/layout.py),
created exclusively before a host's first record of the instance. Two hosts racing on one
instance each race per disk record too; without the claim each could win some of its
disks. A host takes the claim with a record (take), releases it after its records
(release), or takes it from a host that made it and then was gone (its heartbeat expired:
fenced first, drivers/rbd/hosts.py). Every change of a claim is one compare-and-swap on
its `host`; a claim that keeps changing under five tries is a ConflictError. Claims of
deleted instances stay (a few bytes each).

Crash windows (the order is the record store's, drivers/rbd/records.py): a take moves the
claim before the record, so a crash in between leaves a record the next run takes again;
a release moves the claim after the record, so a crash in between leaves the claim this
host's, and the host that takes the record takes the claim with it.
"""

from __future__ import annotations

from reconciler.drivers.host.store import RELEASED, ConflictError, StoreError
from reconciler.drivers.rbd.hosts import Hosts
from reconciler.drivers.rbd.layout import claim_object
from reconciler.drivers.rbd.namespace import Namespace, rados_module, refused


class Claims:
    """The instance claims of one namespace, as seen by this host (`hosts.host`)."""

    def __init__(self, ns: Namespace, hosts: Hosts) -> None:
        self.ns = ns
        self.hosts = hosts

    def owner(self, oid: str) -> str | None:
        """The host in claim object `oid` (None: there is no claim)."""
        got = self.ns.omap(oid, "host")
        if got is None:
            return None
        return got.get("host", b"").decode(errors="replace")

    def claim(self, instance: str) -> None:
        """Make this host the instance's claimant before its first record of it: made if
        missing, taken if released or if its host is gone (fenced first); ConflictError
        if another, live host has it."""
        rados = rados_module()
        oid = claim_object(instance)
        for _ in range(5):
            owner = self.owner(oid)
            if owner == self.hosts.host:
                return
            if owner is None:
                with self.ns.errors(f"claiming instance {instance}"):
                    try:
                        self.ns.create_exclusive(
                            oid, b"", {"host": self.hosts.host, "instance": instance}
                        )
                        return
                    except rados.ObjectExists:
                        continue  # another host claimed it first: read whose it is
            if owner == RELEASED or self.hosts.gone(owner or ""):
                if owner != RELEASED:
                    self.hosts.fence(owner or "")
                if self._cas(oid, owner or "", self.hosts.host):
                    return
                continue
            raise ConflictError(
                f"instance {instance} in {self.ns.where} is owned by host {owner}: host "
                f"{self.hosts.host} makes none of its disks until that host releases it"
            )
        raise ConflictError(f"instance {instance} in {self.ns.where}: its claim keeps changing")

    def claimants(self, instances: list[str]) -> dict[str, str]:
        """Who has claimed each of `instances` (left out: no claim yet). How a plan knows
        that a disk without a record yet belongs to an instance another host owns: its
        create would be refused (`claim`), so it is planned as owned elsewhere."""
        out: dict[str, str] = {}
        for instance in instances:
            owner = self.owner(claim_object(instance))
            if owner is not None:
                out[instance] = owner
        return out

    def _cas(self, oid: str, expect: str, new: str) -> bool:
        rados = rados_module()
        try:
            with self.ns.errors(f"handing claim {oid} to {new}"), rados.WriteOpCtx() as op:
                op.omap_cmp("host", expect, rados.LIBRADOS_CMPXATTR_OP_EQ)
                self.ns.io.set_omap(op, ("host",), (new.encode(),))
                self.ns.io.operate_write_op(op, oid)
        except StoreError as e:
            if refused(e):
                return False
            raise
        return True

    def move(self, instance: str, new: str, *, only_from: str | None) -> None:
        """Make `new` the instance's claimant (from whoever has it, or only from
        `only_from`); a missing claim is made."""
        rados = rados_module()
        oid = claim_object(instance)
        for _ in range(5):
            owner = self.owner(oid)
            if owner == new or (only_from is not None and owner not in (None, only_from)):
                return
            if owner is None:
                with self.ns.errors(f"claiming instance {instance}"):
                    try:
                        self.ns.create_exclusive(oid, b"", {"host": new, "instance": instance})
                        return
                    except rados.ObjectExists:
                        continue
            if self._cas(oid, owner or "", new):
                return
        raise ConflictError(f"instance {instance} in {self.ns.where}: its claim keeps changing")
