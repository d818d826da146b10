"""docs/reference.md, rendered from the JSON Schemas `reconcile schema` prints.

The reference of the manifest and the config is not written by hand: every field, its
type, whether it is required, its default, its description and its constraints (the
schema's patterns, limits and if/then rules) come from `manifest_schema()` and
`config_schema()`, which are made from the models `validate` uses. tests/test_docs.py
fails when docs/reference.md differs from what this renders;
`.venv/bin/python scripts/docs-reference.py` writes it again.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.schema.jsonschema import Schema, config_schema, manifest_schema

REGENERATE = ".venv/bin/python scripts/docs-reference.py"

_LIMITS = (
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minimum", "at least {}"),
    ("maximum", "at most {}"),
    ("exclusiveMinimum", "more than {}"),
    ("exclusiveMaximum", "less than {}"),
    ("multipleOf", "a multiple of {}"),
    ("minItems", "at least {} item(s)"),
    ("maxItems", "at most {} item(s)"),
)


def _code(text: Any) -> str:
    """TEXT as a Markdown code span that survives a table cell."""
    s = text if isinstance(text, str) else json.dumps(text)
    s = s.replace("|", "\\|")  # a table cell's delimiter, even inside a code span (GFM)
    if "`" in s:
        return f"`` {s} ``"
    return f"`{s}`"


def _plain(text: str) -> str:
    """A description on one line of a table cell: its code spans kept, a lone backtick
    (a character list) and a tag-like `<` outside them escaped."""
    text = " ".join(text.split()).replace("|", "\\|")
    if text.count("`") % 2:
        return text.replace("`", "\\`").replace("<", "\\<")
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _matches(pattern: str) -> str:
    if len(pattern) > 120:  # a size's or a rate's: the description says it in words
        return f"matches a pattern of {len(pattern)} characters (see `reconcile schema`)"
    return f"matches {_code(pattern)}"


def _branches(s: Schema) -> list[Schema]:
    """The alternatives of S (anyOf, oneOf), null left out."""
    out: list[Schema] = []
    for b in s.get("anyOf", []) + s.get("oneOf", []):
        if "type" not in b and "$ref" not in b and ("anyOf" in b or "oneOf" in b):
            out += _branches(b)  # alternatives of alternatives (a nullable rate)
        elif b.get("type") != "null":
            out.append(b)
    return out


def _anchor(name: str, kind: str) -> str:
    return f"{name.lower()}-{kind}"


class _Renderer:
    def __init__(self, kind: str, schema: Schema) -> None:
        self.kind = kind
        self.schema = schema
        self.defs: dict[str, Schema] = schema.get("$defs", {})

    def ref(self, s: Schema) -> str:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(name, self.kind)})"

    def type_of(self, s: Schema) -> str:
        """A field's type in words, null left out (see `nullable`)."""
        if "$ref" in s:
            return self.ref(s)
        if "const" in s:
            return _code(s["const"])
        if "enum" in s:
            return "one of " + ", ".join(_code(v) for v in s["enum"] if v is not None)
        if _branches(s) and any("type" in b or "$ref" in b for b in _branches(s)):
            kinds = [self.type_of(b) for b in _branches(s)]
            return " or ".join(dict.fromkeys(kinds)) or "null"
        t = s.get("type")
        if t == "array":
            return f"list of {self.type_of(s.get('items', {}))}"
        if t == "object" and ("additionalProperties" in s or "patternProperties" in s):
            values = s.get("additionalProperties")
            if not isinstance(values, dict):
                values = next(iter(s.get("patternProperties", {}).values()), {})
            return f"map of name to {self.type_of(values)}"
        if isinstance(t, list):
            return " or ".join(t)
        return str(t) if t else "any"

    @staticmethod
    def nullable(s: Schema) -> bool:
        return any(b.get("type") == "null" for b in s.get("anyOf", []))

    def constraints(self, s: Schema) -> list[str]:
        """What S holds its value to, beyond its type, in words."""
        out: list[str] = []
        for key, words in _LIMITS:
            if key in s:
                out.append(words.format(s[key]))
        if s.get("uniqueItems"):
            out.append("each item once")
        if "pattern" in s:
            out.append(_matches(s["pattern"]))
        if isinstance(s.get("not"), dict) and "pattern" in s["not"]:
            out.append(f"does not match {_code(s['not']['pattern'])}")
        names = s.get("propertyNames", {})
        if "pattern" in names:
            out.append(f"names match {_code(names['pattern'])}")
        if "contains" in s and "maxContains" in s:
            out.append(f"at most {s['maxContains']} item(s) with {self.condition(s['contains'])}")
        for sub in s.get("allOf", []):
            if "contains" in sub and "maxContains" in sub:
                out.append(
                    f"at most {sub['maxContains']} item(s) with {self.condition(sub['contains'])}"
                )
        if s.get("type") == "array" and isinstance(s.get("items"), dict):
            out += [f"each item: {c}" for c in self.constraints(s["items"])]
        branches = _branches(s)
        if branches and not any("type" in b or "$ref" in b for b in branches):
            patterns = [b.get("pattern") for b in branches]
            if all(p and len(p) <= 120 for p in patterns):
                out.append("matches " + " or ".join(_code(p) for p in patterns))
            else:
                out.append(f"matches one of {len(branches)} patterns (see `reconcile schema`)")
        elif len(branches) > 1:
            for b in branches:
                said = self.constraints(b)
                if said:
                    out.append(f"as {self.type_of(b)}: {', '.join(said)}")
        elif branches:
            out += self.constraints(branches[0])
        return out

    def value(self, s: Schema) -> str:
        """What a sub-schema of a rule demands, in words."""
        if s.get("type") == "null":
            return "must not be set"
        parts: list[str] = []
        if "const" in s:
            parts.append(f"must be {_code(s['const'])}")
        elif "enum" in s:
            allowed = [v for v in s["enum"] if v is not None]
            parts.append("must be one of " + ", ".join(_code(v) for v in allowed))
        elif "anyOf" in s:
            return " or ".join(self.value(b) for b in s["anyOf"])
        elif s.get("type") == "object":
            parts.append("must be set")
        if isinstance(s.get("items"), dict) and "const" in s["items"]:
            parts.append(f"every item must be {_code(s['items']['const'])}")
        parts += self.constraints(s)
        return ", ".join(parts) or json.dumps(s, sort_keys=True)

    def condition(self, s: Schema) -> str:
        """An `if` (or `contains`) schema in words."""
        said: list[str] = []
        for prop, test in s.get("properties", {}).items():
            if "const" in test:
                said.append(f"{_code(prop)} {_code(test['const'])}")
            elif "contains" in test and "const" in test["contains"]:
                said.append(f"{_code(prop)} including {_code(test['contains']['const'])}")
            elif "pattern" in test:
                said.append(f"{_code(prop)} matching {_code(test['pattern'])}")
            elif test.get("not") == {"type": "null"}:
                said.append(f"{_code(prop)} set")
            else:
                said.append(f"{_code(prop)} {json.dumps(test, sort_keys=True)}")
        return " and ".join(said)

    def outcome(self, s: Schema) -> str:
        said = [f"{_code(p)} {self.value(v)}" for p, v in s.get("properties", {}).items()]
        said += [f"{_code(p)} is required" for p in s.get("required", [])]
        return "; ".join(said) or "nothing more"

    def rules(self, model: Schema) -> list[str]:
        out = []
        for rule in model.get("allOf", []):
            if "if" not in rule:
                continue
            line = f"with {self.condition(rule['if'])}: {self.outcome(rule['then'])}"
            if "else" in rule:
                line += f"; otherwise {self.outcome(rule['else'])}"
            out.append(line)
        return out

    def used_by(self, name: str, models: dict[str, Schema]) -> list[str]:
        target = f"#/$defs/{name}"
        out = []
        for owner, model in models.items():
            for prop, s in model.get("properties", {}).items():
                if target in json.dumps(s):
                    link = f"[{owner}](#{_anchor(owner, self.kind)})"
                    out.append(f"{link}.{_code(prop)}")
        return out

    def model(self, name: str, s: Schema, models: dict[str, Schema]) -> list[str]:
        lines = [f"### {name} ({self.kind})", ""]
        if s.get("description"):
            lines += [_plain(s["description"]), ""]
        used = self.used_by(name, models)
        if used:
            lines += ["Used by " + ", ".join(used) + ".", ""]
        if "enum" in s:
            lines += ["One of " + ", ".join(_code(v) for v in s["enum"]) + ".", ""]
            return lines
        props: dict[str, Schema] = s.get("properties", {})
        if props:
            required = set(s.get("required", []))
            lines += [
                "| field | type | required | default | description and constraints |",
                "|---|---|---|---|---|",
            ]
            for prop, p in props.items():
                kind = self.type_of(p) + (" or null" if self.nullable(p) else "")
                default = _code(p["default"]) if "default" in p else ""
                text = _plain(p.get("description", ""))
                more = self.constraints(p)
                if more:
                    text += (" " if text else "") + f"({'; '.join(more)})"
                need = "yes" if prop in required else ""
                lines.append(f"| {_code(prop)} | {kind} | {need} | {default} | {text} |")
            lines.append("")
        if s.get("additionalProperties") is False:
            lines += ["No other field is accepted.", ""]
        rules = self.rules(s)
        if rules:
            lines += ["Rules:", ""] + [f"- {r}" for r in rules] + [""]
        return lines

    def render(self, title: str) -> list[str]:
        root_name = self.schema["title"]
        models: dict[str, Schema] = {root_name: self.schema, **self.defs}
        lines = [
            f"## {title}",
            "",
            f"`$id`: {_code(self.schema['$id'])}. The document is a [{root_name}]"
            f"(#{_anchor(root_name, self.kind)}).",
            "",
        ]
        top = self.constraints(self.schema)
        if top:
            lines += ["; ".join(top) + ".", ""]
        # The root first, then the rest by name: the order `reconcile schema` keeps.
        for name in [root_name, *sorted(self.defs)]:
            lines += self.model(name, models[name], models)
        return lines


def render() -> str:
    """docs/reference.md's text."""
    lines = [
        "# Reference: the manifest and the config",
        "",
        "<!-- Generated from `reconcile schema` by reconciler/schema/reference.py;"
        f" do not edit. Regenerate: {REGENERATE} -->",
        "",
        "Every field of a manifest (`kind: InstanceStorage`) and of the config (`kind: Config`),"
        " as `reconcile schema` and `reconcile schema --kind config` describe them"
        " (JSON Schema, Draft 2020-12). Sizes are bytes or IEC units (`64MiB`), rates bytes"
        " per second or like `1MiB/s`. `reconcile validate` checks more than the schema can"
        " say: the config's references, a disk name used twice, and what the YAML loader"
        " refuses ([integrating a compute service]"
        "(compute-service.md#editing-manifests-with-a-schema)).",
        "",
    ]
    lines += _Renderer("manifest", manifest_schema()).render("The manifest")
    lines += _Renderer("config", config_schema()).render("The config")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"
