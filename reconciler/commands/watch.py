"""`reconcile watch DIR`: run the control loop (control/loop.py) over DIR's manifests
until SIGTERM or SIGINT; SIGHUP reloads the config. Logs are JSON lines off a terminal,
for a service's journal.

Invariant: the loop never runs on with one of its threads dead. An unexpected exception
in any of them (resync, heartbeat, the manifest watcher, ...) stops the whole loop and
reaches main()'s edge as if raised here, exit 1, so the service manager starts it again:
a loop without its heartbeat thread would look alive while other hosts take its
instances.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.commands.common import parse, positive, seconds
from reconciler.model.errors import ReconcileError
from reconciler.schema.config import config_path
from reconciler.util import logs

if TYPE_CHECKING:
    from reconciler.control.loop import Loop


def run(argv: Sequence[str]) -> int:
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
        type=seconds,
        default=loop.DEFAULT_RESYNC,
        metavar="SECONDS",
        help=f"observe every pool again this often (default {loop.DEFAULT_RESYNC:g})",
    )
    p.add_argument(
        "--settle",
        type=seconds,
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
        type=positive,
        default=loop.DEFAULT_WORKERS,
        metavar="N",
        help=f"instances reconciled at a time (default {loop.DEFAULT_WORKERS})",
    )
    args = parse(p, argv, base=logs.INFO, json_lines=True)
    if not os.path.isdir(args.directory):
        raise ReconcileError(f"{args.directory}: not a directory")
    return _run_loop(
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


def _run_loop(lp: Loop) -> int:
    """Run the loop; the first unexpected exception of any of its threads stops it and is
    raised here (see the module's docstring)."""
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
