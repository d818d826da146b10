"""Two reconcilers started together on the same manifests and pool, as real processes."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from reconciler.model.record import RecordKind, RecordState
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd


def test_two_processes_make_every_disk_once(env: Env) -> None:
    for i in range(12):
        env.manifest(
            f"vm{i}",
            [
                disk(
                    "root",
                    backend="qcow2",
                    fmt="qcow2",
                    size="64MiB",
                    template="ext4",
                    label="root",
                ),
                disk("eph", size="32MiB", template="ext4", label="eph"),
                disk("swap", size="16MiB", template="swap"),
            ],
        )
    procs = [env.start() for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    for out, err, rc in results:
        assert rc == 0, out + err

    created = Counter(
        line.split()[1]
        for out, _, _ in results
        for line in out.splitlines()
        if line.startswith("created ")
    )
    skipped = Counter(
        line.split()[2]
        for out, _, _ in results
        for line in out.splitlines()
        if line.startswith("skipped ")
    )
    assert len(created) == 36 and set(created.values()) == {1}, created
    per_process = [
        sum(line.startswith("created ") for line in out.splitlines()) for out, _, _ in results
    ]
    print(f"disks created per process: {per_process}")
    # Whatever one process made, the other found done: nothing was made twice.
    assert set(skipped) <= set(created)
    # Each process accounted for every action it planned (a process that planned after
    # the other had made some disks plans fewer).
    for out, _, _ in results:
        planned = re.search(r"Applying (\d+) action", out)
        n = int(planned.group(1)) if planned else 0
        lines = out.splitlines()
        done = sum(line.startswith(("created ", "skipped ")) for line in lines)
        assert done == n and not any(line.startswith("FAILED") for line in lines), out

    store = env.store()
    records, bad = store.load_all()
    store.close()
    assert not bad
    disks = [r for r in records if r.kind is RecordKind.DISK]
    assert len(disks) == 36
    # generation 2 = written once as `creating`, once as `ready`: no second creation.
    assert {(r.state, r.generation) for r in disks} == {(RecordState.READY, 2)}
    caches = [r for r in records if r.kind is RecordKind.CACHE]
    assert {(r.state, r.generation) for r in caches} == {(RecordState.READY, 2)}
    assert len(caches) == 3  # one ext4 64 MiB, one ext4 32 MiB, one swap 16 MiB
    assert env.plan_json()["actions"] == []
