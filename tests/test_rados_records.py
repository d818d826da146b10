"""The RADOS record store against the real cluster: one winner per exclusive create, a
stale compare-and-swap fenced, a host's reads limited to its own index, and the crash
leftovers of drivers/rbd/records.py's docstring found and cleaned.

Each test works in its own namespace (`unique()`), so tests never see each other's
objects, and removes every object in it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.host.store import RELEASED, ConflictError, StoreError
from reconciler.drivers.rbd import layout as rr
from reconciler.drivers.rbd import records as records_module
from reconciler.drivers.rbd.changes import ChangeMark
from reconciler.drivers.rbd.layout import record_object
from reconciler.drivers.rbd.namespace import client_conf
from reconciler.drivers.rbd.records import RadosRecordStore
from reconciler.model.errors import RecordError
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from tests.conftest_ceph import Ceph, unique

pytestmark = pytest.mark.ceph

DEADLINE = 60.0  # seconds; generous: two cores, other test sessions running at once


def record(
    volume: str,
    instance: str = "vm-1",
    generation: int = 1,
    *,
    state: RecordState = RecordState.CREATING,
    backing: str | None = None,
    note: str = "",
) -> DiskRecord:
    return DiskRecord(
        backend=Backend.RBD,
        pool="rbd",
        volume=volume,
        instance=instance,
        # A disk's volume is `<instance>_<disk>` (schema/recordcheck.py checks every read).
        disk=volume.split("_", 1)[1] if instance else "",
        format=DiskFormat.RAW,
        virtual_size=1 << 30,
        # The spec it was made to, as the executor writes it, and a note of the test's.
        spec=(
            {
                "name": volume.split("_", 1)[1],
                "backend": "rbd",
                "pool": "rbd",
                "format": "raw",
                "size": 1 << 30,
                "source": {"template": "blank"},
                "note": note,
            }
            if instance
            else {"template": "blank", "size": 1 << 30, "note": note}
        ),
        source={"template": "blank"},
        backing=backing,
        state=state,
        generation=generation,
    )


def bump(rec: DiskRecord, **changes: Any) -> DiskRecord:
    return rec.model_copy(update={**changes, "generation": rec.generation + 1})


class CountingIoctx:
    """An Ioctx that notes every method called on it and the object names it was given."""

    def __init__(self, io: Any) -> None:
        self._io = io
        self.calls: Counter[str] = Counter()
        self.objects: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._io, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            for a in args:
                if isinstance(a, str):
                    self.objects[a] += 1
            return attr(*args, **kwargs)

        return call


Make = Callable[..., RadosRecordStore]


@pytest.fixture
def namespace(ceph: Ceph) -> Iterator[str]:
    """A namespace of pool rbd for one test; every object in it is removed after."""
    import rados

    ns = unique("t-rec")
    yield ns
    io = ceph.cluster.open_ioctx(ceph.pool)
    try:
        io.set_namespace(ns)
        for obj in list(io.list_objects()):
            with contextlib.suppress(rados.ObjectNotFound):
                io.remove_object(obj.key)
    finally:
        io.close()


@pytest.fixture
def make(ceph: Ceph, namespace: str) -> Iterator[Make]:
    """Stores in the test's namespace, on the shared client unless `own_client`; closed
    after. `counting=True` wraps the ioctx (store.ns.io) in a CountingIoctx."""
    stores: list[RadosRecordStore] = []

    def _make(
        host: str, *, own_client: bool = False, counting: bool = False, **kw: Any
    ) -> RadosRecordStore:
        if own_client:
            s = RadosRecordStore.connect(
                str(ceph.conf), ceph.pool, host=host, namespace=namespace, **kw
            )
        else:

            def open_ioctx() -> Any:
                io = ceph.cluster.open_ioctx(ceph.pool)
                return CountingIoctx(io) if counting else io

            s = RadosRecordStore(open_ioctx, ceph.pool, host=host, namespace=namespace, **kw)
        stores.append(s)
        return s

    yield _make
    for s in stores:
        s.close()


def raw(ceph: Ceph, namespace: str, oid: str) -> bytes | None:
    """An object's data and omap as one comparable value (None: no object)."""
    import rados

    io = ceph.cluster.open_ioctx(ceph.pool)
    try:
        io.set_namespace(namespace)
        try:
            data = io.read(oid, 1 << 20, 0)
            with rados.ReadOpCtx() as rop:
                it, _ = io.get_omap_vals(rop, "", "", 1000)
                io.operate_read_op(rop, oid)
                omap = dict(it)
        except rados.ObjectNotFound:
            return None
        return bytes(data) + repr(sorted(omap.items())).encode()
    finally:
        io.close()


def index_keys(ceph: Ceph, namespace: str, host: str, shards: int = rr.DEFAULT_SHARDS) -> set[str]:
    import rados

    io = ceph.cluster.open_ioctx(ceph.pool)
    keys: set[str] = set()
    try:
        io.set_namespace(namespace)
        for shard in range(shards):
            with contextlib.suppress(rados.ObjectNotFound), rados.ReadOpCtx() as rop:
                it, _ = io.get_omap_vals(rop, "", "", 100000)
                io.operate_read_op(rop, rr.index_object(host, shard))
                keys.update(k for k, _ in it)
    finally:
        io.close()
    return keys


def write_object(ceph: Ceph, namespace: str, oid: str, data: bytes) -> None:
    io = ceph.cluster.open_ioctx(ceph.pool)
    try:
        io.set_namespace(namespace)
        io.write_full(oid, data)
    finally:
        io.close()


def test_put_get_round_trip_and_identity(make: Make) -> None:
    a = make("host-a")
    rec = record("vm-1_root", note="é, and a newline\n")
    assert a.get("rbd", "vm-1_root") is None
    assert a.owner("rbd", "vm-1_root") is None
    a.put(rec, None)
    assert a.get("rbd", "vm-1_root") == rec
    assert a.owner("rbd", "vm-1_root") == "host-a"
    assert a.for_instance("vm-1") == [rec]
    assert a.for_instance("vm-2") == []
    assert a.load_all() == ([rec], [])
    # One store per namespace, many hosts: the same id, each host its own.
    b = make("host-b", shards=4)
    assert b.identity().id == a.identity().id
    assert (a.identity().host, b.identity().host) == ("host-a", "host-b")
    assert b.shards == rr.DEFAULT_SHARDS  # the namespace's count, fixed when it was made
    assert b.get("rbd", "vm-1_root") == rec  # any host reads any record by name
    assert b.load_all() == ([], [])  # but lists only its own
    a.sync()
    a.check_writable()


def test_exclusive_create_raced_by_three_clients_has_one_winner_each(
    make: Make, ceph: Ceph, namespace: str
) -> None:
    """Three hosts, each with its own Rados connection, race to create the same 50
    records, released together per record: exactly one wins each, the others get
    ConflictError, the stored record is the winner's, and each host's index ends up
    listing exactly what it won (the losers' entries are removed at once)."""
    hosts = ["h0", "h1", "h2"]
    stores = {h: make(h, own_client=True) for h in hosts}
    volumes = [f"vm-{i}_disk" for i in range(50)]
    barrier = threading.Barrier(len(hosts), timeout=DEADLINE)
    results: dict[str, list[str]] = {h: [] for h in hosts}
    errors: list[BaseException] = []

    def racer(host: str) -> None:
        try:
            for v in volumes:
                barrier.wait()
                try:
                    stores[host].put(record(v, instance=v.split("_")[0], note=host), None)
                    results[host].append("won")
                except ConflictError:
                    results[host].append("lost")
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=racer, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads), "a racer did not finish"
    assert not errors, errors
    won: dict[str, set[str]] = {h: set() for h in hosts}
    for i, v in enumerate(volumes):
        outcome = {h: results[h][i] for h in hosts}
        assert sorted(outcome.values()) == ["lost", "lost", "won"], (v, outcome)
        winner = next(h for h, r in outcome.items() if r == "won")
        won[winner].add(v)
        rec = stores["h0"].get("rbd", v)
        assert rec is not None and rec.spec["note"] == winner
        assert stores["h0"].owner("rbd", v) == winner
    for h in hosts:
        assert index_keys(ceph, namespace, h) == {record_object("rbd", v) for v in won[h]}
        good, bad = stores[h].load_all()
        assert {r.volume for r in good} == won[h] and not bad


def test_update_is_a_compare_and_swap_on_the_generation(
    make: Make, ceph: Ceph, namespace: str
) -> None:
    """A host acting on a stale read is fenced: the write names the generation it read,
    and a record that moved on refuses it and stays as it is."""
    a = make("host-a")
    other_process = make("host-a")  # the same host, another reconciler process
    r1 = record("vm-1_root")
    a.put(r1, None)
    r2 = bump(r1, state=RecordState.READY)
    a.put(r2, 1)
    assert other_process.get("rbd", "vm-1_root") == r2
    oid = record_object("rbd", "vm-1_root")
    before = raw(ceph, namespace, oid)

    # Acting on the read of generation 1 (stale): refused, nothing changed.
    with pytest.raises(ConflictError, match=r"is at generation 2.*expected generation 1"):
        other_process.put(bump(r1, state=RecordState.DELETING), 1)
    # A generation from the future, too.
    with pytest.raises(ConflictError):
        other_process.put(r2.model_copy(update={"generation": 9}), 8)
    # A create of a record that exists.
    with pytest.raises(ConflictError, match="already exists"):
        other_process.put(r1, None)
    assert raw(ceph, namespace, oid) == before
    assert index_keys(ceph, namespace, "host-a") == {oid}  # the loser was this host: kept

    # Another host cannot change host-a's record, even at the right generation.
    b = make("host-b")
    with pytest.raises(ConflictError, match="owned by host host-a"):
        b.put(bump(r2), 2)
    # Nor can it move the record to another instance (its index shard would be wrong).
    with pytest.raises(ConflictError):
        a.put(bump(r2, instance="vm-9"), 2)
    # An update of a record that does not exist.
    with pytest.raises(ConflictError, match="does not exist"):
        a.put(record("vm-1_nothing", generation=2), 1)
    assert raw(ceph, namespace, oid) == before

    # A generation must grow: the value compared cannot come back (ABA).
    with pytest.raises(ValueError, match="must be above"):
        a.put(r2, 2)
    r3 = bump(r2, state=RecordState.RESIZING, pending_size=2 << 30)
    other_process.put(r3, 2)
    assert a.get("rbd", "vm-1_root") == r3


def test_delete_is_a_compare_and_swap_and_unlists(make: Make, ceph: Ceph, namespace: str) -> None:
    a = make("host-a")
    b = make("host-b")
    rec = record("vm-1_root")
    a.put(rec, None)
    a.put(bump(rec), 1)
    oid = record_object("rbd", "vm-1_root")
    before = raw(ceph, namespace, oid)
    with pytest.raises(ConflictError, match="expected generation 1"):
        a.delete("rbd", "vm-1_root", 1)
    with pytest.raises(ConflictError, match="owned by host host-a"):
        b.delete("rbd", "vm-1_root", 2)
    assert raw(ceph, namespace, oid) == before
    a.delete("rbd", "vm-1_root", 2)
    assert raw(ceph, namespace, oid) is None
    assert index_keys(ceph, namespace, "host-a") == set()
    assert a.get("rbd", "vm-1_root") is None
    with pytest.raises(ConflictError, match="does not exist"):
        a.delete("rbd", "vm-1_root", 2)


def test_a_host_reads_only_its_own_index_never_the_pool_listing(make: Make) -> None:
    """3 hosts with 200 records each in one namespace: a host's load_all returns exactly
    its 200, reading its index shards and its records by name, and lists no objects."""
    hosts = ["h0", "h1", "h2"]
    stores = {h: make(h, counting=True) for h in hosts}
    mine: dict[str, list[DiskRecord]] = {h: [] for h in hosts}
    for h in hosts:
        for i in range(200):
            rec = record(f"{h}-vm-{i // 4}_disk-{i}", instance=f"{h}-vm-{i // 4}")
            stores[h].put(rec, None)
            mine[h].append(rec)

    s = stores["h1"]
    io: CountingIoctx = s.ns.io
    io.calls.clear()
    io.objects.clear()
    good, bad = s.load_all()
    assert sorted(good, key=lambda r: r.volume) == sorted(mine["h1"], key=lambda r: r.volume)
    assert not bad
    assert io.calls["list_objects"] == 0
    # One omap read per shard (< 1000 keys), and one of the cache entries' shared index,
    # all in flight at once.
    assert io.calls["operate_aio_read_op"] == s.shards + 1
    assert io.calls["operate_read_op"] == 0
    assert io.calls["aio_read"] == 200  # the records, by name
    assert io.calls["operate_write_op"] == 0  # nothing to clean
    read = set(io.objects) - {""}  # "": get_omap_vals' start_after
    assert read == {rr.index_object("h1", n) for n in range(s.shards)} | {
        rr.index_object(rr.SHARED, 0)
    } | {record_object("rbd", r.volume) for r in mine["h1"]}

    io.calls.clear()
    io.objects.clear()
    assert sorted(r.volume for r in s.for_instance("h1-vm-7")) == [
        f"h1-vm-7_disk-{i}" for i in range(28, 32)
    ]
    assert io.calls["list_objects"] == 0
    assert io.calls["operate_aio_read_op"] + io.calls["operate_read_op"] == 1  # one shard
    assert io.calls["aio_read"] == 4
    assert s.for_instance("h0-vm-7") == []  # another host's instance is not in h1's index


def test_an_index_entry_without_a_record_is_ignored_and_cleaned(
    make: Make, ceph: Ceph, namespace: str
) -> None:
    """A crash between the index entry and the record (create), or between the record's
    removal and the entry's (delete), leaves an entry without a record. It is never
    reported; once older than stale_after it is removed. A younger one is left alone: its
    create may be in flight."""
    import rados

    a = make("host-a")
    keep = record("vm-1_kept", instance="vm-1")
    a.put(keep, None)
    crashed = record("vm-1_crashed", instance="vm-1")
    oid = record_object("rbd", "vm-1_crashed")
    shard = rr.shard_of("vm-1", a.shards)
    # What a create leaves when it dies after its first write: the index entry alone.
    io = ceph.cluster.open_ioctx(ceph.pool)
    try:
        io.set_namespace(namespace)
        with rados.WriteOpCtx() as op:
            io.set_omap(op, (oid,), (rr.IndexEntry.new(crashed).raw.encode(),))
            io.operate_write_op(op, rr.index_object("host-a", shard))
    finally:
        io.close()

    assert a.load_all() == ([keep], [])
    assert a.for_instance("vm-1") == [keep]
    assert oid in index_keys(ceph, namespace, "host-a")  # young: perhaps in flight

    cleaner = make("host-a", stale_after=0.0)
    assert cleaner.for_instance("vm-1") == [keep]
    assert index_keys(ceph, namespace, "host-a") == {record_object("rbd", "vm-1_kept")}
    # The record's own create can still happen afterwards (the crashed run's retry).
    cleaner.put(crashed, None)
    assert sorted(r.volume for r in cleaner.load_all()[0]) == ["vm-1_crashed", "vm-1_kept"]


def test_a_record_naming_another_key_is_a_record_error(
    make: Make, ceph: Ceph, namespace: str
) -> None:
    """A record object copied or misplaced (its contents name another disk) is never taken
    for the disk its name says: get raises, load_all reports it, nothing else is hurt."""
    a = make("host-a")
    one, two = record("vm-1_one"), record("vm-1_two")
    a.put(one, None)
    a.put(two, None)
    write_object(ceph, namespace, record_object("rbd", "vm-1_two"), rr.encode(one, "host-a"))
    with pytest.raises(RecordError, match=r"describes rbd/vm-1_one.*copied or misplaced"):
        a.get("rbd", "vm-1_two")
    good, bad = a.load_all()
    assert good == [one]
    assert [(b.pool, b.volume) for b in bad] == [("rbd", "vm-1_two")]
    with pytest.raises(RecordError, match="describes rbd/vm-1_one"):
        a.for_instance("vm-1")


def test_the_stored_format_is_versioned(make: Make, ceph: Ceph, namespace: str) -> None:
    a = make("host-a")
    rec = record("vm-1_root")
    a.put(rec, None)
    doc = json.loads(rr.encode(rec, "host-a"))
    assert doc == {"format": 1, "host": "host-a", "record": rec.model_dump(mode="json")}
    doc["format"] = 2
    write_object(ceph, namespace, record_object("rbd", "vm-1_root"), json.dumps(doc).encode())
    with pytest.raises(RecordError, match="stored format 2, this reconciler knows 1"):
        a.get("rbd", "vm-1_root")
    write_object(ceph, namespace, record_object("rbd", "vm-1_root"), b"\x00not json")
    with pytest.raises(RecordError, match="is not JSON"):
        a.get("rbd", "vm-1_root")


def test_references_count_every_hosts_records(make: Make) -> None:
    a, b = make("host-a"), make("host-b")
    a.put(record("vm-1_a1", backing="_cache_x"), None)
    a.put(record("vm-1_a2", backing="_cache_y"), None)
    b.put(record("vm-b_b1", instance="vm-b", backing="_cache_x"), None)
    assert a.references("rbd", "_cache_x") == 2
    assert b.references("rbd", "_cache_y") == 1
    assert a.references("rbd", "_cache_z") == 0
    assert a.references("other", "_cache_x") == 0


def test_the_client_bounds_every_wait(ceph: Ceph, namespace: str) -> None:
    """An OSD outage must give a StoreError, never a hang: the store's own client sets
    finite op and mount timeouts. (Stopping the shared OSD would disturb other tests.)"""
    s = RadosRecordStore.connect(
        str(ceph.conf), ceph.pool, host="host-a", namespace=namespace, op_timeout=7
    )
    try:
        for option in ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"):
            assert float(s.cluster.conf_get(option)) == 7.0, option
    finally:
        s.close()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            client_conf(bad)


def test_faults_are_store_errors_naming_the_pool(ceph: Ceph, namespace: str) -> None:
    with pytest.raises(StoreError, match=r"Ceph pool no-such-pool.*does not exist"):
        RadosRecordStore.connect(str(ceph.conf), "no-such-pool", host="h", namespace=namespace)


def test_a_load_reads_again_only_records_that_may_have_changed(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived process (`reconcile watch`) loading its records again reads the index,
    not the records, while no process of the host wrote one (drivers/rbd/changes.py): its
    RADOS reads do not grow with its disks. Any write by a process of the host with the
    same state directory makes the next load read all; a create, delete or hand-over
    changes the index, which every load reads; nothing else is kept past FULL_EVERY."""
    mark = tmp_path / "rados-changes"
    a = make("host-a", counting=True, changes=ChangeMark(mark))
    other = make("host-a", changes=ChangeMark(mark))  # another process of the host
    unmarked = make("host-a")  # a writer that died before it marked its write
    recs = [record(f"vm-{i}_root", instance=f"vm-{i}") for i in range(20)]
    for r in recs:
        a.put(r, None)
    io: CountingIoctx = a.ns.io

    def load() -> dict[str, DiskRecord]:
        io.calls.clear()
        good, bad = a.load_all()
        assert not bad
        return {r.volume: r for r in good}

    assert load() == {r.volume: r for r in recs} and io.calls["aio_read"] == 20
    assert load() == {r.volume: r for r in recs} and io.calls["aio_read"] == 0
    assert io.calls["operate_aio_read_op"] == a.shards + 1  # the index, every time

    changed = record("vm-3_root", instance="vm-3", generation=2, note="changed")
    other.put(changed, 1)
    assert load()["vm-3_root"] == changed and io.calls["aio_read"] == 20
    assert load()["vm-3_root"] == changed and io.calls["aio_read"] == 0

    made = record("vm-20_root", instance="vm-20")
    unmarked.put(made, None)  # a new index entry: read, whoever made it
    unmarked.delete("rbd", "vm-5_root", 1)  # its index entry is gone
    got = load()
    assert got["vm-20_root"] == made and "vm-5_root" not in got
    assert io.calls["aio_read"] == 1

    stale = record("vm-4_root", instance="vm-4", generation=2, note="unmarked")
    unmarked.put(stale, 1)
    assert load()["vm-4_root"] == recs[4]  # kept: nothing marked the write
    monkeypatch.setattr(records_module, "FULL_EVERY", 0.0)
    assert load()["vm-4_root"] == stale and io.calls["aio_read"] == 20

    plain = make("host-a", counting=True)  # no mark: every load reads every record
    plain_io: CountingIoctx = plain.ns.io
    for _ in range(2):
        plain_io.calls.clear()
        assert len(plain.load_all()[0]) == 20 and plain_io.calls["aio_read"] == 20


def test_an_index_shard_larger_than_one_omap_page_is_read_whole(make: Make) -> None:
    """Index shards are read in pages of 1,000 keys; one shard of 1,200 is read whole."""
    a = make("host-a", shards=1, counting=True)
    assert a.shards == 1
    for i in range(1200):
        a.put(record(f"vm-{i // 4}_disk-{i}", instance=f"vm-{i // 4}"), None)
    io: CountingIoctx = a.ns.io
    io.calls.clear()
    good, bad = a.load_all()
    assert len({r.volume for r in good}) == 1200 and not bad
    # The first page and the cache entries' index at once, then the second page.
    assert io.calls["operate_aio_read_op"] == 2
    assert io.calls["operate_read_op"] == 1
    assert len(a.for_instance("vm-299")) == 4


def test_an_instance_is_handed_over_by_compare_and_swap(
    make: Make, ceph: Ceph, namespace: str
) -> None:
    """Release moves a record to RELEASED, take to the new host, each a compare-and-swap;
    the old owner is fenced afterwards and the indexes follow the record."""
    a, b, c = make("host-a"), make("host-b"), make("host-c")
    rec = record("vm-1_root", state=RecordState.READY)
    a.put(rec, None)
    oid = record_object("rbd", "vm-1_root")
    # B finds it by name (never listed in B's index) and sees who owns it.
    found = b.read_many([("rbd", "vm-1_root"), ("rbd", "missing")])
    assert list(found) == [("rbd", "vm-1_root")]
    held = found[("rbd", "vm-1_root")]
    assert isinstance(held, rr.Stored) and held.host == "host-a" and held.record == rec
    # Nobody but the owner releases, and only at the generation it read.
    with pytest.raises(ConflictError):
        b.release("rbd", "vm-1_root", 1)
    with pytest.raises(ConflictError):
        a.release("rbd", "vm-1_root", 7)
    # Taking from a host that does not own it is refused.
    with pytest.raises(ConflictError):
        b.take("rbd", "vm-1_root", 1, "host-c")
    a.release("rbd", "vm-1_root", 1)
    assert a.owner("rbd", "vm-1_root") == RELEASED
    assert index_keys(ceph, namespace, "host-a") == set()
    assert index_keys(ceph, namespace, RELEASED) == {oid}
    assert a.load_all() == ([], [])  # no longer A's
    # The released record cannot be changed or deleted by its former owner.
    with pytest.raises(ConflictError):
        a.put(rec.model_copy(update={"generation": 3}), 2)
    with pytest.raises(ConflictError):
        a.delete("rbd", "vm-1_root", 2)
    # Two hosts take at once from the same read: exactly one wins.
    results: list[str] = []
    gate = threading.Barrier(2)

    def take(s: RadosRecordStore) -> None:
        gate.wait(DEADLINE)
        try:
            s.take("rbd", "vm-1_root", 2, RELEASED)
            results.append(s.host)
        except ConflictError:
            results.append("lost")

    threads = [threading.Thread(target=take, args=(s,)) for s in (b, c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    winner = next(r for r in results if r != "lost")
    assert sorted(results) == sorted([winner, "lost"])
    won = b if winner == "host-b" else c
    lost = c if won is b else b
    taken = won.get("rbd", "vm-1_root")
    assert taken is not None and taken.generation == 3 and taken.spec == rec.spec
    assert won.owner("rbd", "vm-1_root") == won.host
    assert [r.volume for r in won.load_all()[0]] == ["vm-1_root"]
    assert lost.load_all() == ([], [])
    assert index_keys(ceph, namespace, won.host) == {oid}
    assert index_keys(ceph, namespace, RELEASED) == set()
    # The new owner changes it; the old owner, acting on its old read, is fenced.
    won.put(bump(taken, state=RecordState.RESIZING, pending_size=2 << 30), 3)
    with pytest.raises(ConflictError, match=f"owned by host {won.host}"):
        a.put(bump(rec, state=RecordState.DELETING), 1)


def test_heartbeats_and_a_take_from_a_host_that_is_gone_fences_it(make: Make, ceph: Ceph) -> None:
    """Taking from a host whose heartbeat expired first blocklists every client address
    its heartbeats name: the paused process's next operation fails, whatever it is."""
    a = make("host-a", own_client=True, op_timeout=10)
    a_too = make("host-a", own_client=True, op_timeout=10)  # another process of host A
    b = make("host-b", own_client=True, op_timeout=10)
    assert b.heartbeats() == {}
    a.beat()
    beats = b.heartbeats()
    assert list(beats) == ["host-a"] and beats["host-a"] == a.last_beat
    a_too.beat()
    assert b.heartbeats()["host-a"] == max(a.last_beat or 0, a_too.last_beat or 0)
    rec = record("vm-2_root", instance="vm-2", state=RecordState.READY)
    a.put(rec, None)
    # B takes from A (its heartbeat expired: the caller's judgement, see Records.holds).
    fenced: list[str] = []
    try:
        b.take("rbd", "vm-2_root", 1, "host-a")
        fenced = sorted({a.hosts.addr(), a_too.hosts.addr()})
        assert b.owner("rbd", "vm-2_root") == "host-b"
        assert [r.volume for r in b.for_instance("vm-2")] == ["vm-2_root"]
        # Both of A's processes are fenced: every operation fails, reads included.
        for s in (a, a_too):
            with pytest.raises(StoreError, match="this client was fenced"):
                s.put(bump(rec), 1)
            with pytest.raises(StoreError):
                s.get("rbd", "vm-2_root")
        # A new process of host A is a new client: it works, and finds the disk taken.
        a_new = make("host-a", own_client=True)
        assert a_new.for_instance("vm-2") == []
        with pytest.raises(ConflictError, match="owned by host host-b"):
            a_new.put(bump(rec), 1)
    finally:
        for addr in fenced:  # leave the test cluster's blocklist as it was
            ceph.cluster.mon_command(
                json.dumps({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}), b""
            )


def test_a_store_without_a_cluster_handle_cannot_fence(make: Make) -> None:
    a, b = make("host-a"), make("host-b")
    a.put(record("vm-3_root", instance="vm-3"), None)
    with pytest.raises(StoreError, match="cannot fence host host-a"):
        b.take("rbd", "vm-3_root", 1, "host-a")
    assert b.owner("rbd", "vm-3_root") == "host-a"  # nothing taken


def test_cache_entries_are_shared_by_every_host(make: Make, ceph: Ceph, namespace: str) -> None:
    """A cache entry is every host's: any host updates it (generation CAS only) and
    every host's load_all lists it, from one shared index shard."""
    a, b = make("host-a"), make("host-b")
    entry = record("_cache_img", instance="", state=RecordState.READY).model_copy(
        update={"kind": RecordKind.CACHE}
    )
    a.put(entry, None)
    assert a.owner("rbd", "_cache_img") == rr.SHARED
    assert index_keys(ceph, namespace, rr.SHARED) == {record_object("rbd", "_cache_img")}
    assert [r.volume for r in b.load_all()[0]] == ["_cache_img"]
    b.put(bump(entry, last_used="2026-12-01T00:00:00+00:00"), 1)
    with pytest.raises(ConflictError):
        a.put(bump(entry), 1)  # stale
    b.delete("rbd", "_cache_img", 2)
    assert a.get("rbd", "_cache_img") is None
    assert index_keys(ceph, namespace, rr.SHARED) == set()


def test_an_instances_disks_have_one_owner(make: Make) -> None:
    """Two hosts racing on one instance race per disk too: the instance's claim, made
    before a host's first record of it, keeps every disk of it with one host."""
    a, b = make("host-a"), make("host-b")
    a.beat()
    b.beat()
    a.put(record("vm-5_root", instance="vm-5"), None)
    with pytest.raises(ConflictError, match=r"instance vm-5 .* is owned by host host-a"):
        b.put(record("vm-5_scratch", instance="vm-5"), None)
    assert b.get("rbd", "vm-5_scratch") is None
    a.put(record("vm-5_scratch", instance="vm-5"), None)  # the owner makes the rest
    # Released, the claim goes with the records: the taker may then make new disks.
    a.release("rbd", "vm-5_root", 1)
    a.release("rbd", "vm-5_scratch", 1)
    b.take("rbd", "vm-5_root", 2, RELEASED)
    b.put(record("vm-5_swap", instance="vm-5"), None)
    with pytest.raises(ConflictError, match="owned by host host-b"):
        a.put(record("vm-5_data", instance="vm-5"), None)
