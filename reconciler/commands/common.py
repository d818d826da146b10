"""What every subcommand shares: its exit codes, the options each one takes (--config,
-v), the one way a subcommand's arguments are parsed (`parse`: those options added last,
so they close its --help; then logging set up from -v), the config it reads, and the
argparse types and the age format more than one of them uses.

Nothing here opens a connection or writes: a usage error (argparse, exit 2) is raised
before any config is read.
"""

from __future__ import annotations

import argparse
import atexit
import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

from reconciler.commands.exits import EXIT_CHANGES as EXIT_CHANGES
from reconciler.commands.exits import EXIT_ERROR as EXIT_ERROR
from reconciler.commands.exits import EXIT_OK as EXIT_OK
from reconciler.util import logs

if TYPE_CHECKING:
    from reconciler.schema.config import Config


def fast_exit() -> None:
    """Freeze the heap when the process exits, before the interpreter's final collections:
    they walk every object (pydantic's schemas among them) and made a `reconcile wait` that
    had printed its answer take 80-230 ms more to exit on a loaded machine (20-30 ms
    frozen; atexit handlers run before them). What a command leaves is freed by the OS;
    a command run in a longer-lived process (tests) changes nothing there until it
    exits. For the commands a compute service waits on (wait, disks)."""
    atexit.register(gc.freeze)


def setup_logging(verbose: int, *, base: int = logs.WARNING, json_lines: bool = False) -> None:
    """Log lines to stderr (reconciler.util.logs): readable console lines, or (json_lines, off a
    terminal) one JSON object a line, for a service's journal."""
    logs.configure(base - 10 * min(verbose, 2), json_lines=json_lines)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="config file (default: $RECONCILER_CONFIG, else /etc/reconciler/config.yaml)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def parse(
    p: argparse.ArgumentParser,
    argv: Sequence[str],
    *,
    common_on: Sequence[argparse.ArgumentParser] = (),
    base: int = logs.WARNING,
    json_lines: bool = False,
) -> argparse.Namespace:
    """`argv` parsed by `p`, with the common options added last (to `p`, or to each of
    `common_on`: the parsers of a command's own subcommands), and logging set up."""
    for q in common_on or (p,):
        add_common(q)
    args = p.parse_args(argv)
    setup_logging(args.verbose, base=base, json_lines=json_lines)
    return args


def read_config(args: argparse.Namespace) -> Config:
    """The config --config names (else $RECONCILER_CONFIG, else the default path). The
    schema is imported here, once arguments are parsed: a usage error or --help needs
    none of it (0.8 s of imports, measured with python -X importtime)."""
    from reconciler.schema.config import config_path
    from reconciler.schema.load import load_config

    return load_config(config_path(args.config))


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return n


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return v


def human_age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"
