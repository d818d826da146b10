"""The `reconcile` command. Errors are rendered here, once."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import select
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler import __version__
from reconciler.commands import internal, saved_plan
from reconciler.control.session import Session
from reconciler.diff import PlanOptions
from reconciler.diff.render import to_json, to_markdown, to_text
from reconciler.model import Plan
from reconciler.model.errors import ReconcileError
from reconciler.model.units import format_size
from reconciler.schema.config import Config, config_path
from reconciler.schema.load import load_config
from reconciler.schema.manifestdir import load_manifests
from reconciler.schema.write import write_atomic
from reconciler.util import logs

if TYPE_CHECKING:
    from reconciler.apply.executor import ApplyResult
    from reconciler.control.loop import Loop

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2


def _setup_logging(verbose: int, *, base: int = logs.WARNING, json_lines: bool = False) -> None:
    """Log lines to stderr (reconciler.util.logs): readable console lines, or (json_lines, off a
    terminal) one JSON object a line, for a service's journal."""
    logs.configure(base - 10 * min(verbose, 2), json_lines=json_lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="config file (default: $RECONCILER_CONFIG, else /etc/reconciler/config.yaml)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


DEFAULT_JOBS = 4


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return n


def _jobs(p: argparse.ArgumentParser) -> None:
    # 4: libvirtd serves 5 calls of one client at once (max_client_requests), and making
    # disks from a cache entry gains little beyond 4 at a time on small hosts.
    p.add_argument(
        "-j",
        "--jobs",
        type=_positive,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"apply up to N actions at a time (default {DEFAULT_JOBS}); actions on the "
        "same volume always run in plan order; 1 applies everything in plan order",
    )


def _plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-replace",
        action="store_true",
        help="allow replacing disks whose backend, pool, format or source changed "
        "(destroys their data)",
    )
    p.add_argument(
        "--prune", action="store_true", help="delete disks whose instance no manifest names"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allow a plan that destroys more than the configured share of disks",
    )


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile",
        description="Converge VM instance disks in libvirt pools to their manifests.",
        epilog="Other commands: 'reconcile validate PATH...', 'reconcile apply PLAN PATH...', "
        "'reconcile cache ls|gc', 'reconcile records rebuild POOL', 'reconcile watch DIR', "
        "'reconcile adopt --instance U --disk D --volume P/V --format F PATH...', "
        "'reconcile import-nova --instances-path DIR --images-type T --pool P --out DIR', "
        "'reconcile status', 'reconcile observe --out STATE', 'reconcile schema'.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory")
    p.add_argument("--dry-run", action="store_true", help="plan only; change nothing")
    p.add_argument(
        "--output",
        choices=("text", "json", "markdown"),
        default="text",
        help="markdown: a summary table and a section per instance, for a review comment",
    )
    p.add_argument(
        "--observed",
        metavar="STATE",
        help="with --dry-run: plan against a state exported by 'reconcile observe' on the "
        "host, opening no connection",
    )
    p.add_argument(
        "--max-state-age",
        type=_seconds,
        default=DEFAULT_MAX_STATE_AGE,
        metavar="SECONDS",
        help=f"warn when --observed is older than this (default {DEFAULT_MAX_STATE_AGE:g})",
    )
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when there are no changes, 2 when there are, 1 on errors",
    )
    _plan_flags(p)
    p.add_argument(
        "--plan-out",
        metavar="FILE",
        help="save the plan as JSON for 'reconcile apply FILE PATH...' (with the same "
        "--config and flags), which plans again and applies only if nothing differs",
    )
    _jobs(p)
    p.add_argument("--version", action="version", version=f"reconcile {__version__}")
    _common(p)
    return p


def _options(args: argparse.Namespace, config: Config) -> PlanOptions:
    return PlanOptions(
        allow_replace=args.allow_replace,
        prune=args.prune,
        force=args.force,
        max_delete_percent=config.safety.max_delete_percent,
    )


def _exit(p: Plan, failed: bool, detailed: bool) -> int:
    if p.errors or failed:
        return EXIT_ERROR
    if detailed and p.has_changes:
        return EXIT_CHANGES
    return EXIT_OK


def _apply_summary(result: ApplyResult) -> str:
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for o in result.outcomes:
        counts[o.status] += 1
    return f"Apply: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed."


def cmd_plan(argv: Sequence[str]) -> int:
    # One run builds large object graphs that hold no reference cycles worth collecting;
    # the cyclic collector walking them cost a third of a 30,000-disk plan (bench/plan.py).
    # Only here: a long-lived loop (`watch`) keeps the collector.
    gc.freeze()
    gc.disable()
    try:
        return _plan(argv)
    finally:
        gc.enable()  # for callers that run main() in a longer-lived process
        gc.unfreeze()


def _plan(argv: Sequence[str]) -> int:
    args = _plan_parser().parse_args(argv)
    _setup_logging(args.verbose)
    cfg_path = config_path(args.config)
    config = load_config(cfg_path)
    if args.observed:
        return _plan_observed(args, config)
    with Session(config, _options(args, config)) as s:
        observed = s.load_and_observe(args.paths)
        p = s.plan(observed)
        if args.plan_out:
            made = saved_plan.made_from(config, s.desired, s.options)
            write_atomic(args.plan_out, to_json(p, {"saved_plan": made}))
        if args.dry_run:
            sys.stdout.write(_render(p, args.output, []))
            return _exit(p, False, args.detailed_exitcode)
        if args.output != "text":
            raise ReconcileError(f"--output {args.output} is for --dry-run; apply prints its steps")
        sys.stdout.write(to_text(p))
        s.renew_record_copies(observed)  # untrusted copies of intact records become trusted
        if not p.actions:
            # Hosts sharing a pool: this one is alive, with nothing to do (no write while
            # its heartbeat is fresh: a no-op run changes nothing in the cluster).
            s.store.beat(if_older_than=config.ownership.heartbeat_expiry / 4)
            _record_status(s, p, None)
            return _exit(p, False, args.detailed_exitcode)
        print(f"\nApplying {len(p.actions)} action(s)...", flush=True)
        result = s.executor(saved=False, jobs=args.jobs).apply(p.actions)
        print(_apply_summary(result))
        _record_status(s, p, result)
        return _exit(p, bool(result.failed), args.detailed_exitcode)


def _record_status(s: Session, p: Plan, result: ApplyResult | None) -> None:
    """What `reconcile status` shows for the instances a one-shot apply acted on (see
    status.record_run)."""
    from reconciler.control.status import record_run

    disks = {i.instance: len(i.disks) for i in s.desired.instances}
    record_run(s.config.state_dir() / "status.sqlite", p, result, disks)


DEFAULT_MAX_STATE_AGE = 3600.0


def _render(p: Plan, output: str, header: list[str]) -> str:
    if output == "json":
        return to_json(p)  # the header goes to stderr: the JSON is the host's, byte for byte
    if output == "markdown":
        return to_markdown(p, header)
    return "".join(f"# {line}\n" for line in header) + to_text(p)


def _plan_observed(args: argparse.Namespace, config: Config) -> int:
    """`--dry-run --observed STATE`: the plan the host would make from that state."""
    from reconciler.control.session import plan_offline
    from reconciler.schema import exported as observed_state

    if not args.dry_run or args.plan_out:
        raise ReconcileError(
            "--observed plans for review only (with --dry-run, without --plan-out): a plan "
            "to apply is made on the host, against what its pools hold now"
        )
    observed, info = observed_state.load(args.observed)
    now = datetime.datetime.now(datetime.UTC)
    age = info.age(now)
    header = [
        f"Planned against the observed state {info.file} (host {info.host}, observed "
        f"{info.observed_at.isoformat()}, {_human_age(max(age, 0))} ago)."
    ]
    if age > args.max_state_age:
        header.append(
            f"WARNING: the state is {_human_age(age)} old, more than --max-state-age "
            f"({_human_age(args.max_state_age)}): the host may hold something else by now."
        )
    _, p = plan_offline(config, args.paths, _options(args, config), observed)
    if args.output == "json":
        for line in header:
            print(f"reconcile: {line}", file=sys.stderr)
    sys.stdout.write(_render(p, args.output, header))
    return _exit(p, False, args.detailed_exitcode)


def cmd_observe(argv: Sequence[str]) -> int:
    from reconciler.schema import exported as observed_state

    p = argparse.ArgumentParser(
        prog="reconcile observe",
        description="Export what the pools hold (volumes, the domains using them, every "
        "record) for planning elsewhere with 'reconcile --dry-run --observed STATE'. No "
        "secrets are written: user info and secret-looking query parameters of URLs are "
        "redacted.",
    )
    p.add_argument("--out", required=True, metavar="STATE", help="STATE.json or STATE.json.gz")
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    with Session(config) as s:
        observed = s.observe()
    now = datetime.datetime.now(datetime.UTC)
    observed_state.write(args.out, observed_state.document(observed, config, now))
    n = sum(len(p.volumes or ()) for p in observed.pools.values())
    print(
        f"wrote {args.out}: {len(observed.pools)} pool(s), {n} volume(s), "
        f"{len(observed.records)} record(s)"
    )
    return EXIT_OK


def cmd_apply(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile apply",
        description="Apply a plan saved with --dry-run --plan-out. The file is a "
        "precondition, never a list of instructions: the manifests, config and flags given "
        "here are planned again against the pools as they are, and that fresh plan is "
        "applied only if it equals the saved one action for action (and was made from the "
        "same config, manifests and flags); any difference refuses the whole plan and is "
        f"named. The file must be a regular file (not a link) of at most "
        f"{saved_plan.MAX_PLAN_BYTES // (1024 * 1024)} MiB.",
    )
    p.add_argument("plan", metavar="FILE", help="the plan, saved with --plan-out")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="manifest file or directory: those the plan was made from",
    )
    _plan_flags(p)  # as given when the plan was made: the plan records them
    _jobs(p)
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    # The file first: a malformed one is refused before anything is opened or observed.
    saved = saved_plan.load(args.plan)
    config = load_config(config_path(args.config))
    options = _options(args, config)
    with Session(config, options) as s:
        fresh = s.plan(s.load_and_observe(args.paths))
        actions = saved_plan.check(saved, fresh, config=config, desired=s.desired, options=options)
        if not actions:
            print("The plan has no actions.")
            _record_status(s, fresh, None)
            return EXIT_OK
        s.local_store.load_all()  # a damaged records database stops the run before any change
        print(f"Applying {len(actions)} action(s) from {args.plan}...", flush=True)
        result = s.executor(saved=True, jobs=args.jobs).apply(actions)
        print(_apply_summary(result))
        _record_status(s, fresh, result)
    return EXIT_ERROR if result.failed else EXIT_OK


def cmd_validate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile validate",
        description="Check manifests against the schema and the "
        "config's pools and images; no libvirt.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    loaded, failed = load_manifests(args.paths, config)
    for f in failed:
        for e in f.errors:
            print(f"error: {e}", file=sys.stderr)
    n_err = sum(len(f.errors) for f in failed)
    print(f"{len(loaded)} valid, {len(failed)} invalid manifest(s), {n_err} error(s)")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_schema(argv: Sequence[str]) -> int:
    from reconciler.schema.config import Config as ConfigModel
    from reconciler.schema.manifest import Manifest

    p = argparse.ArgumentParser(
        prog="reconcile schema", description="Print the JSON Schema of the manifest or config."
    )
    p.add_argument("--kind", choices=("manifest", "config"), default="manifest")
    args = p.parse_args(argv)
    model = Manifest if args.kind == "manifest" else ConfigModel
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    print(json.dumps(schema, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_cache(argv: Sequence[str]) -> int:
    from reconciler.commands import cache

    p = argparse.ArgumentParser(
        prog="reconcile cache", description="List or garbage-collect the pools' cache entries."
    )
    sub = p.add_subparsers(dest="what", required=True)
    ls = sub.add_parser("ls", help="list cache entries with size, users and age")
    _common(ls)
    g = sub.add_parser("gc", help="remove entries no disk uses")
    g.add_argument(
        "--min-age",
        default="0s",
        metavar="DURATION",
        help="keep entries used more recently than this (e.g. 2h, 7d)",
    )
    _common(g)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    now = datetime.datetime.now(datetime.UTC)
    with Session(config) as s:
        if args.what == "ls":
            rows = cache.entries(s.store, now)
            print(f"{'POOL':<12} {'ENTRY':<56} {'SIZE':>10} {'USERS':>5} {'AGE':>8}  WHAT")
            for e in rows:
                shown = "-" if e.unused_for == float("inf") else _human_age(e.unused_for)
                state = "" if e.state == "ready" else f" [{e.state}]"
                print(
                    f"{e.pool:<12} {e.volume:<56} {format_size(e.size):>10} {e.users:>5} "
                    f"{shown:>8}  {e.what}{state}"
                )
            print(f"{len(rows)} cache entr{'y' if len(rows) == 1 else 'ies'}")
            return EXIT_OK
        try:
            min_age = cache.parse_duration(args.min_age)
        except ValueError as e:
            raise ReconcileError(str(e)) from None
        s.store.check_writable()  # locked or read-only: stop before removing anything
        removed, kept = cache.gc(s.store, s.managing_drivers(), min_age, now)
        for entry in removed:
            print(f"removed {entry.pool}/{entry.volume} ({entry.what}, {format_size(entry.size)})")
        for entry, why in kept:
            print(f"kept {entry.pool}/{entry.volume}: {why}")
        print(f"Cache gc: {len(removed)} removed, {len(kept)} kept.")
    return EXIT_OK


def cmd_adopt(argv: Sequence[str]) -> int:
    from reconciler.commands.adopt import adopt
    from reconciler.schema.common import Backend, DiskFormat

    p = argparse.ArgumentParser(
        prog="reconcile adopt",
        description="Bring an existing volume under management as the disk a manifest "
        "names. The format is the one you declare, checked, never taken from the volume's "
        "bytes; the record is written and the manifest owns the disk from then on.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory")
    p.add_argument("--instance", required=True, metavar="UUID")
    p.add_argument("--disk", required=True, metavar="NAME")
    p.add_argument("--volume", required=True, metavar="POOL/VOLUME")
    p.add_argument("--format", required=True, choices=[f.value for f in DiskFormat], dest="fmt")
    p.add_argument(
        "--backend",
        choices=[b.value for b in Backend],
        help="the backend the volume is in (default: the manifest's, if it holds FORMAT)",
    )
    p.add_argument("--dry-run", action="store_true", help="check and show; write nothing")
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    pool, sep, volume = args.volume.partition("/")
    if not sep or not pool or not volume or "/" in volume:
        raise ReconcileError(f"--volume {args.volume!r}: expected POOL/VOLUME")
    config = load_config(config_path(args.config))
    with Session(config) as s:
        done = adopt(
            s,
            args.paths,
            instance=args.instance,
            disk=args.disk,
            pool=pool,
            volume=volume,
            fmt=DiskFormat(args.fmt),
            backend=Backend(args.backend) if args.backend else None,
            dry_run=args.dry_run,
        )
    for w in done.warnings:
        print(f"warning: {w}", file=sys.stderr)
    r = done.record
    verb = "would adopt" if args.dry_run else "adopted"
    backing = f", backed by cache entry {r.backing}" if r.backing else ""
    print(
        f"{verb} {r.pool}/{r.volume} as disk {r.instance}/{r.disk}: {r.backend.value} "
        f"{r.format.value} {format_size(r.virtual_size)}{backing}"
    )
    return EXIT_OK


def cmd_import_nova(argv: Sequence[str]) -> int:
    from pathlib import Path

    from reconciler.commands.nova import FILE_IMAGES_TYPES, import_nova

    p = argparse.ArgumentParser(
        prog="reconcile import-nova",
        description="Take a Nova compute host's instance disks under management: one "
        "manifest per instance into --out, a record per disk, the disks moved into POOL "
        "(renamed on one file system, else copied) and their _base files made the pool's "
        "cache entries. Formats come from each instance's disk.info, else from the Nova "
        "config given; never from the disks' bytes. Stop the instances first.",
    )
    p.add_argument("--instances-path", required=True, metavar="DIR")
    p.add_argument("--images-type", required=True, choices=FILE_IMAGES_TYPES)
    p.add_argument("--use-cow-images", action="store_true", help="Nova's use_cow_images")
    p.add_argument("--pool", required=True, metavar="POOL")
    p.add_argument("--out", required=True, metavar="MANIFEST_DIR")
    p.add_argument("--dry-run", action="store_true", help="show what would be done")
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    with Session(config) as s:
        drv = s.managing_drivers().get(args.pool)
        if drv is None:
            raise ReconcileError(f"pool {args.pool} is not in the config, or has no driver")
        rep = import_nova(
            Path(args.instances_path),
            images_type=args.images_type,
            use_cow_images=args.use_cow_images,
            pool=args.pool,
            driver=drv,
            store=s.store,
            out=Path(args.out),
            catalog=dict.fromkeys(config.images, ""),
            dry_run=args.dry_run,
            backends=config.pools[args.pool].backends,
        )
    for line in rep.lines:
        print(line)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR if rep.errors else EXIT_OK


def cmd_records(argv: Sequence[str]) -> int:
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
    _common(rb)
    # PATHs may follow the options too (`rebuild POOL --yes DIR`), which argparse's
    # positionals, taken in one run, would refuse.
    args, extra = p.parse_known_args(argv)
    if any(x.startswith("-") for x in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.paths = [*args.paths, *extra]
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    with Session(config) as s:
        return _rebuild(s, args.pool, args.paths, dry_run=args.dry_run, yes=args.yes)


def _rebuild(s: Session, pool: str, paths: Sequence[str], *, dry_run: bool, yes: bool) -> int:
    from reconciler.commands.rebuild import judge

    drv = s.managing_drivers().get(pool)
    if drv is None:
        known = ", ".join(sorted(s.managing_drivers())) or "none"
        raise ReconcileError(f"no pool {pool!r} with a driver in the config (pools: {known})")
    v = judge(s, pool, drv, paths)
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


def cmd_watch(argv: Sequence[str]) -> int:
    from reconciler.control import loop

    p = argparse.ArgumentParser(
        prog="reconcile watch",
        description="Keep the disks of DIR's manifests converged: on every change of a "
        "manifest, and on a periodic resync that finds drift. Runs until SIGTERM or SIGINT "
        "(steps under way finish); SIGHUP reloads the config.",
    )
    p.add_argument("directory", metavar="DIR", help="the manifest directory")
    p.add_argument(
        "--resync-interval",
        type=_seconds,
        default=loop.DEFAULT_RESYNC,
        metavar="SECONDS",
        help=f"observe every pool again this often (default {loop.DEFAULT_RESYNC:g})",
    )
    p.add_argument(
        "--settle",
        type=_seconds,
        default=loop.DEFAULT_SETTLE,
        metavar="SECONDS",
        help="a disk removed from a manifest is deleted once the file has been closed and "
        f"unchanged this long (default {loop.DEFAULT_SETTLE:g})",
    )
    p.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics")
    p.add_argument("--metrics-address", default="127.0.0.1", help="(default 127.0.0.1)")
    p.add_argument(
        "--prune", action="store_true", help="delete disks whose instance no manifest names"
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=loop.DEFAULT_WORKERS,
        metavar="N",
        help=f"instances reconciled at a time (default {loop.DEFAULT_WORKERS})",
    )
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, base=logs.INFO, json_lines=True)
    if not os.path.isdir(args.directory):
        raise ReconcileError(f"{args.directory}: not a directory")
    return _run_watch(
        loop.Loop(
            config_path(args.config),
            Path(args.directory),
            resync=args.resync_interval,
            settle=args.settle,
            prune=args.prune,
            workers=args.workers,
            metrics_port=args.metrics_port,
            metrics_address=args.metrics_address,
        )
    )


def _run_watch(lp: Loop) -> int:
    """Run the loop; an unexpected exception that kills any of its threads (resync,
    heartbeat, the manifest watcher, ...) stops the whole loop and reaches main()'s edge
    as if raised here. A loop left running without that thread would look alive while
    it no longer resyncs or renews this host's heartbeat (other hosts would then take its
    instances); exit 1 and let the service manager start it again."""
    failed: list[BaseException] = []
    previous = threading.excepthook

    def hook(a: threading.ExceptHookArgs) -> None:
        if a.exc_value is None or isinstance(a.exc_value, SystemExit):
            return
        if not failed:
            name = a.thread.name if a.thread is not None else "?"
            a.exc_value.add_note(f"(in the loop's thread {name})")
            failed.append(a.exc_value)
        lp.request_stop()

    threading.excepthook = hook
    try:
        rc = lp.run()
    finally:
        threading.excepthook = previous
    if failed:
        raise failed[0]
    return rc


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return v


def cmd_status(argv: Sequence[str]) -> int:
    from reconciler.control.status import StatusStore

    p = argparse.ArgumentParser(
        prog="reconcile status",
        description="Each instance's status, as the control loop or the last one-shot apply "
        "that acted on it wrote it.",
    )
    p.add_argument("--output", choices=("text", "json"), default="text")
    _common(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    path = config.state_dir() / "status.sqlite"
    if not path.exists():
        rows = []
    else:
        store = StatusStore(path)
        try:
            rows = store.all()
        finally:
            store.close()
    if args.output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2, sort_keys=True))
        return EXIT_OK
    now = datetime.datetime.now(datetime.UTC)
    print(f"{'INSTANCE':<36}  {'READY':<7}  {'DISKS':>5}  {'REASON':<22}  {'AGE':>6}  MESSAGE")
    for r in rows:
        ready = r.condition("Ready")
        age = "-"
        if ready is not None:
            since = datetime.datetime.fromisoformat(ready.lastTransitionTime)
            age = _human_age((now - since).total_seconds())
        msg = ready.message if ready else ""
        print(
            f"{r.instance:<36}  {ready.status if ready else '-':<7}  {r.disks:>5}  "
            f"{ready.reason if ready else '-':<22}  {age:>6}  {msg[:80]}"
        )
    print(f"{len(rows)} instance(s)")
    return EXIT_OK


def _human_age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"


# `reconcile NAME ARGS...`: each subcommand parses its own arguments. A first argument
# that names none of them is a path of the default command (plan, and apply unless
# --dry-run), so `reconcile --dry-run PATH` keeps working as it always has.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "validate": cmd_validate,
    "schema": cmd_schema,
    "apply": cmd_apply,
    "cache": cmd_cache,
    "records": cmd_records,
    "adopt": cmd_adopt,
    "import-nova": cmd_import_nova,
    "watch": cmd_watch,
    "observe": cmd_observe,
    "status": cmd_status,
}


# The options every subcommand takes (`_common`); given before a subcommand's name they are
# moved after it. `-v` may be repeated (`-vv`).
_GLOBAL_WITH_VALUE = ("--config",)
_GLOBAL_FLAGS = re.compile(r"^(-v+|--verbose)$")
# The default command's options that take a value: what follows them is not a path.
_PLAN_WITH_VALUE = frozenset(
    {"--output", "--observed", "--max-state-age", "--plan-out", "-j", "--jobs", "--config"}
)


def normalise_argv(argv: list[str]) -> list[str]:
    """`reconcile --config C status` as `reconcile status --config C`: global options
    (--config, -v) before a subcommand's name go after it. Any other option before a
    subcommand's name is a usage error, never a plan of a manifest named like a
    subcommand."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv  # what follows are paths
        if not arg.startswith("-") or arg == "-":
            break
        i += 2 if arg in _PLAN_WITH_VALUE else 1
    else:
        return argv
    if i == 0 or argv[i] not in SUBCOMMANDS or {"-h", "--help"} & set(argv[:i]):
        return argv  # a path first, or help asked for: the default command's parser says
    before = argv[:i]
    j = 0
    while j < len(before):
        arg = before[j]
        if arg in _GLOBAL_WITH_VALUE and j + 1 < len(before):
            j += 2
        elif _GLOBAL_FLAGS.match(arg) or arg.startswith("--config="):
            j += 1
        else:
            _plan_parser().error(
                f"{arg} before '{argv[i]}': only --config and -v may come before a "
                f"subcommand's name (try 'reconcile {argv[i]} --help')"
            )
    return [argv[i], *before, *argv[i + 1 :]]


def main(argv: Sequence[str] | None = None) -> int:
    """The one edge where every failure becomes its exit code and at most a line or two:
    ReconcileError is the message as written; anything else is an internal error in one
    line naming a file that holds its traceback (with -v the traceback is printed
    instead), exit 1. Ctrl-C exits 130; SystemExit (argparse's usage errors, exit 2)
    passes through; a reader of stdout that went away (`reconcile ... | head`) ends the
    run quietly, as other Unix tools do."""
    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    _output_never_fails()
    try:
        command = SUBCOMMANDS.get(argv[0]) if argv else None
        # Without a subcommand's name: `reconcile [--dry-run] PATH...`, the default.
        rc = command(argv[1:]) if command is not None else cmd_plan(argv)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at interpreter exit
        return rc
    except ReconcileError as e:
        print(f"reconcile: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("reconcile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if _stdout_gone():
            return _quiet_exit_on_closed_stdout()
        return _internal_error(e, verbose=_verbose(argv))
    except Exception as e:  # the edge: whatever else escaped is rendered here, once
        return _internal_error(e, verbose=_verbose(argv))


def _output_never_fails() -> None:
    """What is printed may quote input (a host name from an exported state, a path from
    a disk.info), and a string decoded from JSON may hold a lone surrogate, which strict
    UTF-8 cannot encode: shown escaped (as stderr already does) rather than failing the
    run halfway through its output."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            reconfigure(errors="backslashreplace")


# 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away.
EXIT_BROKEN_PIPE = 141


def _verbose(argv: Sequence[str]) -> bool:
    """Whether -v/--verbose was given: each subcommand's parser reads it, and the edge
    must know it even when parsing never finished."""
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--"):
            # argparse accepts a unique prefix; `--v`/`--ve` could be --version.
            if len(arg) >= len("--ver") + 1 and "--verbose".startswith(arg):
                return True
        elif len(arg) > 1 and arg.startswith("-") and set(arg[1:]) == {"v"}:
            return True
    return False


def _internal_error(e: BaseException, *, verbose: bool) -> int:
    line = f"reconcile: internal error: {internal.one_line(e)}"
    tb = internal.traceback_text(e)
    where = None if verbose or not tb else internal.keep_traceback(tb)
    if where is None:  # asked for (-v), or nowhere to keep it: better on stderr than lost
        sys.stderr.write(tb)
        print(line, file=sys.stderr)
    else:
        print(f"{line}; traceback in {where}", file=sys.stderr)
    return EXIT_ERROR


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader went away (a BrokenPipeError may
    also come from a child's pipe or a socket, which is a failure to report)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured in memory: it cannot break
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _quiet_exit_on_closed_stdout() -> int:
    # Python flushes stdout once more at exit and would print "Exception ignored ...
    # BrokenPipeError": point the descriptor at /dev/null, so nothing is left to fail.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
