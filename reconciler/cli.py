"""The `reconcile` command. Errors are rendered here, once."""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from reconciler import __version__
from reconciler.diff import Action, Plan, PlanOptions
from reconciler.errors import ReconcileError
from reconciler.render import FORMAT_VERSION, to_json, to_text
from reconciler.schema.config import Config, config_path
from reconciler.schema.load import load_config, load_manifests
from reconciler.schema.write import write_atomic
from reconciler.session import Session
from reconciler.units import format_size

if TYPE_CHECKING:
    from reconciler.apply import ApplyResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2

SUBCOMMANDS = ("validate", "schema")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
    )


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


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile",
        description="Converge VM instance disks in libvirt pools to their manifests.",
        epilog="Other commands: 'reconcile validate PATH...', 'reconcile apply PLAN', "
        "'reconcile cache ls|gc', 'reconcile schema'.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory")
    p.add_argument("--dry-run", action="store_true", help="plan only; change nothing")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when there are no changes, 2 when there are, 1 on errors",
    )
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
    p.add_argument(
        "--plan-out", metavar="FILE", help="save the plan as JSON for 'reconcile apply FILE'"
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
    args = _plan_parser().parse_args(argv)
    _setup_logging(args.verbose)
    cfg_path = config_path(args.config)
    config = load_config(cfg_path)
    with Session(config, _options(args, config)) as s:
        p = s.plan(s.load_and_observe(args.paths))
        if args.plan_out:
            save_plan(args.plan_out, p, cfg_path, [os.path.abspath(x) for x in args.paths])
        if args.dry_run:
            sys.stdout.write(to_json(p) if args.output == "json" else to_text(p))
            return _exit(p, False, args.detailed_exitcode)
        if args.output == "json":
            raise ReconcileError("--output json is for --dry-run; apply prints its steps")
        sys.stdout.write(to_text(p))
        if not p.actions:
            return _exit(p, False, args.detailed_exitcode)
        print(f"\nApplying {len(p.actions)} action(s)...", flush=True)
        result = s.executor(saved=False, jobs=args.jobs).apply(p.actions)
        print(_apply_summary(result))
        return _exit(p, bool(result.failed), args.detailed_exitcode)


def save_plan(path: str, p: Plan, cfg_path: str, paths: list[str]) -> None:
    extra = {
        "config": os.path.abspath(cfg_path),
        "config_sha256": _sha256(cfg_path),
        "paths": paths,
    }
    write_atomic(path, to_json(p, extra))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cmd_apply(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile apply",
        description="Apply a plan saved with --dry-run --plan-out, "
        "exactly, or refuse if the state it was made from changed.",
    )
    p.add_argument("plan", metavar="FILE")
    p.add_argument("-v", "--verbose", action="count", default=0)
    _jobs(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        with open(args.plan) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReconcileError(f"cannot read plan {args.plan}: {e}") from None
    if doc.get("format_version") != FORMAT_VERSION or "config" not in doc:
        raise ReconcileError(f"{args.plan} is not a plan saved by this version of reconcile")
    cfg_path = doc["config"]
    if _sha256(cfg_path) != doc["config_sha256"]:
        raise ReconcileError(
            f"the config {cfg_path} changed since the plan was made; make a new plan"
        )
    config = load_config(cfg_path)
    actions = [Action.from_json(a) for a in doc["actions"]]
    if not actions:
        print("The plan has no actions.")
        return EXIT_OK
    with Session(config) as s:
        print(f"Applying {len(actions)} action(s) from {args.plan}...", flush=True)
        result = s.executor(saved=True, jobs=args.jobs).apply(actions)
        print(_apply_summary(result))
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
    from reconciler import cache

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
        removed, kept = cache.gc(s.store, s.managing_drivers(), min_age, now)
        for entry in removed:
            print(f"removed {entry.pool}/{entry.volume} ({entry.what}, {format_size(entry.size)})")
        for entry, why in kept:
            print(f"kept {entry.pool}/{entry.volume}: {why}")
        print(f"Cache gc: {len(removed)} removed, {len(kept)} kept.")
    return EXIT_OK


def _human_age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # One run builds large object graphs that hold no reference cycles worth collecting;
    # the cyclic collector walking them cost a third of a 30,000-disk plan (bench/plan.py).
    gc.freeze()
    gc.disable()
    try:
        if argv and argv[0] == "validate":
            return cmd_validate(argv[1:])
        if argv and argv[0] == "schema":
            return cmd_schema(argv[1:])
        if argv and argv[0] == "apply":
            return cmd_apply(argv[1:])
        if argv and argv[0] == "cache":
            return cmd_cache(argv[1:])
        return cmd_plan(argv)
    except ReconcileError as e:
        print(f"reconcile: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("reconcile: interrupted", file=sys.stderr)
        return 130
    finally:
        gc.enable()  # for callers that run main() in a longer-lived process
        gc.unfreeze()


if __name__ == "__main__":
    sys.exit(main())
