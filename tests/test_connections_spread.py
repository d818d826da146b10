"""Parallel actions are dealt over a few libvirt connections per URI (Connections.spread),
so that no connection carries more calls at once than a stock libvirtd serves of one client
(max_client_requests = 5); a file pool keeps its pool handle on each of them."""

from __future__ import annotations

import threading
from typing import Any

import libvirt
import pytest

from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.host.libvirt import CALLS_PER_CONNECTION, MAX_CONNECTIONS, Connections
from reconciler.schema.config import PoolConfig
from tests.conftest import DirPool

TEST_URI = "test:///default"


def connections_of_threads(conns: Connections, threads: int) -> list[Any]:
    """The connection each of `threads` new threads gets, twice each (in its order)."""
    got: list[Any] = [None] * threads
    all_in = threading.Barrier(threads)  # every thread alive at once: none reuses another's

    def work(i: int) -> None:
        first = conns.get(TEST_URI)
        all_in.wait()
        assert conns.get(TEST_URI) is first  # a thread keeps to its connection
        got[i] = first

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return got


def test_without_spread_every_thread_shares_one_connection() -> None:
    conns = Connections()
    try:
        got = connections_of_threads(conns, 6)
        assert len({id(c) for c in got}) == 1
    finally:
        conns.close()


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [(1, 1), (CALLS_PER_CONNECTION, 1), (CALLS_PER_CONNECTION + 1, 2), (8, 2), (100, 4)],
)
def test_spread_deals_threads_over_enough_connections(jobs: int, expected: int) -> None:
    conns = Connections()
    try:
        conns.spread(jobs)
        main = conns.get(TEST_URI)  # the applying thread's own calls use a slot too
        got = connections_of_threads(conns, jobs)
        distinct = {id(c) for c in [main, *got]}
        assert len(distinct) == min(expected, MAX_CONNECTIONS)
        # No connection carries more than CALLS_PER_CONNECTION of the workers' calls (and
        # the main thread's one more), up to MAX_CONNECTIONS; beyond, they share evenly.
        per_conn = max(CALLS_PER_CONNECTION, -(-jobs // MAX_CONNECTIONS))
        for c in distinct:
            assert sum(1 for g in got if id(g) == c) <= per_conn
    finally:
        conns.close()


def test_close_closes_every_connection() -> None:
    conns = Connections()
    conns.spread(8)
    got = connections_of_threads(conns, 8)
    conns.close()
    for c in got:
        with pytest.raises(libvirt.libvirtError):
            c.getLibVersion()


def test_a_lost_connection_is_dropped_for_its_thread_only() -> None:
    conns = Connections()
    conns.spread(8)
    try:
        mine = conns.get(TEST_URI)
        others = [c for c in connections_of_threads(conns, 7) if c is not mine]
        assert others
        conns.drop(TEST_URI)  # this thread's: the others' stay open
        for c in others:
            assert c.isAlive()
        again = conns.get(TEST_URI)
        assert again is not mine
    finally:
        conns.close()


@pytest.mark.libvirtd
def test_a_file_pool_keeps_its_handle_on_each_connection(dir_pool: DirPool) -> None:
    conns = Connections()
    conns.spread(8)
    config = PoolConfig.model_validate(
        {"uri": dir_pool.uri, "libvirtPool": dir_pool.name, "backends": ["qcow2"]}
    )
    vols = PoolDir("local", config, conns)
    lookups: list[int] = []

    class Counting:
        """A connection whose pool lookups are counted."""

        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def storagePoolLookupByName(self, name: str) -> Any:
            lookups.append(id(self))
            return self.conn.storagePoolLookupByName(name)

    try:
        a = Counting(libvirt.open(dir_pool.uri))
        b = Counting(libvirt.open(dir_pool.uri))
        for _ in range(3):
            for c in (a, b):
                assert vols.pool(c).name() == dir_pool.name
        assert sorted(lookups) == sorted([id(a), id(b)])  # once on each, not once per call
        # The handles belong to their own connections.
        assert vols.pool(a) is not vols.pool(b)
        a.conn.close()
        b.conn.close()
    finally:
        conns.close()
