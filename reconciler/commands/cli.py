"""The `reconcile` command's table: which module runs each subcommand (a first argument
that names none of them is the default command, commands/plan.py), the global options
moved after a subcommand's name, and the one edge where every failure is rendered: a
ReconcileError as its message, anything else as one line naming a file that holds its
traceback (commands/internal.py), each with its exit code."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import select
import sys
from collections.abc import Sequence
from types import ModuleType

from reconciler import __version__
from reconciler.commands.exits import EXIT_ERROR, EXIT_OK
from reconciler.model.errors import ReconcileError

# `reconcile NAME ARGS...`: each subcommand is a module whose `run(argv)` parses its own
# arguments. A module is imported only when its command runs, so `reconcile --version`
# and `reconcile NAME --help` load only what they need (issue 27; all of them at once took
# 2 s, python -X importtime). Add a subcommand here, one line, in this form.
# A first argument that names none of them is a path of the default command
# (commands/plan.py: plan, and apply unless --dry-run), so `reconcile --dry-run PATH` keeps
# working as it always has.
SUBCOMMANDS: dict[str, str] = {
    "validate": "reconciler.commands.validate",
    "schema": "reconciler.commands.schema",
    "apply": "reconciler.commands.apply_saved",
    "cache": "reconciler.commands.cache",
    "records": "reconciler.commands.rebuild",
    "adopt": "reconciler.commands.adopt",
    "import-nova": "reconciler.commands.nova",
    "watch": "reconciler.commands.watch",
    "observe": "reconciler.commands.observe",
    "status": "reconciler.commands.status",
    "disks": "reconciler.commands.disks",
    "wait": "reconciler.commands.wait",
    "export": "reconciler.commands.export",
}
DEFAULT_COMMAND = "reconciler.commands.plan"


def no_pydantic_plugins() -> None:
    """Load no pydantic plugin: pydantic looks its plugins up as entry points of every
    installed distribution when it builds its first model, and importing
    importlib.metadata for that (email, zipfile, csv) and the scan were 6% of the
    instructions of a no-op re-run over 500 disks (cachegrind; issue 27). The reconciler
    uses none, and its validation of input others can write runs no third-party hook.
    PYDANTIC_DISABLE_PLUGINS set to anything but pydantic's "disable all" values (`__all__`,
    `1`, `true`) loads them as pydantic would; with it unset or set to one of those, the
    lookup is replaced by one that finds none (pydantic itself returns none then, but only
    after the import). Only before pydantic has built a model: after, nothing changes."""
    if os.environ.get("PYDANTIC_DISABLE_PLUGINS", "__all__") not in ("__all__", "1", "true"):
        return
    if "pydantic.plugin._loader" not in sys.modules:
        loader = ModuleType("pydantic.plugin._loader", "No pydantic plugins (reconciler CLI).")
        loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
        sys.modules["pydantic.plugin._loader"] = loader


def command_module(name: str | None) -> ModuleType:
    """The module of subcommand `name` (None: the default command), imported now."""
    return importlib.import_module(SUBCOMMANDS[name] if name else DEFAULT_COMMAND)


# The options every subcommand takes (common.add_common); given before a subcommand's name
# they are moved after it. `-v` may be repeated (`-vv`).
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
            command_module(None).parser().error(
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
    no_pydantic_plugins()
    try:
        if argv == ["--version"]:  # what the default command's parser prints, without it
            print(f"reconcile {__version__}")
            return EXIT_OK
        name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        # Without a subcommand's name: `reconcile [--dry-run] PATH...`, the default.
        rc: int = command_module(name).run(argv[1:] if name else argv)
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
    # Imported only on the way out of a failed run: tempfile and traceback are not small,
    # and a run that does not fail (every run the start-up figures of issue 27 time) needs
    # neither.
    from reconciler.commands import internal

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
