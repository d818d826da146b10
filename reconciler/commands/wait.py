"""`reconcile wait [-m PATH]... INSTANCE... --timeout S`, as `kubectl wait`: exit 0 once
every disk of every instance is ready at its manifest's current content, 1 on a terminal
condition (its reason printed: a manifest that is invalid, missing or marks the instance
deleted, or a plan error that waits for the manifest to change), 2 when the timeout
passes first (what was still not ready printed). Progress goes to stderr as it changes.

It only reads: the disks are made by `reconcile` or `reconcile watch`, which wait does not
start. The timeout is one deadline for all the instances."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from reconciler.commands.common import (
    EXIT_ERROR,
    EXIT_OK,
    fast_exit,
    parse,
    read_config,
    seconds,
)
from reconciler.commands.disks import add_manifests

EXIT_TIMEOUT = 2


def run(argv: Sequence[str]) -> int:
    from reconciler.client import Client, InstanceReadiness, NotReady, WaitTimeout

    fast_exit()

    p = argparse.ArgumentParser(
        prog="reconcile wait",
        description="Wait until every disk of the instances is ready: exit 0 when ready, "
        "1 on a terminal condition, 2 on timeout.",
    )
    add_manifests(p)
    p.add_argument("--timeout", type=seconds, required=True, help="seconds to wait at most")
    p.add_argument(
        "--interval", type=seconds, default=1.0, help="seconds between looks (default 1)"
    )
    args = parse(p, argv)
    config = read_config(args)

    def progress(r: InstanceReadiness) -> None:
        print(f"reconcile wait: {r.describe()}", file=sys.stderr, flush=True)

    deadline = time.monotonic() + args.timeout
    with Client(config, args.manifests) as client:
        for instance in args.instances:
            try:
                got = client.wait(
                    instance,
                    max(0.0, deadline - time.monotonic()),
                    interval=args.interval,
                    progress=progress,
                )
            except NotReady as e:
                print(f"reconcile wait: error: {e}", file=sys.stderr)
                return EXIT_ERROR
            except WaitTimeout as e:
                left = e.readiness.describe()
                print(f"reconcile wait: timed out after {args.timeout:g}s: {left}", file=sys.stderr)
                return EXIT_TIMEOUT
            print(got.describe())
    return EXIT_OK
