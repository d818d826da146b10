"""Render a Plan for people (text) and for programs (JSON).

JSON is canonical (sorted keys, fixed separators) so the same plan gives the same bytes;
snapshot tests and saved plans rely on that. `describe_source` and `show_value` are also
how the planner's reasons name a source and a changed field, so both read the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reconciler.model.plan import Action, ActionKind, Plan, Problem
from reconciler.model.units import format_size
from reconciler.schema.common import Preallocation

FORMAT_VERSION = 1

_SYMBOL = {
    ActionKind.CREATE: "+",
    ActionKind.RESIZE: "~",
    ActionKind.UPDATE: "~",
    ActionKind.REPLACE: "-/+",
    ActionKind.DELETE: "-",
    ActionKind.RELEASE: "-",
    ActionKind.TAKE_OVER: "<",
    ActionKind.HAND_OVER: ">",
    ActionKind.MIGRATE: "->",
}


def plan_document(plan: Plan, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "actions": [a.to_json() for a in plan.actions],
        "errors": [p.to_json() for p in plan.errors],
        "warnings": [p.to_json() for p in plan.warnings],
        "summary": plan.summary(),
    }
    if extra:
        doc.update(extra)
    return doc


def to_json(plan: Plan, extra: Mapping[str, Any] | None = None) -> str:
    return (
        json.dumps(plan_document(plan, extra), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    )


def describe_source(source: Mapping[str, Any]) -> str:
    """A disk's source as people read it: `image ID` or `template KIND labelled 'L'`."""
    if "image" in source:
        return f"image {source['image']}"
    label = f" labelled {source['label']!r}" if source.get("label") else ""
    return f"template {source.get('template')}{label}"


def show_value(field: str, value: Any) -> str:
    """A spec field's value as people read it (in plan text and in an action's reason)."""
    if field == "size" and isinstance(value, int):
        return format_size(value)
    if field == "source" and isinstance(value, Mapping):
        return describe_source(value)
    return str(value)


def _changes(a: Action) -> list[str]:
    before = a.recorded or {}
    after = a.spec or {}
    lines = []
    for field in ("backend", "pool", "format", "size", "source", "deletionPolicy"):
        old, new = before.get(field), after.get(field)
        if old == new:
            continue
        if old is None:
            lines.append(f"+ {field}: {show_value(field, new)}")
        elif new is None:
            lines.append(f"- {field}: {show_value(field, old)}")
        else:
            lines.append(f"~ {field}: {show_value(field, old)} -> {show_value(field, new)}")
    return lines


# What each preallocation does to the volume an action makes or grows, as the plan says it.
_PREALLOCATED = {
    Preallocation.METADATA: "its qcow2 tables allocated",
    Preallocation.FALLOC: "every block reserved (fallocate)",
    Preallocation.FULL: "every block written with zeros",
}


def _allocated(a: Action) -> str:
    """`MODE: what it does` for an action whose volume is preallocated."""
    assert a.preallocation is not None
    what = _PREALLOCATED[a.preallocation]
    if a.action is ActionKind.RESIZE:
        what = f"{what} in the new part, as the disk was made"
    return f"{a.preallocation.value}: {what}"


def _encrypted(a: Action) -> str | None:
    """What the plan says of an action's encryption (None: its disk is not encrypted)."""
    enc = a.spec.get("encryption") if a.spec is not None else None
    if not isinstance(enc, dict):
        return None
    if a.action in (ActionKind.CREATE, ActionKind.REPLACE):
        return (
            f"{enc.get('format')}: a new random key, kept only in a private libvirt secret; "
            "the secret is undefined when the disk is deleted"
        )
    return f"{enc.get('format')}"


def _problem(p: Problem) -> str:
    where = ""
    if p.file:
        where = p.file + (f":{p.line}" if p.line else "") + ": "
    subject = ""
    if p.instance and p.disk:
        subject = f"{p.instance}/{p.disk}: "
    elif p.instance:
        subject = f"{p.instance}: "
    elif p.pool and p.volume:
        subject = f"{p.pool}/{p.volume}: "
    return f"{where}{subject}{p.message} [{p.code}]"


def to_text(plan: Plan) -> str:
    out: list[str] = []
    for a in plan.actions:
        mark = " (DESTRUCTIVE)" if a.destructive else ""
        out.append(f"{_SYMBOL[a.action]} {a.action.value} {a.instance}/{a.disk}{mark}")
        out.append(f"    volume {a.pool}/{a.volume}")
        if a.replaces and a.replaces != (a.pool, a.volume):
            verb = "from" if a.action is ActionKind.MIGRATE else "replaces"
            out.append(f"    {verb} {a.replaces[0]}/{a.replaces[1]}")
        out.append(f"    reason: {a.reason}")
        if a.recorded is None and a.spec is not None:
            sp = a.spec
            out.append(
                f"    backend {sp['backend']}, format {sp['format']}, size "
                f"{show_value('size', sp['size'])}, {show_value('source', sp['source'])}, "
                f"deletionPolicy {sp['deletionPolicy']}"
            )
        else:
            out.extend(f"    {line}" for line in _changes(a))
        if a.preallocation is not None:
            out.append(f"    preallocation {_allocated(a)}")
        if (enc := _encrypted(a)) is not None:
            out.append(f"    encryption {enc}")
        out.append("")
    if plan.errors:
        out.append("Errors:")
        out.extend(f"  ! {_problem(p)}" for p in plan.errors)
        out.append("")
    if plan.warnings:
        out.append("Warnings:")
        out.extend(f"  * {_problem(p)}" for p in plan.warnings)
        out.append("")
    s = plan.summary()
    if not plan.actions:
        head = "No changes."
    else:
        head = (
            f"Plan: {s['create']} to create, {s['resize']} to resize, "
            f"{s['replace']} to replace, {s['delete']} to delete, {s['update']} to update, "
            f"{s['release']} to release"
            + (f", {s['migrate']} to migrate" if s.get("migrate") else "")
            + f" ({s['destructive']} destructive)."
        )
    out.append(f"{head} {s['errors']} error(s), {s['warnings']} warning(s).")
    return "\n".join(out) + "\n"


def to_markdown(plan: Plan, header: list[str] | None = None) -> str:
    """The plan for a review comment: a summary table, then one collapsible section per
    instance with each action, its reason and its JSON patch."""
    s = plan.summary()
    out: list[str] = ["### reconcile plan", ""]
    out.extend(f"> {line}" for line in header or ())
    if header:
        out.append("")
    # A migrate column only where there are migrations (as in the summary).
    mig_head, mig_rule, mig_cell = (
        (" migrate |", "---:|", f" {s['migrate']} |") if "migrate" in s else ("", "", "")
    )
    out += [
        "| create | resize | replace | update | delete | release |"
        + mig_head
        + " destructive | errors | warnings |",
        "|---:|---:|---:|---:|---:|---:|" + mig_rule + "---:|---:|---:|",
        f"| {s['create']} | {s['resize']} | {s['replace']} | {s['update']} | {s['delete']} "
        f"| {s['release']} |{mig_cell} "
        f"{'**' + str(s['destructive']) + '** ⚠️' if s['destructive'] else 0} "
        f"| {s['errors']} | {s['warnings']} |",
        "",
    ]
    if not plan.actions:
        out += ["No changes.", ""]
    by_instance: dict[str, list[Action]] = {}
    for a in plan.actions:
        by_instance.setdefault(a.instance, []).append(a)
    for inst, actions in by_instance.items():
        bad = sum(1 for a in actions if a.destructive)
        flag = f", {bad} destructive ⚠️" if bad else ""
        out += [
            "<details>",
            f"<summary><code>{inst}</code>: {len(actions)} action(s){flag}</summary>",
            "",
        ]
        for a in actions:
            mark = " **(DESTRUCTIVE)**" if a.destructive else ""
            out.append(
                f"- `{_SYMBOL[a.action]}` **{a.action.value}** `{a.disk}`{mark}: "
                f"volume `{a.pool}/{a.volume}`"
            )
            if a.replaces and a.replaces != (a.pool, a.volume):
                verb = "from" if a.action is ActionKind.MIGRATE else "replaces"
                out.append(f"  - {verb} `{a.replaces[0]}/{a.replaces[1]}`")
            out.append(f"  - reason: {_md(a.reason)}")
            if a.preallocation is not None:
                out.append(f"  - preallocation {_md(_allocated(a))}")
            if (enc := _encrypted(a)) is not None:
                out.append(f"  - encryption {_md(enc)}")
            out += ["", "  ```json"]
            out += [
                f"  {line}"
                for line in json.dumps(list(a.patch), indent=2, sort_keys=True).splitlines()
            ]
            out += ["  ```", ""]
        out += ["</details>", ""]
    for title, problems in (("Errors", plan.errors), ("Warnings", plan.warnings)):
        if problems:
            out += [f"#### {title}", ""]
            out += [f"- {_md(_problem(p))}" for p in problems]
            out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    """Text safe inside a Markdown list item (no stray markup, no HTML)."""
    return (
        text.replace("\\", "\\\\")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("*", "\\*")
        .replace("_", "\\_")
        .replace("|", "\\|")
    )
