"""The `reconcile` command. Errors are rendered here, once."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from reconciler import __version__
from reconciler.desired import build_desired
from reconciler.diff import Plan, PlanOptions, plan
from reconciler.drivers import Connections
from reconciler.errors import ReconcileError
from reconciler.observe import observe
from reconciler.render import to_json, to_text
from reconciler.schema.config import Config, config_path
from reconciler.schema.load import load_config, load_manifests
from reconciler.store import open_store

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


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile",
        description="Converge VM instance disks in libvirt pools to their manifests.",
        epilog="Other commands: 'reconcile validate PATH...', 'reconcile schema'.",
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
    p.add_argument("--version", action="version", version=f"reconcile {__version__}")
    _common(p)
    return p


def make_plan(args: argparse.Namespace, config: Config) -> tuple[Plan, dict[str, Any]]:
    loaded, failed = load_manifests(args.paths, config)
    desired = build_desired(loaded, failed)
    store = open_store(config.state_dir())
    conns = Connections()
    try:
        observed = observe(config, store, conns)
    finally:
        conns.close()
        store.close()
    options = PlanOptions(
        allow_replace=args.allow_replace,
        prune=args.prune,
        force=args.force,
        max_delete_percent=config.safety.max_delete_percent,
    )
    return plan(desired, observed, options), {"manifests": len(loaded) + len(failed)}


def cmd_plan(argv: Sequence[str]) -> int:
    args = _plan_parser().parse_args(argv)
    _setup_logging(args.verbose)
    config = load_config(config_path(args.config))
    p, _ = make_plan(args, config)
    if not args.dry_run:
        print("reconcile: applying plans is not available yet; use --dry-run", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(to_json(p) if args.output == "json" else to_text(p))
    if p.errors:
        return EXIT_ERROR
    if args.detailed_exitcode and p.has_changes:
        return EXIT_CHANGES
    return EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "validate":
            return cmd_validate(argv[1:])
        if argv and argv[0] == "schema":
            return cmd_schema(argv[1:])
        return cmd_plan(argv)
    except ReconcileError as e:
        print(f"reconcile: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("reconcile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
