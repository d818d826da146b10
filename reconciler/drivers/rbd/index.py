"""Each host's index of the records it owns, in shards (`host.<host>.<shard>`,
drivers/rbd/layout.py), and reading records through it: a host finds its records by name,
never by listing the pool.

An entry is written before its record and removed after it (drivers/rbd/records.py), so
a record never exists unlisted by its host's index, and an index entry without a record is
harmless: `load` ignores it and, once it is older than `stale_after` (an entry younger than
that may belong to a create still in flight), removes it. Every removal is guarded by
`omap_cmp` on the exact value read, so a create that rewrote the entry meanwhile keeps
it. An entry whose record another host owns (a lost create race, a record handed over) is
not reported, and removed the same way. A creator paused between its entry and its record
for longer than `stale_after` could see its entry cleaned before its record lands;
`stale_after` defaults to an hour, far above the op timeout that bounds each step.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping

from reconciler.drivers.rbd.layout import (
    SHARED,
    IndexEntry,
    Stored,
    decode,
    index_object,
    shard_of,
)
from reconciler.drivers.rbd.namespace import Namespace, rados_module
from reconciler.model.errors import RecordError
from reconciler.model.record import BadRecord, DiskRecord

DEFAULT_STALE_AFTER = 3600.0  # seconds before an index entry without a record is removed


class Index:
    """The index shards of every host in one namespace, written as this host."""

    def __init__(self, ns: Namespace, host: str, shards: int, stale_after: float) -> None:
        self.ns = ns
        self.host = host
        self.shards = shards
        self.stale_after = stale_after

    def entries(self, host: str, shard: int) -> dict[str, IndexEntry | None]:
        """One index shard: record object name -> entry (None: unreadable entry)."""
        return {
            k: IndexEntry.parse(v) for k, v in self.ns.omap_all(index_object(host, shard)).items()
        }

    def load(
        self, host: str, shards: list[int], instance: str | None, clean: bool
    ) -> tuple[list[DiskRecord], list[BadRecord]]:
        """The records `host`'s index lists in `shards` (of `instance`, if given)."""
        return self.load_from([(host, s) for s in shards], instance, clean)

    def load_from(
        self,
        where: list[tuple[str, int]],
        instance: str | None,
        clean: bool,
        kept: Mapping[str, tuple[str, Stored]] | None = None,
        seen: dict[str, tuple[str, Stored]] | None = None,
    ) -> tuple[list[DiskRecord], list[BadRecord]]:
        """The records the index shards `where` ((host, shard) pairs) list (of `instance`,
        if given): every shard read at once, then every record they list at once. A record
        whose entry is in `kept` (object -> (the entry's stored value, the record read
        with it)) with the same value is not read again (drivers/rbd/changes.py says when
        that is safe); `seen`, if given, gets each record returned with its entry's value."""
        objects = {index_object(h, s): (h, s) for h, s in where}
        shards = self.ns.omap_many(list(objects), "reading the index")
        listed: list[tuple[str, str, int, IndexEntry | None]] = []
        for ioid, (host, shard) in objects.items():
            for oid, raw in shards.get(ioid, {}).items():
                entry = IndexEntry.parse(raw)
                if instance is None or (entry is not None and entry.instance == instance):
                    listed.append((oid, host, shard, entry))
        kept = kept or {}

        def unchanged(oid: str, entry: IndexEntry | None) -> Stored | None:
            got = kept.get(oid)
            return got[1] if got is not None and entry is not None and got[0] == entry.raw else None

        datas = self.ns.read_many(
            sorted({oid for oid, _, _, entry in listed if unchanged(oid, entry) is None})
        )
        good: list[DiskRecord] = []
        bad: list[BadRecord] = []
        for oid, host, shard, entry in listed:
            stored = unchanged(oid, entry)
            if stored is None:
                data = datas.get(oid)
                if data is None:
                    if clean and entry is not None and time.time() - entry.at >= self.stale_after:
                        self.remove(shard, oid, entry, host)  # a crash after the index entry
                    continue
                try:
                    stored = decode(oid, data, self.ns.where)
                except RecordError as e:
                    at = (entry.pool, entry.volume) if entry else ("?", oid)
                    bad.append(BadRecord(*at, str(e)))
                    continue
            rec = stored.record
            if stored.host != host or (entry is not None and rec.instance != entry.instance):
                # Another host owns it (we lost a create race, or it was deleted and made
                # there since): not ours to report. Remove our entry, guarded by its value.
                if clean and entry is not None:
                    self.remove(shard, oid, entry, host)
                continue
            good.append(rec)
            if seen is not None and entry is not None:
                seen[oid] = (entry.raw, stored)
        return good, bad

    def remove(self, shard: int, oid: str, entry: IndexEntry, holder: str | None = None) -> None:
        """Remove `oid` from `holder`'s index (default this host's) if its entry is still
        `entry`."""
        rados = rados_module()
        ioid = index_object(holder or self.host, shard)
        with self.ns.errors(f"cleaning index {ioid}"):
            try:
                with rados.WriteOpCtx() as op:
                    op.omap_cmp(oid, entry.raw, rados.LIBRADOS_CMPXATTR_OP_EQ)
                    self.ns.io.remove_omap_keys(op, (oid,))
                    self.ns.io.operate_write_op(op, ioid)
            except rados.ObjectNotFound:
                pass
            except rados.OSError as e:
                if e.errno != errno.ECANCELED:  # rewritten meanwhile: it is not stale
                    raise

    def add(self, holder: str, shard: int, oid: str, entry: IndexEntry) -> None:
        rados = rados_module()
        with self.ns.errors(f"indexing {oid}"), rados.WriteOpCtx() as op:
            self.ns.io.set_omap(op, (oid,), (entry.raw.encode(),))
            self.ns.io.operate_write_op(op, index_object(holder, shard))

    def shard(self, holder: str, instance: str) -> int:
        """The index shard of a record: cache entries, a few per image and template, all
        in one shard of SHARED's index; disks by a hash of their instance."""
        return 0 if holder == SHARED else shard_of(instance, self.shards)

    def entry(self, shard: int, oid: str, holder: str) -> IndexEntry | None:
        values = self.ns.omap(index_object(holder, shard), oid) or {}
        raw = values.get(oid)
        return None if raw is None else IndexEntry.parse(raw)
