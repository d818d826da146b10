"""The plain-YAML fast path: whatever it accepts, it reads exactly as the full loader does.

`load_plain` may decline anything (then the full loader runs); what it must never do is
accept a file and make something else of it than yamlload.load_text(track=False): other
data, other types, other lines for the disks, or a file the full loader refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.model.errors import InputError
from reconciler.schema.load import load_manifest
from reconciler.schema.manifest import Manifest
from reconciler.schema.speed.plainyaml import load_plain
from reconciler.schema.write import manifest_yaml
from reconciler.schema.yamlload import Document, load_text
from tests.helpers import EXAMPLES

CORPUS = Path(__file__).resolve().parent / "corpus"
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (True == 1 in Python, not in YAML)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check(text: str) -> Document | None:
    """Hold load_plain to the full loader on `text`; returns what load_plain made of it."""
    doc = load_plain(text.encode("utf-8", "surrogatepass"), "f.yaml")
    if doc is None:
        return None
    try:
        ref = load_text(text, "f.yaml", track=False)
    except InputError as e:
        raise AssertionError(f"accepted a file the loader refuses ({e}):\n{text}") from None
    assert same(doc.data, ref.data), f"{doc.data!r} != {ref.data!r} for:\n{text}"
    assert doc.positions == ref.positions, f"{doc.positions} != {ref.positions}:\n{text}"
    assert doc.key_positions == ref.key_positions
    assert doc.file == ref.file
    return doc


# -- random files from pieces chosen to sit on the subset's edges ------------------------

KEYS = ["name", "disks", "source", "image", "a-b", "x_1", "on", "yes", "<<", "?", "k:", "#k"]
KEYS += ["-k", "disks ", "k" * 1100]
VALUES = [
    "disk", "1GiB", "512 B", "reconciler/v1", "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01",
    "yes", "no", "on", "off", "y", "n", "True", "TRUE", "tRue", "false", "null", "Null",
    "NULL", "~", "0", "12", "012", "0o17", "0x1f", "1_000", "1:20", "+1", "-1", "1.5",
    ".inf", ".", "1e3", "2001-12-14", "=", "a#b", "a #b", "a: b", "a:b", "- a", "[a]",
    "{a: 1}", "&x a", "*x", "!!str a", "!x", "|", ">", "'a'", "'a''b'", "'a # b'", '"a"',
    '"a\\nb"', '"a#b"', '"a\'b"', "'", '"', "a  b", "a\tb", "\u00e9", "a ", "%x", "@x", "`x",
    "1" * 31, "9" * 30, "a,b", "a b c", "~x", "+", ".5", "0.", "<<", "a -b", "a-", "- ",
]  # fmt: skip
COMMENTS = ["", " # c", "#c", "  #c", " #", "\t# c"]
INDENTS = ["", " ", "  ", "   ", "    ", "      ", "\t"]
DASHES = ["", "", "- ", "-  ", "-", "- - "]
SEPARATORS = [": ", ":  ", ":", " : ", ":\t"]
ODD_LINES = ["", "# comment", "  # indented", "---", "--- # c", "...", "%YAML 1.1", "-", "key"]
ODD_LINES += ["   ", "\r", "a: b\r", "- : x", "? a", ": b", "\ufeffk: v", "k: \x7f"]


@st.composite
def entry_line(draw: st.DrawFn) -> str:
    indent = draw(st.sampled_from(INDENTS))
    dash = draw(st.sampled_from(DASHES))
    key = draw(st.sampled_from(KEYS))
    if draw(st.booleans()):
        return f"{indent}{dash}{key}:{draw(st.sampled_from(COMMENTS))}"
    sep = draw(st.sampled_from(SEPARATORS))
    value = draw(st.sampled_from(VALUES))
    trail = draw(st.sampled_from(["", " ", "  "]))
    return f"{indent}{dash}{key}{sep}{value}{trail}{draw(st.sampled_from(COMMENTS))}"


line = st.one_of(entry_line(), entry_line(), entry_line(), st.sampled_from(ODD_LINES))


@SETTINGS
@given(st.lists(line, min_size=1, max_size=12), st.booleans())
@example(["a: 1", "a: 2"], True)
@example(["disks:", "- name: a", "  - b: 1"], True)
@example(["disks:", "  - name: a", "  x: 1"], True)
@example(["a:", "  b: 1", " c: 2"], True)
def test_random_lines(lines: list[str], final_newline: bool) -> None:
    check("\n".join(lines) + ("\n" if final_newline else ""))


# -- random files shaped like manifests, so that most of them are accepted ----------------

PLAIN_VALUES = ["disk", "1GiB", "512 B", "qcow2", "true", "False", "7", "0", "~", "null"]
PLAIN_VALUES += ["ephemeral0", "a b", "reconciler/v1", "x-y.z_1", "+3", "TRUE", "[]", "{}"]
QUOTED = ["'1GiB'", "'a # b'", '"disk"', "''", '"yes"', "'012'", '"a: b"', "'-x'"]
RARE = ["2001-12-14", "1.5", "yes", "012", "a:b", "- x", "&a x", "*a", "!x y", "[a]", "|"]


@st.composite
def node(draw: st.DrawFn, depth: int) -> Any:
    """A value as (kind, content), scalars in their written form."""
    if depth >= 4 or draw(st.integers(0, 2)) == 0:
        pool = draw(st.sampled_from([PLAIN_VALUES] * 5 + [QUOTED] * 2 + [RARE]))
        return ("scalar", draw(st.sampled_from([*pool, ""])))
    if draw(st.integers(0, 2)):
        keys = draw(st.lists(st.sampled_from(["name", "pool", "size", "source", "a"]), max_size=4))
        return ("map", [(k, draw(node(depth + 1))) for k in keys or ["b"]])
    return ("seq", [draw(node(depth + 1)) for _ in range(draw(st.integers(1, 3)))])


@st.composite
def rendered(draw: st.DrawFn) -> str:
    """A random root mapping in block style, with random spacing, comments, blank lines."""
    out: list[str] = []
    step = draw(st.sampled_from([1, 2, 2, 4]))
    indentless = draw(st.booleans())
    dash_gap = draw(st.sampled_from([" ", " ", "  "]))

    def noise() -> None:
        if draw(st.integers(0, 6)) == 0:
            out.append(draw(st.sampled_from(["", "# note", "    # deep note", "  "])))

    def emit_map(items: list[tuple[str, Any]], col: int, first_prefix: str | None) -> None:
        for n, (key, value) in enumerate(items):
            prefix = first_prefix if (n == 0 and first_prefix is not None) else " " * col
            kind, content = value
            comment = draw(st.sampled_from(["", "", " # c", "   #c"]))
            if kind == "scalar":
                gap = draw(st.sampled_from([" ", " ", "  "])) if content else ""
                out.append(f"{prefix}{key}:{gap}{content}{comment}")
            else:
                out.append(f"{prefix}{key}:{comment}")
                noise()
                if kind == "map":
                    emit_map(content, col + step, None)
                else:
                    emit_seq(content, col if indentless else col + step)
            noise()

    def emit_seq(items: list[Any], col: int) -> None:
        for kind, content in items:
            if kind != "map":  # items are mappings, as disks are: no others are in the subset
                kind, content = "map", [("v", (kind, content))]
            emit_map(content, col + 1 + len(dash_gap), " " * col + "-" + dash_gap)
            noise()

    if draw(st.integers(0, 5)) == 0:
        out.append(draw(st.sampled_from(["---", "# head", ""])))
    keys = ["apiVersion", "kind", "disks", "deleted", "x", "disks"]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=5, unique=True))
    emit_map([(k, draw(node(1))) for k in chosen], 0, None)
    return "\n".join(out) + draw(st.sampled_from(["\n", "", "\n\n"]))


SPECIAL = list(" -:#'\"\t[]{}&*!|>%@`,?~\n\r")


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A rendered file with a few random edits: the near misses a fast path gets wrong."""
    text = draw(rendered())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        what = draw(st.integers(0, 3))
        if what == 0:  # insert a character that means something to YAML
            text = (
                text[:at] + draw(st.sampled_from(list(" -:#'\"\t[]{}&*!|>%@`,?~\n\r"))) + text[at:]
            )
        elif what == 1:  # delete one
            text = text[:at] + text[at + 1 :]
        else:  # indent, or dedent, one line
            lines = text.split("\n")
            i = at % len(lines)
            lines[i] = " " + lines[i] if what == 2 else lines[i][1:]
            text = "\n".join(lines)
    return text


@SETTINGS
@given(rendered())
def test_manifest_shaped_files(text: str) -> None:
    check(text)


@SETTINGS
@given(mutated())
@example("disks:\n- name: a\n  x: 1\n y: 2\n")
@example("a:\n  - b: 1\n  c: 2\n")
@example("a: 1 #\n")
@example("a: 'x'#c\n")
def test_near_misses(text: str) -> None:
    check(text)


def test_the_generators_reach_the_fast_path() -> None:
    """Else the tests above would only ever compare None with None."""
    accepted = {"rendered": 0, "mutated": 0}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(rendered(), mutated())
    def count(a: str, b: str) -> None:
        accepted["rendered"] += load_plain(a.encode(), "f") is not None
        accepted["mutated"] += load_plain(b.encode("utf-8", "surrogatepass"), "f") is not None

    count()
    assert accepted["rendered"] > 30 and accepted["mutated"] > 10, accepted


# -- the files this project reads ---------------------------------------------------------


def _files() -> list[Path]:
    return sorted([*(CORPUS / "manifests").iterdir(), *(CORPUS / "valid").iterdir()]) + sorted(
        (EXAMPLES / "manifests").iterdir()
    )


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_and_examples(path: Path) -> None:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert load_plain(raw, "f.yaml") is None
        return
    check(text)


def test_examples_and_written_manifests_take_the_fast_path(tmp_path: Path) -> None:
    """The subset covers what the service writes and the examples: else it buys nothing."""
    for path in sorted((EXAMPLES / "manifests").iterdir()):
        assert check(path.read_text()) is not None, path
        lm = load_manifest(str(path), None)
        manifest = getattr(lm, "manifest", None)
        assert isinstance(manifest, Manifest)
        assert check(manifest_yaml(manifest)) is not None, manifest_yaml(manifest)
