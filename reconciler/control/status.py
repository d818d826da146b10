"""Each instance's status, kept durably in the state directory for `reconcile status`.

Shaped as Kubernetes conditions (`Ready`, `Progressing`, `Degraded`), each with a status
(`True`, `False`, `Unknown`), a CamelCase reason, a message, `lastTransitionTime` (changed
only when the condition's status changes) and `observedGeneration` (the generation of the
manifest the condition was computed from: it grows by one each time the manifest's
content changes). `lastError` and `nextRetry` say what failed and when it is tried again;
a terminal error has no `nextRetry` (it waits for its manifest to change).

One-shot applies write the status too (`record_run`): each instance the run acted on or
found in error, with the loop's reasons (both compose the conditions with
reconciler/control/outcome.py's `decide`, and the status with `status_of`); and an
instance whose last status was not Ready and that the run found with nothing to do
becomes Ready. Dry runs write nothing, and a
run with nothing to do and no errors only reads the file (when there is one).

The status lives in its own SQLite file (`status.sqlite`, WAL) beside the records, so
`reconcile status` reads it while a loop writes it, and losing it loses nothing but
history: the next reconcile of each instance writes it again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.control.outcome import Outcome, applied, apply_failed, decide
from reconciler.model import ProblemCode
from reconciler.model.errors import ReconcileError
from reconciler.schema.bounded import load_json
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir, private_file

if TYPE_CHECKING:
    from reconciler.apply.executor import ApplyResult
    from reconciler.model import Plan, Problem

log = get_logger(__name__)

CONDITIONS = ("Ready", "Progressing", "Degraded")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False", "Unknown"
    reason: str
    message: str
    lastTransitionTime: str  # the Kubernetes names
    observedGeneration: int


@dataclass(frozen=True)
class InstanceStatus:
    instance: str
    generation: int  # of the manifest (0: no manifest seen)
    manifest_sha256: str
    disks: int
    conditions: tuple[Condition, ...] = ()
    lastError: str = ""
    nextRetry: str = ""
    updated: str = ""
    terminal: bool = False  # not retried until the manifest changes

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def is_ready(self) -> bool:
        c = self.condition("Ready")
        return c is not None and c.status == "True"

    def to_json(self) -> dict[str, Any]:
        # What asdict() gives (every field is a plain value), without its deep copies: a
        # one-shot apply of 500 instances spent 0.75 s of 26 in asdict under cProfile.
        d = dict(vars(self))
        d["conditions"] = [dict(vars(c)) for c in self.conditions]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InstanceStatus:
        conds = tuple(Condition(**c) for c in d.get("conditions", ()))
        return cls(**{**d, "conditions": conds})


def with_conditions(
    old: InstanceStatus | None,
    new: InstanceStatus,
    conditions: dict[str, tuple[str, str, str]],
    now: str,
) -> InstanceStatus:
    """`new` with `conditions` (type -> (status, reason, message)); a condition whose status
    did not change keeps its lastTransitionTime."""
    out = []
    for kind in CONDITIONS:
        if kind not in conditions:
            continue
        status, reason, message = conditions[kind]
        before = old.condition(kind) if old else None
        since = before.lastTransitionTime if before and before.status == status else now
        out.append(Condition(kind, status, reason, message, since, new.generation))
    return replace(new, conditions=tuple(out), updated=now)


# How a Ready True condition ends in a row (put_many writes json.dumps(sort_keys=True)).
# Inside a JSON string every quote is escaped, so a message cannot contain it.
_READY_TRUE = '"status": "True", "type": "Ready"}'


@dataclass
class StatusStore:
    path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        try:
            private_dir(self.path.parent)  # 0700, its files 0600 (reconciler/util/statedir.py)
            private_file(self.path)
        except OSError as e:
            raise ReconcileError(f"status database {self.path}: {e.strerror or e}") from None
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=10, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA journal_mode=WAL")
            # Status is rewritten by the next reconcile if lost: no fsync per write.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS status (instance TEXT PRIMARY KEY, data TEXT NOT "
                "NULL) WITHOUT ROWID"
            )
        except sqlite3.Error as e:
            raise ReconcileError(
                f"status database {self.path}: {e} (it only holds status: remove it and the "
                "next reconcile of each instance writes it again)"
            ) from None

    def get(self, instance: str) -> InstanceStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM status WHERE instance=?", (instance,)
            ).fetchone()
        return None if row is None else _parse(row[0])

    def all(self) -> list[InstanceStatus]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM status ORDER BY instance").fetchall()
        out = [_parse(r[0]) for r in rows]
        return [s for s in out if s is not None]

    def not_ready(self) -> list[InstanceStatus]:
        """The statuses whose Ready is not True, without parsing the others (a one-shot
        run with nothing to do reads only these)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM status WHERE instr(data, ?) = 0 ORDER BY instance",
                (_READY_TRUE,),
            ).fetchall()
        out = [_parse(r[0]) for r in rows]
        return [st for st in out if st is not None and not st.is_ready()]

    def put(self, status: InstanceStatus) -> None:
        self.put_many([status])

    def put_many(self, statuses: list[InstanceStatus]) -> None:
        rows = [(s.instance, json.dumps(s.to_json(), sort_keys=True)) for s in statuses]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO status (instance, data) VALUES (?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def delete(self, instance: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM status WHERE instance=?", (instance,))

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


def _parse(data: str) -> InstanceStatus | None:
    try:
        return InstanceStatus.from_json(load_json(data, what="status"))
    except (ValueError, TypeError, KeyError):
        return None  # a damaged row is rewritten by the next reconcile


def tighten(state_dir: Path) -> None:
    """Tighten an existing status database as the records' (reconciler/util/statedir.py): every
    run opens the records, while only an apply that acted opens this one."""
    path = state_dir / "status.sqlite"
    try:
        loose = os.stat(path).st_mode & 0o077
    except OSError:
        return  # none yet, or a problem of its own: the status's to report when opened
    if loose:
        # Only then an fd is opened: closing one drops this process's SQLite locks on
        # the file, which a loop reloading its config holds open.
        with contextlib.suppress(OSError):
            private_file(path)


def record_run(path: Path, p: Plan, result: ApplyResult | None, disks: dict[str, int]) -> None:
    """Write the status a one-shot apply of plan `p` (with `result`, None: nothing was
    applied) gives each instance, as the loop would (outcome.decide): Ready True
    (Converged) when all went well, else Ready False with the reason of the first error
    that may pass by itself (a failed step first, else the first). `disks`: the disks
    each desired instance's manifests name. A one-shot run schedules no retry: it writes
    neither `nextRetry` nor `terminal`, which are the loop's. A status that cannot be
    written is a warning: the disks were made all the same."""
    touched = {a.instance for a in p.actions} | {e.instance for e in p.errors if e.instance}
    if not touched and not path.exists():
        return  # the no-op path: nothing to write, and no file to correct
    try:
        store = StatusStore(path)
        try:
            # Only what may change is read: the instances acted on or in error, and those
            # not Ready (which this run may find converged).
            old = {st.instance: st for st in store.not_ready()}
            for inst in touched - set(old):
                st = store.get(inst)
                if st is not None:
                    old[inst] = st
            outcomes = _run_outcomes(p, result, touched | {i for i in disks if i in old})
            now = now_iso()
            new: list[InstanceStatus] = []
            for inst, o in sorted(outcomes.items()):
                before = old.get(inst)
                if inst not in disks and o.settled.label != "error":
                    store.delete(inst)  # no manifest names it, and its disks are gone
                    continue
                gen, sha = (before.generation, before.manifest_sha256) if before else (0, "")
                new.append(status_of(before, inst, o, gen, sha, disks.get(inst, 0), now=now))
            if new:
                store.put_many(new)
        finally:
            store.close()
    except (ReconcileError, sqlite3.Error) as e:
        log.warning("status.not_written", path=str(path), error=str(e))


def _run_outcomes(p: Plan, result: ApplyResult | None, instances: set[str]) -> dict[str, Outcome]:
    """What a one-shot run did to each of `instances`: its errors (each failed step first,
    the last first), its steps done and whether another host owns it."""
    errors: dict[str, list[Problem]] = {}
    done: dict[str, int] = {}
    for o in result.outcomes if result is not None else ():
        inst = o.action.instance
        if o.status == "failed":
            errors.setdefault(inst, []).insert(0, apply_failed(inst, o.action.disk, o.message))
        elif o.status == "done":
            done[inst] = done.get(inst, 0) + 1
    for e in p.errors:
        if e.instance:
            errors.setdefault(e.instance, []).append(e)
    elsewhere = {w.instance: w.message for w in p.warnings if w.code is ProblemCode.OWNED_ELSEWHERE}
    return {
        inst: decide(
            errors.get(inst, ()),
            done=f"{applied(done.get(inst, 0))} (one-shot run)",
            elsewhere=elsewhere.get(inst),
        )
        for inst in instances
    }


def status_of(
    old: InstanceStatus | None,
    instance: str,
    o: Outcome,
    generation: int,
    sha: str,
    disks: int,
    *,
    now: str,
    next_retry: str = "",
    terminal: bool = False,
) -> InstanceStatus:
    """The status outcome `o` gives an instance whose last status was `old` (the loop's
    and a one-shot run's, one composition)."""
    new = InstanceStatus(
        instance,
        generation,
        sha,
        disks,
        lastError=o.error,
        nextRetry=next_retry,
        terminal=terminal,
    )
    return with_conditions(old, new, o.conditions(), now)
