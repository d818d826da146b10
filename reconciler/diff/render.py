"""Render a Plan for people (text, and Markdown for a review comment) and for programs (JSON).

An action's facts are written once: `_where` (its volumes) and `_details` (what it makes or
changes, one line per field or fact) serve the text and the Markdown alike; a new field
of a plan is one line in `_details` (and in `_changes`' list where a record can change it).
JSON is canonical (sorted keys, fixed separators) so the same plan gives the same bytes;
snapshot tests and saved plans rely on that. `describe_source` and `show_value` are also
how the planner's reasons name a source and a changed field, so both read the same.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    ActionKind.SNAPSHOT: "+@",
    ActionKind.DELETE_SNAPSHOT: "-@",
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
    if "snapshot" in source:
        return f"snapshot {source['snapshot']}"
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


def _where(a: Action) -> list[str]:
    """The volume an action acts on, and the one it replaces or moves from."""
    out = [f"volume {a.pool}/{a.volume}"]
    if a.replaces and a.replaces != (a.pool, a.volume):
        verb = "from" if a.action is ActionKind.MIGRATE else "replaces"
        out.append(f"{verb} {a.replaces[0]}/{a.replaces[1]}")
    return out


def _details(a: Action) -> list[str]:
    """What an action makes or changes, after its reason: one line per field or fact (the
    text output and the Markdown's folded part both show these; a new fact is one line)."""
    out: list[str] = []
    if a.recorded is None and a.spec is not None:
        sp = a.spec
        out.append(
            f"backend {sp['backend']}, format {sp['format']}, size "
            f"{show_value('size', sp['size'])}, {show_value('source', sp['source'])}, "
            f"deletionPolicy {sp['deletionPolicy']}"
        )
    else:
        out.extend(_changes(a))
    if a.preallocation is not None:
        out.append(f"preallocation {_allocated(a)}")
    if (enc := _encrypted(a)) is not None:
        out.append(f"encryption {enc}")
    return out


def _headline(a: Action) -> str:
    """The action's first line in the text output: `+ create INSTANCE/DISK`."""
    mark = " (DESTRUCTIVE)" if a.destructive else ""
    return f"{_SYMBOL[a.action]} {a.action.value} {a.instance}/{a.disk}{mark}"


def to_text(plan: Plan) -> str:
    out: list[str] = []
    for a in plan.actions:
        out.append(_headline(a))
        out.extend(f"    {line}" for line in _where(a))
        out.append(f"    reason: {a.reason}")
        out.extend(f"    {line}" for line in _details(a))
        out.append("")
    if plan.errors:
        out.append("Errors:")
        out.extend(f"  ! {_problem(p)}" for p in plan.errors)
        out.append("")
    if plan.warnings:
        out.append("Warnings:")
        out.extend(f"  * {_problem(p)}" for p in plan.warnings)
        out.append("")
    out.append(_summary_line(plan))
    return "\n".join(out) + "\n"


def _summary_line(plan: Plan) -> str:
    s = plan.summary()
    if not plan.actions:
        head = "No changes."
    else:
        head = (
            f"Plan: {s['create']} to create, {s['resize']} to resize, "
            f"{s['replace']} to replace, {s['delete']} to delete, {s['update']} to update, "
            f"{s['release']} to release"
            + (f", {s['migrate']} to migrate" if s.get("migrate") else "")
            + (f", {s['snapshot']} snapshot(s) to take" if s.get("snapshot") else "")
            + (
                f", {s['delete-snapshot']} snapshot(s) to delete"
                if s.get("delete-snapshot")
                else ""
            )
            + f" ({s['destructive']} destructive)."
        )
    return f"{head} {s['errors']} error(s), {s['warnings']} warning(s)."


# -- Markdown: a review comment ---------------------------------------------------------
#
# Read where GitHub (or another forge) renders it, and where raw HTML is stripped: every
# fact is in Markdown, and the only HTML, <details> and <summary> folding an action's
# volume and patch beneath its one-line summary, may vanish without taking anything but
# the folding with it. The comment fits `max_size` (GitHub refuses a comment over 65,536
# characters): when the whole plan does not, the folded parts of actions that destroy
# nothing are left out, then whatever does not fit is counted instead, errors first kept,
# then the actions the delete guard held, then the instances (those with a destructive
# action first), then the warnings.

# Under GitHub's 65,536 characters, with room for what a CI job adds around the plan.
MAX_MARKDOWN = 60_000
# The least limit that holds the summary table, a header and the notes of what is left out.
MIN_MARKDOWN = 2_000
ERROR_MARK = "❌"
DESTRUCTIVE_MARK = "⚠️"


def to_markdown(plan: Plan, header: list[str] | None = None, max_size: int = MAX_MARKDOWN) -> str:
    """The plan for a review comment, at most `max_size` characters (counted as UTF-8
    bytes, never fewer than a forge counts; 0: no limit): a summary table, the errors,
    the actions the delete guard held, each instance's actions under its manifest file
    (one line each, the volume and patch folded beneath), the warnings."""
    head = _md_head(plan, header or [])
    sections = _md_sections(plan, full=True)
    whole = _md_join(head, [], sections)
    if not max_size or _size(whole) <= max_size:
        return whole
    sections = _md_sections(plan, full=False)
    budget = max_size
    for _ in range(8):  # the notes of what was left out grow a little as more is left out
        text = _md_fit(head, sections, budget, max_size)
        if _size(text) <= max_size:
            return text
        budget -= _size(text) - max_size
    return text


def _size(text: str) -> int:
    return len(text.encode())


@dataclass
class _Part:
    """One unit the size limit keeps or leaves out whole: a problem's line, or an
    instance's block of actions; `counts` says what it holds (codes or action kinds)."""

    text: str
    counts: dict[str, int]
    folded: int = 0  # actions whose volume and patch were left out to save room


@dataclass
class _Section:
    title: str
    intro: str
    parts: list[_Part]
    unit: str  # what a part is, for the note of those left out
    of: str = ""  # what a part's counts count, where not the parts themselves
    blocks: bool = False  # parts are paragraphs and lists (else one list's items)
    tail: str = ""  # what was left out of it


def _md_head(plan: Plan, header: list[str]) -> list[str]:
    s = plan.summary()
    out = ["### reconcile plan", ""]
    if header:
        out += [f"> {_md(line)}" for line in header] + [""]
    # A migrate column only where there are migrations (as in the summary).
    kinds = ["create", "resize", "replace", "update", "delete", "release"]
    kinds += [k for k in ("migrate", "snapshot", "delete-snapshot") if k in s]
    cells = [str(s[k]) for k in kinds]
    cells.append(f"**{s['destructive']}** {DESTRUCTIVE_MARK}" if s["destructive"] else "0")
    cells.append(f"**{s['errors']}** {ERROR_MARK}" if s["errors"] else "0")
    cells.append(str(s["warnings"]))
    out += [
        "| " + " | ".join([*kinds, "destructive", "errors", "warnings"]) + " |",
        "|" + "---:|" * (len(kinds) + 3),
        "| " + " | ".join(cells) + " |",
        "",
    ]
    if plan.held:
        out += [
            f"**{DESTRUCTIVE_MARK} The delete guard held {len(plan.held)} destructive "
            "action(s)**: they are not in this plan (see below); `--force` plans them.",
            "",
        ]
    if not plan.actions:
        out += ["No changes.", ""]
    return out


def _md_sections(plan: Plan, *, full: bool) -> list[_Section]:
    errors_of: dict[str, int] = {}
    for p in plan.errors:
        if p.instance:
            errors_of[p.instance] = errors_of.get(p.instance, 0) + 1
    errors = [
        _Part(f"- {ERROR_MARK} **error** {_md_problem(p)}", {p.code.value: 1}) for p in plan.errors
    ]
    warnings = [_Part(f"- warning {_md_problem(p)}", {p.code.value: 1}) for p in plan.warnings]
    held = _instance_parts(plan.held, plan.manifests, errors_of, full=True)
    actions = _instance_parts(plan.actions, plan.manifests, errors_of, full=full)
    return [
        _Section(f"{ERROR_MARK} Errors ({len(plan.errors)})", "", errors, "error(s)"),
        _Section(
            f"{DESTRUCTIVE_MARK} Held by the delete guard ({len(plan.held)})",
            "More disks would be destroyed than `safety.maxDeletePercent` allows (the "
            "`delete-threshold` error), so these actions are left out of the plan; "
            "re-run with `--force` if they are intended.",
            held,
            "instance(s)",
            "held action(s)",
            blocks=True,
        ),
        _Section(
            f"Actions ({len(plan.actions)})", "", actions, "instance(s)", "action(s)", blocks=True
        ),
        _Section(f"Warnings ({len(plan.warnings)})", "", warnings, "warning(s)"),
    ]


def _instance_parts(
    actions: tuple[Action, ...],
    manifests: Mapping[str, str],
    errors_of: Mapping[str, int],
    *,
    full: bool,
) -> list[_Part]:
    """One part per instance, those with a destructive action first (else in plan order):
    its manifest file, then each action's line with its volume and patch folded beneath
    (for a destructive action always; for the others only when `full`)."""
    by_instance: dict[str, list[Action]] = {}
    for a in actions:
        by_instance.setdefault(a.instance, []).append(a)
    order = sorted(by_instance, key=lambda i: not any(a.destructive for a in by_instance[i]))
    parts = []
    for inst in order:
        acts = by_instance[inst]
        file = manifests.get(inst)
        where = f"**{_code(file)}**" if file else "**no manifest**"
        bad = sum(1 for a in acts if a.destructive)
        flags = f", **{bad} destructive** {DESTRUCTIVE_MARK}" if bad else ""
        if errors_of.get(inst):
            flags += f", **{errors_of[inst]} error(s)** {ERROR_MARK} (see Errors)"
        lines = [f"{where}: instance {_code(inst)}, {len(acts)} action(s){flags}", ""]
        counts: dict[str, int] = {}
        folded = 0
        for a in acts:
            counts[a.action.value] = counts.get(a.action.value, 0) + 1
            mark = f" **{DESTRUCTIVE_MARK} DESTRUCTIVE**" if a.destructive else ""
            lines.append(
                f"- {_code(_SYMBOL[a.action])} **{a.action.value}** {_code(a.disk)}{mark}: "
                f"{_md(a.reason)}"
            )
            if full or a.destructive:
                lines += _folded(a)
            else:
                folded += 1
        parts.append(_Part("\n".join(lines).rstrip("\n"), counts, folded))
    return parts


def _folded(a: Action) -> list[str]:
    """An action's volume, what it makes or changes, and its patch, folded beneath its
    line (inside the list item); where HTML is stripped, a plain code block."""
    body = _where(a) + _details(a) + _patch(a)
    fence = "`" * max(3, _longest_backticks("\n".join(body)) + 1)
    return [
        "  <details><summary>volume and patch</summary>",
        "",
        f"  {fence}",
        *(f"  {line}" for line in body),
        f"  {fence}",
        "",
        "  </details>",
        "",
    ]


def _patch(a: Action) -> list[str]:
    """The action's JSON patch of the record's spec, one operation a line, values as
    people read them (sizes in IEC units)."""
    if not a.patch:
        return ["patch: none (the record's spec stays as it is)"]
    out = ["patch:"]
    for op in a.patch:
        path = str(op.get("path", ""))
        line = f"  {op.get('op')} {path}"
        if "from" in op:
            line += f" from {op['from']}"
        if "value" in op:
            field = path.lstrip("/").split("/", 1)[0]
            line += f": {show_value(field, op['value'])}"
        out.append(line)
    return out


def _md_fit(head: list[str], sections: list[_Section], budget: int, limit: int) -> str:
    """The comment with the parts that fit in `budget`, in order up to the first that does
    not, and a note counting what was left out."""
    used = _size(_md_join(head, [], []))
    kept: list[_Section] = []
    full = True
    folded = 0
    note = [f"> **Shortened to fit {limit:,} characters** (`--max-size`):"]
    for sec in sections:
        if not sec.parts:
            continue
        used += _size(f"\n#### {sec.title}\n\n{sec.intro}\n\n")
        take: list[_Part] = []
        for part in sec.parts:
            if full and used + _size(part.text) + 2 <= budget:
                take.append(part)
                used += _size(part.text) + 2
                folded += part.folded
            else:
                full = False
        left = sec.parts[len(take) :]
        tail = f"… {_left_out(sec, left)}." if left else ""
        if left:
            note.append(f"> {_left_out(sec, left)};")
        kept.append(dataclasses.replace(sec, parts=take, tail=tail))
    if folded:
        note.insert(
            1, f"> the volume and patch of {folded:,} action(s) that destroy nothing are left out;"
        )
    note += [
        "> the whole plan is the same command's `--output text` or `--output json`, or "
        "this with `--max-size 0`.",
        "",
    ]
    return _md_join(head, note, kept)


def _left_out(sec: _Section, parts: list[_Part]) -> str:
    """`N more error(s) not shown: 900 manifest-invalid, ...`, or for instances `N more
    instance(s) not shown, with M action(s): 1,564 create`."""
    counts: dict[str, int] = {}
    for p in parts:
        for k, n in p.counts.items():
            counts[k] = counts.get(k, 0) + n
    what = ", ".join(
        f"{n:,} {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    with_ = f", with {sum(counts.values()):,} {sec.of}" if sec.of else ""
    return f"{len(parts):,} more {sec.unit} not shown{with_}: {what}"


def _md_join(head: list[str], note: list[str], sections: list[_Section]) -> str:
    out = list(head) + note
    for sec in sections:
        if not sec.parts and not sec.tail:
            continue
        out += [f"#### {sec.title}", ""]
        if sec.intro:
            out += [sec.intro, ""]
        if sec.parts:
            out += [("\n\n" if sec.blocks else "\n").join(p.text for p in sec.parts), ""]
        if sec.tail:
            out += [sec.tail, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_problem(p: Problem) -> str:
    """`code`: `file:line`: `instance/disk`: message, for a list item (as the text says it)."""
    bits = [_code(p.code.value)]
    if p.file:
        bits.append(_code(p.file + (f":{p.line}" if p.line else "")))
    if p.instance and p.disk:
        bits.append(_code(f"{p.instance}/{p.disk}"))
    elif p.instance:
        bits.append(_code(p.instance))
    elif p.pool and p.volume:
        bits.append(_code(f"{p.pool}/{p.volume}"))
    return ": ".join([*bits, _md(p.message)])


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code(text: str) -> str:
    """`text` as a Markdown code span, whatever backticks or line breaks it holds."""
    text = " ".join(text.splitlines())
    fence = "`" * (_longest_backticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# Markdown's punctuation that could start markup in running text (emphasis, links, code,
# strike-through, tables, HTML); each is shown as itself.
_MD_ESCAPES = {c: "\\" + c for c in "\\`*_[]|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def _md(text: str) -> str:
    """Running text safe inside a Markdown line: no markup, no HTML, no line breaks."""
    return "".join(_MD_ESCAPES.get(c, c) for c in " ".join(text.splitlines()))
