"""A fast path for the plainest YAML: block mappings and sequences, one entry a line.

Manifests are written by the compute service (write.py: yaml.safe_dump, block style) or by
hand in the same shape. Reading one through libyaml's events costs about 0.1 ms in Python
objects alone, most of what a cold plan spends per manifest (bench/plan.py). `load_plain`
reads that shape with one regular expression (a match a line) and returns exactly what
yamlload.load_text(track=False) returns for it (the data, and the lines of the root's
`disks` items), or None for anything else.

It is a recogniser of a subset, never a judge: it refuses nothing and reports nothing.
Whatever it does not know takes the full loader, so the loader's guarantees hold as they
are. Outside the subset, among others: anchors, aliases, tags, flow collections (but
empty ones), block scalars, multi-line scalars, escapes and quotes within quoted scalars,
complex keys, directives, several documents, tabs, control and non-ASCII characters,
irregular indentation, duplicate keys, and plain scalars that YAML 1.1 reads as anything
but a string, null, true/false or a plain decimal integer. tests/test_plainyaml.py holds
it to the full loader on generated files and on every file of the corpus.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from reconciler.schema.yamlload import MAX_FILE_BYTES, Document

# Every line of a file, as one match each (re.M: a match never crosses a line end). An
# entry: indentation, an optional sequence dash, a plain key (short: libyaml refuses
# implicit keys over 1024 characters), an optional value (a plain scalar of safe
# characters, trailing spaces included; a quoted one, quotes included, without quotes or
# escapes inside; or an empty flow collection, as safe_dump writes a tombstone's disks)
# and an optional comment. A plain scalar here cannot start with an indicator and holds no
# ':' or '#', so where it ends is never in doubt. Else a blank or comment-only line, a
# document start, or any other line, which puts the file outside the subset.
_LINES = re.compile(
    r"^(?:( *)(- +)?([A-Za-z][A-Za-z0-9_-]{0,99}):"
    r"(?: +(?:([A-Za-z0-9_./~+][A-Za-z0-9_./~+ -]*)|('[^'\n]*'|\"[^\"\\\n]*\") *|(\[\]|\{\}) *))?"
    r"(?: *(?<= )#.*| *)"
    r"| *(?:#.*)?|(---(?: +#.*)? *)|(.+))$",
    re.MULTILINE,
)
_OUTSIDE = re.compile(rb"[^\n\x20-\x7e]")  # tabs, CR, control and non-ASCII bytes
_MAX_LEVELS = 8  # far below yamlload.MAX_DEPTH: nesting never decides anything here

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")
# The resolver CSafeLoader uses: what a plain scalar means depends only on its text.
_resolver: Any = yaml.resolver.Resolver()
_OTHER = object()  # a plain scalar this path leaves to the full loader
_UNSEEN = object()
_plain_values: dict[str, Any] = {}  # short text (trailing spaces and all) -> _plain(text)


def _plain(text: str) -> Any:
    """What yamlload's builder makes of a plain scalar, or _OTHER where it would refuse
    it or make more than a string, null, bool or int of it."""
    value: Any = _OTHER
    tag = _resolver.resolve(yaml.ScalarNode, text, (True, False))
    if tag == _STR:
        value = text
    elif tag == _NULL:
        value = None
    elif tag == _BOOL and text.lower() in ("true", "false"):
        value = text.lower() == "true"
    elif tag == _INT and len(text) <= 30 and _DECIMAL.fullmatch(text):
        value = int(text)
    return value


def load_plain(raw: bytes, file: str) -> Document | None:
    """The document in `raw` if it lies within the subset, else None (use yamlload)."""
    if len(raw) > MAX_FILE_BYTES or _OUTSIDE.search(raw):
        return None
    root: dict[str, Any] = {}
    positions: dict[tuple[str | int, ...], tuple[int, int]] = {}
    disks: list[Any] | None = None
    # Open blocks, innermost last: (column, container); a list is a block sequence (its
    # dashes' column), a dict a block mapping (its keys' column). `top` is the innermost.
    blocks: list[tuple[int, Any]] = []
    top_col, top, top_is_map = -1, root, False
    pending: tuple[dict[str, Any], str, int] | None = None  # a key still without its value
    started = False
    values = _plain_values
    for number, row in enumerate(_LINES.findall(raw.decode("ascii")), 1):
        indent, dash, key, plain, quoted, empty, start, other = row
        if not key:
            if other or (start and (started or blocks)):
                return None
            started = started or bool(start)
            continue  # a blank or comment line, or the document's start
        col = len(indent)
        if pending is None and not dash and col == top_col and top_is_map:
            mapping = top  # the next entry of the current mapping: most lines
        else:
            if not blocks:
                if col or dash:
                    return None  # the root must be a block mapping
                blocks.append((0, root))
            if pending is not None:
                owner, owner_key, owner_col = pending
                pending = None
                if dash and col >= owner_col:  # a sequence, indented or not
                    seq: list[Any] = []
                    owner[owner_key] = seq
                    blocks.append((col, seq))
                    if owner is root and owner_key == "disks":
                        disks = seq
                elif not dash and col > owner_col:
                    sub: dict[str, Any] = {}
                    owner[owner_key] = sub
                    blocks.append((col, sub))
                else:
                    owner[owner_key] = None  # an empty value
            while blocks[-1][0] > col:
                blocks.pop()
            top_col, top = blocks[-1]
            if dash:
                if top_col != col or not isinstance(top, list):
                    return None
                inner = col + len(dash)
                if top is disks:
                    positions[("disks", len(top))] = (number, inner + 1)
                mapping = {}
                top.append(mapping)
                blocks.append((inner, mapping))
            else:
                if isinstance(top, list) and top_col == col:
                    blocks.pop()  # a key at the column of an indentless sequence ends it
                    top_col, top = blocks[-1]
                if top_col != col or not isinstance(top, dict):
                    return None
                mapping = top
            if len(blocks) > _MAX_LEVELS:
                return None
            top_col, top = blocks[-1]
            top_is_map = True
        if key in mapping:
            return None
        if plain:
            value = values.get(plain, _UNSEEN)
            if value is _UNSEEN:
                value = _plain(plain.rstrip(" "))
                if len(values) < 100_000 and len(plain) <= 100:  # bounded, as inputs are
                    values[plain] = value
            if value is _OTHER:
                return None
            mapping[key] = value
        elif quoted:
            mapping[key] = quoted[1:-1]
        elif empty:
            mapping[key] = [] if empty == "[]" else {}
        else:
            pending = (mapping, key, top_col)
    if pending is not None:
        pending[0][pending[1]] = None
    if not blocks:
        return None  # empty, or comments only: the full loader says so
    return Document(file, root, positions)
