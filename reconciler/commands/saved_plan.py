"""A saved plan is a precondition, never a program (DESIGN invariant 8).

`reconcile --dry-run --plan-out FILE PATH...` writes the plan with what it was made from:
a digest of the config and of the manifests as loaded (their validated content), and the
flags that change a plan (--allow-replace, --prune, --force). `reconcile apply FILE
PATH...` takes manifests, config and flags from its own command line, plans again against
the pools as they are now, and applies that fresh plan only if it equals the saved one
action for action: kind, disk, volume, spec, precondition and everything else but the
reason (which is for people, and names heartbeat ages that change by the second). Any
difference refuses the whole plan and is named. Nothing from the file is ever executed,
opened or looked up: its names are only compared.

The file is input that others can write (a CI artifact, a shared directory), so before it
is compared it must be a regular file (a symbolic link is refused: it could be re-pointed
between review and apply; nothing blocks on a FIFO), of at most MAX_PLAN_BYTES, UTF-8 JSON
nested at most MAX_DEPTH deep with at most MAX_VALUES values, no key twice in an object and
no NaN, of the schema below. The file is read and its JSON bounded by reconciler/schema/bounded.py,
as every input is. Anything else is one line of error, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reconciler.diff import PlanOptions
from reconciler.diff.render import FORMAT_VERSION
from reconciler.model import Action, ActionKind, Desired, Plan
from reconciler.model.errors import ReconcileError
from reconciler.schema.bounded import UnsafeInput, load_json, read_regular, shown
from reconciler.schema.common import Preallocation
from reconciler.schema.config import Config
from reconciler.schema.manifest import DiskSpec

# An action takes about 1 KiB as saved: a plan of 30,000 actions (bench/plan.py plans
# 30,000 disks) about 30 MiB.
MAX_PLAN_BYTES = 64 * 1024 * 1024
# A plan nests 7 deep (document, actions, action, patch, operation, its value, source).
MAX_DEPTH = 32
# Bounds the memory a parse takes (a 64 MiB file of `{},` would be 21 million objects);
# an action has 20 to 35 values.
MAX_VALUES = 4_000_000
# The version of what "saved_plan" holds; plans saved before it named a config path.
SAVED_PLAN_VERSION = 2
# At most this many differences are listed (an edited plan may add any number of actions).
MAX_LISTED = 50


class PlanFileError(ReconcileError):
    """A saved plan file that cannot be read, or is not a plan of this schema."""


class PlanMismatch(ReconcileError):
    """A saved plan differs from a fresh plan of the same inputs: nothing was applied."""


# Names as the manifest schema makes them (and host names): printable ASCII, no spaces,
# so a name from the file can be shown in a message as it is.
_Name = Annotated[str, Field(pattern=r"^[!-~]{1,255}$")]
_Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Precondition(BaseModel):
    model_config = _STRICT
    record_generation: Annotated[int, Field(ge=0)] | None
    volume_exists: bool


class _Location(BaseModel):
    model_config = _STRICT
    pool: _Name
    volume: _Name


class _SnapshotMember(BaseModel):
    model_config = _STRICT
    disk: _Name
    volume: _Name
    key: _Name
    generation: Annotated[int, Field(ge=1)]


class _Snapshot(BaseModel):
    model_config = _STRICT
    name: _Name
    disks: list[_SnapshotMember]
    consistency: Literal["frozen", "idle", "crash"] | None = None
    domains: list[_Name] | None = None


class _Action(BaseModel):
    model_config = _STRICT
    action: ActionKind = Field(strict=False)  # from its JSON string
    instance: _Name
    disk: _Name
    pool: _Name
    volume: _Name
    reason: str
    patch: list[dict[str, Any]]
    destructive: bool
    precondition: _Precondition
    spec: dict[str, Any] | None = None
    replaces: _Location | None = None
    holder: _Name | None = None
    preallocation: Preallocation | None = Field(None, strict=False)
    snapshot: _Snapshot | None = None


class _MadeFrom(BaseModel):
    model_config = _STRICT
    version: Annotated[int, Field(ge=SAVED_PLAN_VERSION, le=SAVED_PLAN_VERSION)]
    config_sha256: _Digest
    manifests_sha256: _Digest
    allow_replace: bool
    prune: bool
    force: bool


class _Document(BaseModel):
    model_config = _STRICT
    format_version: Annotated[int, Field(ge=FORMAT_VERSION, le=FORMAT_VERSION)]
    saved_plan: _MadeFrom
    actions: list[_Action]
    errors: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    summary: dict[str, int]


@dataclass(frozen=True)
class SavedPlan:
    file: str
    made_from: _MadeFrom
    actions: tuple[dict[str, Any], ...]  # each as the file has it (validated JSON values)


# --- what a plan is made from -------------------------------------------------------------


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_digest(config: Config) -> str:
    """The config as validated: a comment or the order of keys does not count."""
    return _digest(config.model_dump(mode="json", by_alias=True))


def manifests_digest(desired: Desired) -> str:
    """The manifests as loaded: every instance with its disks (spec, volume, cache entry)
    and every manifest that failed to load. Not the files' paths, so a plan made from
    `manifests/` applies with `/srv/manifests/`."""
    instances = sorted(
        (
            {
                "instance": i.instance,
                "deleted": i.deleted,
                "disks": [
                    {
                        "volume": d.volume,
                        "entry": d.entry,
                        # How a domain attaches a disk changes no step of a plan.
                        "spec": _spec(d.spec),
                    }
                    for d in i.disks
                ],
            }
            for i in desired.instances
        ),
        key=lambda x: str(x["instance"]),
    )
    failed = sorted(
        ({"instance": f.instance, "line": f.line, "message": f.message} for f in desired.failed),
        key=lambda x: json.dumps(x, sort_keys=True),
    )
    return _digest({"instances": instances, "failed": failed})


def _spec(spec: DiskSpec) -> dict[str, Any]:
    """A disk as its manifest has it, but how a domain attaches it (which changes no step
    of a plan), and `snapshots` only where a manifest lists them (so the digests of plans
    saved before the field existed are unchanged)."""
    out: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude={"attach"})
    if out.get("snapshots") is None:
        out.pop("snapshots", None)
    return out


def made_from(config: Config, desired: Desired, options: PlanOptions) -> dict[str, Any]:
    """The `saved_plan` section of a saved plan."""
    return {
        "version": SAVED_PLAN_VERSION,
        "config_sha256": config_digest(config),
        "manifests_sha256": manifests_digest(desired),
        "allow_replace": options.allow_replace,
        "prune": options.prune,
        "force": options.force,
    }


# --- reading the file ---------------------------------------------------------------------


def _what(path: str) -> str:
    return f"saved plan {path}"


def _refuse(path: str, why: str) -> PlanFileError:
    return PlanFileError(f"{_what(path)}: {why}")


def read_bytes(path: str) -> bytes:
    """The bytes of the plan file `path`: a regular file (not a link) of at most
    MAX_PLAN_BYTES. Never blocks: a FIFO or a device is refused before it is opened."""
    try:
        return read_regular(path, what=_what(path), max_bytes=MAX_PLAN_BYTES)
    except FileNotFoundError as e:
        raise _refuse(path, e.strerror or str(e)) from None
    except UnsafeInput as e:
        raise PlanFileError(str(e)) from None


def parse(path: str, data: bytes) -> SavedPlan:
    """The saved plan in `data`, validated; PlanFileError (one line) otherwise."""
    try:
        doc = load_json(
            data,
            what=_what(path),
            max_depth=MAX_DEPTH,
            max_bytes=MAX_PLAN_BYTES,
            max_values=MAX_VALUES,
            unique_keys=True,
            finite=True,
        )
    except UnsafeInput as e:
        raise PlanFileError(str(e)) from None
    if not isinstance(doc, dict) or "format_version" not in doc:
        raise _refuse(path, "is not a plan (save one with reconcile --dry-run --plan-out FILE)")
    if "saved_plan" not in doc:
        raise _refuse(
            path,
            "is not a plan saved by this version of reconcile (a JSON plan, or one saved "
            "before plans were checked against a fresh plan); make a new one",
        )
    try:
        valid = _Document.model_validate(doc)
    except ValidationError as e:
        raise _refuse(path, f"is not a saved plan: {_first_error(e)}") from None
    # The values compared are the file's own, as parsed, now known to be of the schema.
    return SavedPlan(path, valid.saved_plan, tuple(doc["actions"]))


def load(path: str) -> SavedPlan:
    return parse(path, read_bytes(path))


def _first_error(e: ValidationError) -> str:
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{where or 'the document'}: {_one_line(first['msg'])}{more}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# --- comparing ----------------------------------------------------------------------------

# Compared field by field; `reason` is for people (DESIGN: apply never decides from it).
_IGNORED = frozenset({"reason"})


def _subject(a: Mapping[str, Any]) -> str:
    return f"{a['action']} {a['instance']}/{a['disk']} ({a['pool']}/{a['volume']})"


def _field_differences(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted((saved.keys() | fresh.keys()) - _IGNORED):
        old, new = saved.get(name), fresh.get(name)
        if _canonical(old) == _canonical(new):
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for sub in sorted(old.keys() | new.keys()):
                if _canonical(old.get(sub)) != _canonical(new.get(sub)):
                    out.append(
                        f"{name}.{sub}: {_either(old, sub)} in the plan, {_either(new, sub)} now"
                    )
        else:
            out.append(f"{name}: {_either(saved, name)} in the plan, {_either(fresh, name)} now")
    return out


def _either(d: Mapping[str, Any], key: str) -> str:
    return shown(d[key]) if key in d else "absent"


def _canonical(value: Any) -> str:
    # As JSON text: `true` and `1`, `1` and `1.0` are different values here.
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def differences(saved: SavedPlan, fresh: Plan) -> list[str]:
    """Each way the saved plan's actions differ from `fresh`'s, in words (none: equal)."""
    fresh_json = [json.loads(json.dumps(a.to_json())) for a in fresh.actions]
    by_key: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for a in saved.actions:
        by_key.setdefault((a["instance"], a["disk"]), ([], []))[0].append(a)
    for a in fresh_json:
        by_key.setdefault((a["instance"], a["disk"]), ([], []))[1].append(a)
    found: list[str] = []
    for (instance, disk), (olds, news) in by_key.items():
        for old, new in zip(olds, news, strict=False):
            found += [f"{_subject(old)}: {d}" for d in _field_differences(old, new)]
        for old in olds[len(news) :]:
            why = _now(fresh, instance, disk)
            found.append(f"{_subject(old)}: in the plan, but not in a fresh plan{why}")
        for new in news[len(olds) :]:
            found.append(f"{_subject(new)}: in a fresh plan, but not in the plan")
    if not found and [_canonical(_key(a)) for a in saved.actions] != [
        _canonical(_key(a)) for a in fresh_json
    ]:
        found.append("the actions are in another order than a fresh plan's")
    return found


def _key(a: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if k not in _IGNORED}


def _now(fresh: Plan, instance: str, disk: str) -> str:
    """What a fresh plan says of a disk it has no action for (its errors), if anything."""
    said = [
        f"{e.message} [{e.code}]" for e in fresh.errors if (e.instance, e.disk) == (instance, disk)
    ]
    return f" (now: {'; '.join(said)})" if said else " (it has nothing to do there)"


def check(
    saved: SavedPlan,
    fresh: Plan,
    *,
    config: Config,
    desired: Desired,
    options: PlanOptions,
) -> list[Action]:
    """The actions to apply: `fresh`'s, if the saved plan equals it and was made from the
    same config, manifests and flags; else PlanMismatch naming every difference."""
    found: list[str] = []
    made = saved.made_from
    for flag, then, now in (
        ("--allow-replace", made.allow_replace, options.allow_replace),
        ("--prune", made.prune, options.prune),
        ("--force", made.force, options.force),
    ):
        if then != now:
            found.append(
                f"{flag}: {'given' if then else 'not given'} when the plan was made, "
                f"{'given' if now else 'not given'} now"
            )
    if made.config_sha256 != config_digest(config):
        found.append("the config differs from the one the plan was made from (its sha256)")
    if made.manifests_sha256 != manifests_digest(desired):
        found.append("the manifests differ from those the plan was made from (their sha256)")
    found += differences(saved, fresh)
    if found:
        listed = found[:MAX_LISTED]
        if len(found) > MAX_LISTED:
            listed.append(f"... and {len(found) - MAX_LISTED} more")
        raise PlanMismatch(
            f"the saved plan {saved.file} differs from a fresh plan of these manifests and "
            f"this config against the pools now, so none of its {len(saved.actions)} "
            "action(s) were applied; make a new plan (reconcile --dry-run --plan-out FILE "
            f"PATH...) and apply that. {len(found)} difference(s):\n"
            + "\n".join(f"  {line}" for line in listed)
        )
    return list(fresh.actions)


__all__: Sequence[str] = (
    "MAX_DEPTH",
    "MAX_PLAN_BYTES",
    "PlanFileError",
    "PlanMismatch",
    "SavedPlan",
    "check",
    "load",
    "made_from",
)
