"""A cache entry's references (the rbd driver's image cache): who clones from it.

Omap keys `ref.<volume>` of the entry's record object (drivers/rbd/layout.py), one per
disk made from it, so hosts add theirs without a compare-and-swap on the generation (which
parallel clones of one entry would keep failing). Adding them and collecting the entry
exclude each other by the entry's lease (drivers/rbd/leases.py: shared to add, exclusive
to collect). The generation CAS of put/delete does not touch these keys; deleting the
record removes them with it. A reference is never added to a missing record (that would
create it): the add is guarded and fails with ConflictError.
"""

from __future__ import annotations

import contextlib

from reconciler.drivers.host.store import ConflictError, StoreError
from reconciler.drivers.rbd.layout import REF_PREFIX, record_object
from reconciler.drivers.rbd.namespace import Namespace, rados_module, refused


class References:
    """The references of the cache entries in one namespace, added as this host."""

    def __init__(self, ns: Namespace, host: str) -> None:
        self.ns = ns
        self.host = host

    def add(self, pool: str, volume: str, ref: str) -> None:
        """Add `ref` to the references of the record pool/volume (a cache entry); raises
        ConflictError if the record is missing (never creates it)."""
        rados = rados_module()
        oid = record_object(pool, volume)
        try:
            with self.ns.errors(f"adding reference {ref} to {oid}"), rados.WriteOpCtx() as op:
                # The record must exist (omap_cmp on a missing object fails with ENOENT;
                # a record's generation is never the empty string).
                op.omap_cmp("generation", "", rados.LIBRADOS_CMPXATTR_OP_GT)
                self.ns.io.set_omap(op, (REF_PREFIX + ref,), (self.host.encode(),))
                self.ns.io.operate_write_op(op, oid)
        except StoreError as e:
            if refused(e):
                raise ConflictError(
                    f"cache entry {pool}/{volume} in {self.ns.where} is missing; it is made "
                    "again on the next try"
                ) from None
            raise

    def drop(self, pool: str, volume: str, ref: str) -> None:
        """Remove `ref` from the references of pool/volume (gone already: fine)."""
        rados = rados_module()
        oid = record_object(pool, volume)
        with self.ns.errors(f"dropping reference {ref} from {oid}"), rados.WriteOpCtx() as op:
            self.ns.io.remove_omap_keys(op, (REF_PREFIX + ref,))
            with contextlib.suppress(rados.ObjectNotFound):
                self.ns.io.operate_write_op(op, oid)

    def names(self, pool: str, volume: str) -> dict[str, str] | None:
        """The references of pool/volume (volume -> host that added it); None if there is
        no record."""
        oid = record_object(pool, volume)
        omap = self.ns.omap_pages(oid, f"reading references of {oid}")
        if omap is None:
            return None
        return {
            k[len(REF_PREFIX) :]: v.decode(errors="replace")
            for k, v in omap.items()
            if k.startswith(REF_PREFIX)
        }
