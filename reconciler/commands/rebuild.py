"""`reconcile records rebuild`: a pool's records restored from its volumes' copies, only
where restoring cannot make the next run destroy anything (DESIGN invariants 4 and 8).

A copy is evidence, never truth. What a driver hands over (`record_copies`) is already
only trusted copies (a file's `trusted.*` attribute or a `user.*` one sealed with the
host's key, an LV's tags, an RBD image's metadata), each checked as input
(schema/recordcheck.py): volume derived from instance and disk, backing an entry's name,
backend and format that fit each other and the pool. On top of that, a copy is restored
only if:

- it was written at rest: state `ready`, no migration under way (a copy caught mid-step
  would make the next run finish or roll back a step of a store that is gone: delete a
  partial volume, switch a copy);
- it agrees with itself: the spec it was made to names its pool, backend and format (as
  every record's must) and, at rest, its size (so a copy cannot claim a format or size
  its own spec denies);
- checked over the set, its backing is a cache entry of the pool that has a record (the
  database's, or one restored with it);
- given manifests (`PATH...`), planning with it, with every flag that lets a plan
  destroy (`--prune`, `--allow-replace`), gives its disk no action but a record-only
  update and no error: no delete, replace, migrate, resize, release or hand-over. A
  refused cache entry refuses the disks backed by it, so this is repeated until nothing
  more is refused.

Without manifests the plan cannot be made, so only the first three hold: a restored
record then describes the disk exactly as the reconciler last wrote it at rest, and the
next plan does to it what it would have done with the lost store. Pass the manifest
directory to be sure nothing is destroyed. Whatever is refused is reported, one line
each, and its volume is left without a record: a stranger the plan reports and never
touches, until an operator adopts it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from reconciler.commands.common import EXIT_ERROR, EXIT_OK, add_common, read_config, setup_logging
from reconciler.control.session import Session, observe_managed
from reconciler.diff import PlanOptions, plan
from reconciler.drivers.api import ManagingDriver
from reconciler.model.desired import Desired
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.observed import Observed
from reconciler.model.plan import ActionKind
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.recordcheck import validate

# What a restored record may make the next plan do to its disk: only a record-only change.
ALLOWED = frozenset({ActionKind.UPDATE, ActionKind.SNAPSHOT})  # non-destructive


@dataclass
class Verdict:
    restore: list[DiskRecord] = field(default_factory=list)
    kept: list[DiskRecord] = field(default_factory=list)  # the database has a record
    refused: list[tuple[str, str]] = field(default_factory=list)  # (volume, why)
    without: list[tuple[str, str]] = field(default_factory=list)  # no trusted copy
    planned: bool = False  # checked against a plan of the given manifests


def _at_rest(rec: DiskRecord) -> str | None:
    """Why `rec` is not a record at rest that agrees with its own spec (None: it is)."""
    if rec.state is not RecordState.READY:
        return f"its copy was written mid-step (state {rec.state.value})"
    if rec.migration is not None:
        return "its copy records a migration under way"
    if rec.kind is RecordKind.CACHE:
        return None
    # Its spec names its own disk, pool, backend and format (recordcheck, as every
    # record's); at rest, its size is the volume's too.
    said = rec.spec.get("size")
    if said != rec.virtual_size:
        return f"its spec says size {said!r} but the record {rec.virtual_size!r}"
    return None


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile records",
        description="Work on the records database itself.",
    )
    sub = p.add_subparsers(dest="what", required=True)
    rb = sub.add_parser(
        "rebuild",
        help="restore a pool's records from the trusted copies its volumes carry",
        description="Restore the records of POOL from the copies its volumes carry (never "
        "their bytes) into this config's records database, then make that database the "
        "pool's manager. For a database that was lost or replaced. A copy is evidence, "
        "never truth: only trusted copies are read (a file's trusted.* attribute, or a "
        "user.* one sealed with this host's key; an LV's tags; an RBD image's metadata), "
        "each checked as input, and only copies written at rest that agree with their own "
        "spec are restored. Given the manifests (PATH...), a copy is restored only if the "
        "next plan, with --prune and --allow-replace, would do nothing to its disk but a "
        "record-only update: no delete, replace, migrate, resize or release. Without "
        "them the plan cannot be checked; pass them to be sure. Each refusal is reported "
        "and its volume left without a record (reported by the plan, never touched, "
        "until adopted). Volumes that already have a record are left as they are.",
    )
    rb.add_argument("pool", metavar="POOL", help="a pool of the config")
    rb.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="the manifests (files or directories) the next run plans with",
    )
    rb.add_argument("--dry-run", action="store_true", help="show what would be restored")
    rb.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_common(rb)
    # PATHs may follow the options too (`rebuild POOL --yes DIR`), which argparse's
    # positionals, taken in one run, would refuse: parsed here, not by common.parse.
    args, extra = p.parse_known_args(argv)
    if any(x.startswith("-") for x in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.paths = [*args.paths, *extra]
    setup_logging(args.verbose)
    config = read_config(args)
    with Session(config) as s:
        return _rebuild(s, args.pool, args.paths, dry_run=args.dry_run, yes=args.yes)


def _rebuild(s: Session, pool: str, paths: Sequence[str], *, dry_run: bool, yes: bool) -> int:
    """The verdict shown, then (confirmed, unless dry_run) the records restored, synced,
    and this store made the pool's manager: nothing is written before the confirmation."""
    drv = s.managing_drivers().get(pool)
    if drv is None:
        known = ", ".join(sorted(s.managing_drivers())) or "none"
        raise ReconcileError(f"no pool {pool!r} with a driver in the config (pools: {known})")
    v = judge(s, pool, drv, paths)
    _show(pool, v)
    ident = s.store.identity()
    owner = drv.owner()
    if owner is not None and owner.store != ident.id:
        print(
            f"The pool is managed by record store {owner.store} ({owner.location} on "
            f"{owner.host}); after the rebuild, {ident.location} on {ident.host} manages it."
        )
    verb = "would be" if dry_run else "will be"
    print(
        f"{len(v.restore)} record(s) {verb} restored into {ident.location}, "
        f"{len(v.kept)} kept, {len(v.refused)} refused, "
        f"{len(v.without)} volume(s) without a trusted copy."
    )
    if dry_run:
        print("Dry run: nothing was changed.")
        return EXIT_OK
    if not yes:
        if not sys.stdin.isatty():
            raise ReconcileError("confirm with --yes (standard input is not a terminal)")
        answer = input(f"Type the pool name ({pool}) to go ahead: ")
        if answer.strip() != pool:
            print("Not confirmed; nothing was changed.")
            return EXIT_ERROR
    for r in v.restore:
        s.store.put(r, None)
    s.store.sync()
    drv.take_over()
    print(f"Restored {len(v.restore)} record(s); {ident.location} now manages pool {pool}.")
    return EXIT_OK


def _show(pool: str, v: Verdict) -> None:
    """One line per volume: restored, kept, refused (why), or without a trusted copy."""
    for r in v.restore:
        what = f"disk {r.instance}/{r.disk}" if r.kind.value == "disk" else "cache entry"
        print(
            f"restore {pool}/{r.volume}: {what}, {r.format.value} {format_size(r.virtual_size)}, "
            f"{r.state.value}, generation {r.generation}"
        )
    for r in v.kept:
        print(f"keep {pool}/{r.volume}: the database already has its record")
    for volume, why in v.refused:
        print(f"refuse {pool}/{volume}: {why}; not restored")
    for volume, why in v.without:
        print(f"skip {pool}/{volume}: {why}; left alone")
    if not v.planned:
        print(
            "No manifests given: each copy was checked against itself and the pool only; "
            "pass the manifest directory to check it against the next plan."
        )


def judge(s: Session, pool: str, drv: ManagingDriver, paths: Sequence[str]) -> Verdict:
    """Which of `pool`'s copies `records rebuild` may restore, and why not the others."""
    v = Verdict()
    copies = drv.record_copies()
    v.without = list(copies.without)
    v.refused = list(copies.refused)
    good, bad = s.store.load_all()
    # A record the database holds, readable or not, is never replaced by a copy.
    have = {r.volume for r in good if r.pool == pool} | {b.volume for b in bad if b.pool == pool}
    v.kept = [r for r in copies.records if r.volume in have]
    candidates: dict[str, DiskRecord] = {}
    for r in copies.records:
        if r.volume in have:
            continue
        why = _at_rest(r)
        if why is None:
            candidates[r.volume] = r
        else:
            v.refused.append((r.volume, why))
    desired = s.load(paths) if paths else None
    if desired is not None and desired.failed:
        first = desired.failed[0]
        raise ReconcileError(
            f"{len(desired.failed)} manifest(s) failed to load (first: {first.file}: "
            f"{first.message}); fix them first: a rebuild is checked against every manifest"
        )
    v.planned = desired is not None
    while True:
        refused = _check_set(s, good, candidates)
        if not refused and desired is not None:
            refused = _check_plan(s, pool, drv, desired, candidates)
        if not refused:
            break
        for volume, why in refused.items():
            v.refused.append((volume, why))
            del candidates[volume]
    v.restore = sorted(candidates.values(), key=lambda r: r.volume)
    v.refused.sort()
    return v


def _check_set(
    s: Session, good: Sequence[DiskRecord], candidates: dict[str, DiskRecord]
) -> dict[str, str]:
    """Candidates the set's checks refuse (a backing without its entry's record)."""
    _, bad = validate([*good, *candidates.values()], s.pool_backends())
    mine = {(r.pool, r.volume) for r in candidates.values()}
    return {b.volume: b.error for b in bad if (b.pool, b.volume) in mine}


def _check_plan(
    s: Session, pool: str, drv: ManagingDriver, desired: Desired, cands: dict[str, DiskRecord]
) -> dict[str, str]:
    """Candidates whose disk the next plan (every destroying flag given) would act on."""
    observed = _observed(s, pool, drv, desired, cands)
    opts = PlanOptions(allow_replace=True, prune=True, force=True)
    p = plan(desired, observed, opts)
    refused: dict[str, str] = {}
    for rec in cands.values():
        mine = (rec.instance, rec.disk) if rec.kind is RecordKind.DISK else None
        for a in p.actions:
            touches = {(a.pool, a.volume), *([a.replaces] if a.replaces else [])}
            if a.action not in ALLOWED and (rec.key() in touches or (a.instance, a.disk) == mine):
                refused[rec.volume] = f"the next plan would {a.action.value} it ({a.reason})"
                break
        else:
            for e in p.errors:
                if (e.pool, e.volume) == rec.key() or (mine and (e.instance, e.disk) == mine):
                    refused[rec.volume] = f"the next plan reports: {e.message} [{e.code}]"
                    break
    return refused


def _observed(
    s: Session, pool: str, drv: ManagingDriver, desired: Desired, cands: dict[str, DiskRecord]
) -> Observed:
    """The pools as the next run would see them once the candidates are restored: the
    rebuilt pool is observed whoever manages it now (the rebuild makes this store its
    manager), the candidates are among its records."""
    base = s.observe(desired)
    vols = {r.volume for r in (*base.records, *cands.values()) if r.pool == pool}
    for inst in desired.instances:
        for d in inst.disks:
            if d.spec.pool == pool:
                vols.add(d.volume)
                if d.entry is not None:
                    vols.add(d.entry)
    records = (*base.records, *cands.values())
    was = base.pools.get(pool)
    pools = dict(base.pools)
    try:
        pools[pool] = observe_managed(
            pool,
            drv,
            vols,
            records,
            shared=was.shared if was else False,
            held=was.held if was else {},
        )
    except (PoolError, OSError) as e:
        raise ReconcileError(f"pool {pool} cannot be observed to check the rebuild: {e}") from e
    return Observed(pools, records, base.bad_records)
