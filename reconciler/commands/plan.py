"""`reconcile [--dry-run] PATH...`, the default command: plan the manifests against the
pools, print the plan, and apply it unless --dry-run. Also what `reconcile apply FILE`
shares with it: the flags that change a plan, -j, and applying a plan's actions with the
summary and the status records that follow.

- The plan goes to stdout as rendered (text, JSON, markdown); with --output json it is the
  host's JSON byte for byte, and any header goes to stderr.
- --plan-out writes the plan with what it was made from (saved_plan.made_from), atomically,
  before anything is applied; applying it later plans again (commands/apply_saved.py).
- --observed STATE plans for review only, against a state exported by `reconcile
  observe`, opening no connection; it refuses to run without --dry-run or with --plan-out.
- A run with nothing to do writes nothing to the pools but this host's heartbeat, and
  that only once a quarter of its expiry has passed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from reconciler import __version__
from reconciler.commands.common import (
    EXIT_CHANGES,
    EXIT_ERROR,
    EXIT_OK,
    add_common,
    fast_exit,
    human_age,
    positive,
    read_config,
    seconds,
    setup_logging,
)
from reconciler.control.session import Session
from reconciler.diff import PlanOptions
from reconciler.diff.render import MAX_MARKDOWN, MIN_MARKDOWN, to_json, to_markdown, to_text
from reconciler.model import Action, Plan
from reconciler.model.errors import ReconcileError
from reconciler.schema.config import Config

if TYPE_CHECKING:
    from reconciler.apply.executor import ApplyResult

DEFAULT_JOBS = 4
DEFAULT_MAX_STATE_AGE = 3600.0


def add_jobs(p: argparse.ArgumentParser) -> None:
    # 4: making disks from a cache entry gains little beyond 4 at a time on small hosts
    # (2 CPUs, loaded: LVM 1.12x/0.90x at 4 against 1.13x/0.72x at 8). More jobs are
    # spread over more libvirt connections (Connections.spread), as libvirtd serves 5
    # calls of one connection at once (max_client_requests).
    p.add_argument(
        "-j",
        "--jobs",
        type=positive,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"apply up to N actions at a time (default {DEFAULT_JOBS}); actions on the "
        "same volume always run in plan order; 1 applies everything in plan order",
    )


def add_plan_flags(p: argparse.ArgumentParser) -> None:
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


def parser() -> argparse.ArgumentParser:
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
        help="markdown: a summary table, the errors, each instance's actions under its "
        "manifest file, the warnings, for a review comment",
    )
    p.add_argument(
        "--max-size",
        type=max_size,
        default=MAX_MARKDOWN,
        metavar="N",
        help="with --output markdown: at most N characters (default "
        f"{MAX_MARKDOWN:,}; GitHub refuses a comment over 65,536); what does not fit is "
        "counted instead of shown; 0: no limit",
    )
    p.add_argument(
        "--observed",
        metavar="STATE",
        help="with --dry-run: plan against a state exported by 'reconcile observe' on the "
        "host, opening no connection",
    )
    p.add_argument(
        "--max-state-age",
        type=seconds,
        default=DEFAULT_MAX_STATE_AGE,
        metavar="SECONDS",
        help=f"warn when --observed is older than this (default {DEFAULT_MAX_STATE_AGE:g})",
    )
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when there are no changes, 2 when there are, 1 on errors",
    )
    add_plan_flags(p)
    p.add_argument(
        "--plan-out",
        metavar="FILE",
        help="save the plan as JSON for 'reconcile apply FILE PATH...' (with the same "
        "--config and flags), which plans again and applies only if nothing differs",
    )
    add_jobs(p)
    p.add_argument("--version", action="version", version=f"reconcile {__version__}")
    add_common(p)
    return p


def max_size(text: str) -> int:
    """--max-size: 0 (no limit) or room for at least the summary and the notes."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n != 0 and n < MIN_MARKDOWN:
        raise argparse.ArgumentTypeError(
            f"expected 0 (no limit) or a whole number of at least {MIN_MARKDOWN:,}, not {text!r}"
        )
    return n


def options(args: argparse.Namespace, config: Config) -> PlanOptions:
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


def run(argv: Sequence[str]) -> int:
    # One run builds large object graphs that hold no reference cycles worth collecting;
    # the cyclic collector walking them cost a third of a 30,000-disk plan (bench/plan.py).
    # Only here: a long-lived loop (`watch`) keeps the collector.
    gc.freeze()
    gc.disable()
    fast_exit()  # and no walk of it all at exit either
    try:
        return _plan(argv)
    finally:
        gc.enable()  # for callers that run main() in a longer-lived process
        gc.unfreeze()


def _plan(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    config = read_config(args)
    if args.observed:
        return _plan_observed(args, config)
    with Session(config, options(args, config)) as s:
        observed = s.load_and_observe(args.paths)
        p = s.plan(observed)
        if args.plan_out:
            # Imported only here: its schema of a saved plan is built when its module is
            # imported, and a plan that is not saved (every apply) needs none of it.
            from reconciler.commands import saved_plan
            from reconciler.schema.write import write_atomic  # tempfile: only to write

            made = saved_plan.made_from(config, s.desired, s.options)
            write_atomic(args.plan_out, to_json(p, {"saved_plan": made}))
        if args.dry_run:
            sys.stdout.write(_render(p, args, []))
            return _exit(p, False, args.detailed_exitcode)
        if args.output != "text":
            raise ReconcileError(f"--output {args.output} is for --dry-run; apply prints its steps")
        sys.stdout.write(to_text(p))
        s.renew_record_copies(observed)  # untrusted copies of intact records become trusted
        if not p.actions:
            # Hosts sharing a pool: this one is alive, with nothing to do (no write while
            # its heartbeat is fresh: a no-op run changes nothing in the cluster).
            s.store.beat(if_older_than=config.ownership.heartbeat_expiry / 4)
            record_status(s, p, None)
            return _exit(p, False, args.detailed_exitcode)
        print(f"\nApplying {len(p.actions)} action(s)...", flush=True)
        result = apply_actions(s, p, p.actions, saved=False, jobs=args.jobs)
        return _exit(p, bool(result.failed), args.detailed_exitcode)


def apply_actions(
    s: Session, p: Plan, actions: list[Action] | tuple[Action, ...], *, saved: bool, jobs: int
) -> ApplyResult:
    """Apply `actions` (those of `p`), print the one-line summary, and record the status
    of the instances acted on."""
    result = s.executor(saved=saved, jobs=jobs).apply(actions)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for o in result.outcomes:
        counts[o.status] += 1
    print(f"Apply: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed.")
    record_status(s, p, result)
    return result


def record_status(s: Session, p: Plan, result: ApplyResult | None) -> None:
    """What `reconcile status` shows for the instances a one-shot apply acted on (see
    status.record_run)."""
    from reconciler.control.status import record_run

    disks = {i.instance: len(i.disks) for i in s.desired.instances}
    record_run(s.config.state_dir() / "status.sqlite", p, result, disks)


def _render(p: Plan, args: argparse.Namespace, header: list[str]) -> str:
    output = args.output
    if output == "json":
        return to_json(p)  # the header goes to stderr: the JSON is the host's, byte for byte
    if output == "markdown":
        return to_markdown(p, header, args.max_size)
    return "".join(f"# {line}\n" for line in header) + to_text(p)


def _plan_observed(args: argparse.Namespace, config: Config) -> int:
    """`--dry-run --observed STATE`: the plan the host would make from that state."""
    from reconciler.control.session import plan_offline
    from reconciler.schema import exported

    if not args.dry_run or args.plan_out:
        raise ReconcileError(
            "--observed plans for review only (with --dry-run, without --plan-out): a plan "
            "to apply is made on the host, against what its pools hold now"
        )
    observed, info = exported.load(args.observed)
    now = datetime.datetime.now(datetime.UTC)
    age = info.age(now)
    header = [
        f"Planned against the observed state {info.file} (host {info.host}, observed "
        f"{info.observed_at.isoformat()}, {human_age(max(age, 0))} ago)."
    ]
    if age > args.max_state_age:
        header.append(
            f"WARNING: the state is {human_age(age)} old, more than --max-state-age "
            f"({human_age(args.max_state_age)}): the host may hold something else by now."
        )
    _, p = plan_offline(config, args.paths, options(args, config), observed)
    if args.output == "json":
        for line in header:
            print(f"reconcile: {line}", file=sys.stderr)
    sys.stdout.write(_render(p, args, header))
    return _exit(p, False, args.detailed_exitcode)
