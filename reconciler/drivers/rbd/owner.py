"""Which record store manages an rbd pool (drivers/host/ownership.py), kept in the pool.

Many hosts share the pool by design, so the pool is claimed by the RADOS store (the
`store` object's id, one per namespace), not by a host: an object `reconciler.owner` in
P's default namespace names the store that manages the images. Every host using that
namespace passes; a second namespace (another store) pointed at the same Ceph pool, or a
namespace recreated empty, is refused as ManagedElsewhere until an operator runs
`records rebuild`.

Invariants: a claim is one exclusive create of the object (two hosts claiming at once: one
wins, the other checks the winner); only take_over (`records rebuild`) overwrites it; a
damaged object is an error naming the way out, never read as no owner.
"""

from __future__ import annotations

import contextlib

from reconciler.drivers.host import ownership
from reconciler.drivers.host.store import StoreIdentity
from reconciler.drivers.rbd.cluster import Cluster, rados_only
from reconciler.model.errors import PoolError
from reconciler.schema.bounded import load_json

OWNER_OBJECT = "reconciler.owner"  # in the pool's default namespace, beside the images


def _identity(c: Cluster) -> StoreIdentity:
    return c.record_store().identity()


def owner(c: Cluster) -> ownership.Owner | None:
    rados = rados_only()
    with c.op("reading the pool's owner"):
        try:
            raw = c.io().read(OWNER_OBJECT, 1 << 16, 0)
        except rados.ObjectNotFound:
            return None
    try:
        doc = load_json(raw, what=OWNER_OBJECT)
        return ownership.Owner(
            str(doc["store"]), str(doc["location"]), str(doc["host"]), str(doc["since"])
        )
    except (ValueError, KeyError, TypeError) as e:
        raise PoolError(
            f"pool {c.name}: object {OWNER_OBJECT} in {c.where} is damaged ({e}); "
            f"restore it, or run 'reconcile records rebuild {c.name}'"
        ) from None


def _refusal(c: Cluster, owner: ownership.Owner, ident: StoreIdentity) -> str | None:
    if owner.store == ident.id:
        return None  # any host of the same store
    return (
        f"pool {c.name}: {c.where} is managed by record store {owner.store} "
        f"({owner.location}, claimed by host {owner.host} since {owner.since}), not by "
        f"this config's store {ident.id} ({ident.location}); its images are left alone. "
        "Point this config at that namespace, or, if that store was lost, rebuild: "
        f"reconcile records rebuild {c.name}"
    )


def check_owner(c: Cluster) -> None:
    found = owner(c)
    if found is not None:
        why = _refusal(c, found, _identity(c))
        if why is not None:
            raise ownership.ManagedElsewhere(why)


def claim(c: Cluster) -> None:
    rados = rados_only()
    ident = _identity(c)
    if owner(c) is None:
        data = ownership.Owner.of(ident).to_json().encode()
        with c.op("claiming the pool"), rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            with contextlib.suppress(rados.ObjectExists):  # another host won: check it
                c.io().operate_write_op(op, OWNER_OBJECT)
    check_owner(c)


def take_over(c: Cluster) -> None:
    data = ownership.Owner.of(_identity(c)).to_json().encode()
    with c.op("taking over the pool"):
        c.io().write_full(OWNER_OBJECT, data)
