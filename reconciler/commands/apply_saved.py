"""`reconcile apply FILE PATH...`: apply a plan saved with --dry-run --plan-out, as a
precondition, never a list of instructions (DESIGN invariant 8; the file's format and the
comparison are commands/saved_plan.py).

Order: the file is read and checked first, so a malformed one is refused before the
config is read or any pool opened; then the manifests are planned again against the pools
as they are, and that fresh plan is applied only if it equals the saved one. The records
database is loaded whole before the first action: a damaged one stops the run before any
change.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from reconciler.commands import saved_plan
from reconciler.commands.common import EXIT_ERROR, EXIT_OK, parse, read_config
from reconciler.commands.plan import add_jobs, add_plan_flags, apply_actions, options, record_status
from reconciler.control.session import Session


def run(argv: Sequence[str]) -> int:
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
    add_plan_flags(p)  # as given when the plan was made: the plan records them
    add_jobs(p)
    args = parse(p, argv)
    # The file first: a malformed one is refused before anything is opened or observed.
    saved = saved_plan.load(args.plan)
    config = read_config(args)
    flags = options(args, config)
    with Session(config, flags) as s:
        fresh = s.plan(s.load_and_observe(args.paths))
        actions = saved_plan.check(saved, fresh, config=config, desired=s.desired, options=flags)
        if not actions:
            print("The plan has no actions.")
            record_status(s, fresh, None)
            return EXIT_OK
        s.local_store.load_all()  # a damaged records database stops the run before any change
        print(f"Applying {len(actions)} action(s) from {args.plan}...", flush=True)
        result = apply_actions(s, fresh, actions, saved=True, jobs=args.jobs)
    return EXIT_ERROR if result.failed else EXIT_OK
