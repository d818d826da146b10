"""What a person sees while a plan is applied: one line per step, a status line on a
terminal, and one log event per step.

Lines from the worker threads are printed one at a time (a lock), each whole; on a
terminal the status line (`... 3 of 9 done, 2 running`) is rewritten under them. Nothing
here decides anything: the executor and the steps hand it what happened.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from reconciler.model.plan import Action, ActionKind
from reconciler.util.logs import get_logger

log = get_logger(__name__)

_VERB = {
    ActionKind.CREATE: "created",
    ActionKind.RESIZE: "resized",
    ActionKind.REPLACE: "replaced",
    ActionKind.UPDATE: "updated",
    ActionKind.DELETE: "deleted",
    ActionKind.RELEASE: "released",
    ActionKind.TAKE_OVER: "taken over",
    ActionKind.HAND_OVER: "handed over",
    ActionKind.MIGRATE: "migrated",
    ActionKind.SNAPSHOT: "snapshot taken",
    ActionKind.DELETE_SNAPSHOT: "snapshot deleted",
}


class Reporter:
    """Prints each step's outcome to `out` (stdout when None, looked up when printing)."""

    def __init__(self, out: TextIO | None, jobs: int) -> None:
        self._out = out
        self.jobs = jobs
        self._lock = threading.Lock()
        self.progress = (0, 0, 0)  # done, running, total: for the terminal's status line

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def starting(self, a: Action) -> None:
        """With one job on a terminal: which step runs now, overwritten by its outcome."""
        if self.jobs == 1 and self.out.isatty():
            self.out.write(f"... {a.action.value} {a.instance}/{a.disk}\r")
            self.out.flush()

    def step(self, a: Action, status: str, msg: str, took: float) -> None:
        subject = f"{a.instance}/{a.disk} ({a.pool}/{a.volume})"
        if status == "done":
            line = f"{_VERB[a.action]} {subject} in {took:.2f}s"
            if msg and a.action is ActionKind.MIGRATE:
                line += f": {msg}"
        elif status == "skipped":
            line = f"skipped {a.action.value} {subject}: {msg}"
        else:
            line = f"FAILED {a.action.value} {subject}: {msg}"
        tty = self.out.isatty()
        with self._lock:
            print(("\x1b[2K" if tty else "") + line, file=self.out, flush=True)
            if tty and self.jobs > 1:
                done, running, total = self.progress
                self.out.write(f"... {done + 1} of {total} done, {running} running\r")
                self.out.flush()
        log.info(
            "apply.step",
            action=a.action.value,
            volume=a.volume,
            pool=a.pool,
            status=status,
            seconds=round(took, 3),
            message=msg,
        )

    def swept(self, pool: str, name: str) -> None:
        print(f"removed temporary file {pool}/{name} left by an interrupted run", file=self.out)

    def interrupted(self, started: int) -> None:
        print(
            f"\ninterrupted: finishing {started} step(s) already under way "
            "(Ctrl-C again to stop at once; the next run finishes or rolls back "
            "whatever is cut short)",
            file=sys.stderr,
            flush=True,
        )
