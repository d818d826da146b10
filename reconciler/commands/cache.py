"""`reconcile cache ls|gc`: the cache entries each pool holds, and removing unused ones.

An entry is removed only when no record references it (a qcow2 overlay names it as its
backing), under its lock taken exclusively, with the references read again after the lock
is taken: a create holds the entry's lock shared while it uses it, and writes its record
naming the entry before that, so an entry in use is never removed, whatever its age.
"""

from __future__ import annotations

import argparse
import datetime
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.commands.common import EXIT_OK, human_age, parse, read_config
from reconciler.control.session import Session
from reconciler.drivers.api import ManagingDriver
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, RecordKind
from reconciler.model.units import format_size
from reconciler.util import faults


@dataclass(frozen=True)
class Entry:
    pool: str
    volume: str
    what: str
    size: int
    users: int
    unused_for: float  # seconds since a disk was last made from it (inf: never noted)
    state: str


def _describe(rec: DiskRecord) -> str:
    spec = rec.spec
    if "image" in spec:
        return f"image {spec['image']} ({spec.get('format')}, sha256 {str(spec['sha256'])[:12]})"
    label = f" label {spec['label']!r}" if spec.get("label") else ""
    return f"template {spec.get('template')}{label}"


def entries(store: RecordStore, now: datetime.datetime) -> list[Entry]:
    records, _ = store.load_all()
    users = Counter((r.pool, r.backing) for r in records if r.backing)
    out = [
        Entry(
            r.pool,
            r.volume,
            _describe(r),
            r.virtual_size,
            users[(r.pool, r.volume)],
            r.unused_for(now),
            r.state.value,
        )
        for r in records
        if r.kind is RecordKind.CACHE
    ]
    return sorted(out, key=lambda e: (e.pool, e.volume))


def gc(
    store: RecordStore,
    drivers: dict[str, ManagingDriver],
    min_age: float,
    now: datetime.datetime | None = None,
) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Remove unreferenced entries older than `min_age` seconds: (removed, kept with why)."""
    now = now or datetime.datetime.now(datetime.UTC)
    removed: list[Entry] = []
    kept: list[tuple[Entry, str]] = []
    claimed: set[str] = set()
    refused: dict[str, str] = {}
    for e in entries(store, now):
        if e.users:
            kept.append((e, f"used by {e.users} disk(s)"))
            continue
        if e.unused_for < min_age:
            kept.append((e, "used more recently than --min-age"))
            continue
        driver = drivers.get(e.pool)
        if driver is None:
            kept.append((e, "its pool has no driver in this config"))
            continue
        if e.pool not in claimed:
            try:
                driver.claim()  # a pool another store manages is not ours to clean
            except ReconcileError as err:
                refused[e.pool] = str(err)
            claimed.add(e.pool)
        if e.pool in refused:
            kept.append((e, refused[e.pool]))
            continue
        with driver.lock(e.volume):
            # Read again under the lock: a create may have started meanwhile.
            rec = store.get(e.pool, e.volume)
            if rec is None:
                continue
            if store.references(e.pool, e.volume):
                kept.append((e, "came into use"))
                continue
            if rec.unused_for(now) < min_age:
                kept.append((e, "used more recently than --min-age"))
                continue
            driver.delete_volume(e.volume)
            store.delete(e.pool, e.volume, rec.generation)
            faults.point("cache.entry.removed")
            removed.append(e)
    return removed, kept


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h or 7d") from None
    if value < 0:
        raise ValueError(f"duration {text!r} is negative")
    return value


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile cache", description="List or garbage-collect the pools' cache entries."
    )
    sub = p.add_subparsers(dest="what", required=True)
    ls = sub.add_parser("ls", help="list cache entries with size, users and age")
    g = sub.add_parser("gc", help="remove entries no disk uses")
    g.add_argument(
        "--min-age",
        default="0s",
        metavar="DURATION",
        help="keep entries used more recently than this (e.g. 2h, 7d)",
    )
    args = parse(p, argv, common_on=(ls, g))
    config = read_config(args)
    now = datetime.datetime.now(datetime.UTC)
    with Session(config) as s:
        if args.what == "ls":
            _list(s, now)
        else:
            _collect(s, args.min_age, now)
    return EXIT_OK


def _list(s: Session, now: datetime.datetime) -> None:
    rows = entries(s.store, now)
    print(f"{'POOL':<12} {'ENTRY':<56} {'SIZE':>10} {'USERS':>5} {'AGE':>8}  WHAT")
    for e in rows:
        shown = "-" if e.unused_for == float("inf") else human_age(e.unused_for)
        state = "" if e.state == "ready" else f" [{e.state}]"
        print(
            f"{e.pool:<12} {e.volume:<56} {format_size(e.size):>10} {e.users:>5} "
            f"{shown:>8}  {e.what}{state}"
        )
    print(f"{len(rows)} cache entr{'y' if len(rows) == 1 else 'ies'}")


def _collect(s: Session, min_age_text: str, now: datetime.datetime) -> None:
    try:
        min_age = parse_duration(min_age_text)
    except ValueError as e:
        raise ReconcileError(str(e)) from None
    s.store.check_writable()  # locked or read-only: stop before removing anything
    removed, kept = gc(s.store, s.managing_drivers(), min_age, now)
    for entry in removed:
        print(f"removed {entry.pool}/{entry.volume} ({entry.what}, {format_size(entry.size)})")
    for entry, why in kept:
        print(f"kept {entry.pool}/{entry.volume}: {why}")
    print(f"Cache gc: {len(removed)} removed, {len(kept)} kept.")
