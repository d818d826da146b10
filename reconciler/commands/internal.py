"""Unexpected exceptions (bugs, not ReconcileError): shown to people as one line, their
traceback kept in a private file. The invariant: no failure prints a traceback unless
asked (-v), and none is lost."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback

from reconciler import __version__

# A traceback file's directory: $TMPDIR if set, else /var/tmp (kept across reboots, for a
# post-mortem), else /tmp. Not the state dir: the failure may be the config that names it,
# or the state dir itself (unwritable, missing), and the edge must work whatever failed.
# mkstemp makes the file O_EXCL with a random name and mode 0600, so it is safe in a
# directory others can write and readable only by the user who ran the command (a
# traceback shows paths and values from the run).
TRACEBACK_DIRS = ("/var/tmp", "/tmp")
MESSAGE_LIMIT = 500


def one_line(e: BaseException) -> str:
    """`Type: message`, on one line and at most MESSAGE_LIMIT characters of message."""
    try:
        text = str(e)
    except Exception:  # a __str__ that fails is no reason to lose the rest
        text = ""
    if len(text) > MESSAGE_LIMIT:
        text = text[:MESSAGE_LIMIT] + "..."
    # No control characters: a message may quote input, and an escape sequence or a
    # newline of someone else's file stays visible as such.
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    name = type_name(e)
    return f"{name}: {text}" if text else name


def type_name(e: BaseException) -> str:
    """ValueError, but libvirt.libvirtError or sqlite3.OperationalError: where it came
    from is half of what the line is for."""
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def traceback_text(e: BaseException) -> str:
    """The traceback as Python prints it, or "" where even that fails (out of memory
    again, a broken __str__): the one line must still go out."""
    try:
        return "".join(traceback.format_exception(e))
    except Exception:
        return ""


def keep_traceback(text: str) -> str | None:
    """Write `text` to a new private file (see TRACEBACK_DIRS); its path, or None where
    no directory would take it."""
    for d in [d for d in (os.environ.get("TMPDIR"), *TRACEBACK_DIRS) if d]:
        try:
            fd, path = tempfile.mkstemp(prefix="reconcile-traceback-", suffix=".txt", dir=d)
        except OSError:
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"reconcile {__version__}, pid {os.getpid()}, argv {sys.argv!r}\n")
                f.write(text)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        return path
    return None
