"""A strict YAML loader that remembers where every value came from.

Manifests are hand-edited by operators and written by a service, so the loader refuses
everything that makes a file mean something other than what it shows: anchors, aliases,
merge keys, explicit tags, duplicate keys, several documents, YAML 1.1's octal and base-60
numbers and yes/no/on/off booleans. It also bounds size and nesting so a hostile file
cannot exhaust memory. Every value's 1-based line and column is kept, keyed by its path
(and, for mapping entries, the key's own position), so schema errors name file, line and
field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler.model.errors import InputError, Location
from reconciler.schema.readfile import MAX_FILE_BYTES as MAX_FILE_BYTES
from reconciler.schema.readfile import read_regular

MAX_DEPTH = 32

Path = tuple[str | int, ...]

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")
# libyaml counts these as line breaks, editors mostly do not: line numbers would drift.
_ODD_BREAKS = {"\u2028": "U+2028", "\u2029": "U+2029", "\x85": "U+0085"}
_CONTEXTS_AT_START = ("while scanning a", "while parsing a flow")
# libyaml's text for its own nesting limit (libyaml 0.2.5 of PyYAML 6.0.3+ wheels: 1000).
_LIBYAML_DEPTH = "exceeded maximum nesting depth"


@dataclass
class Document:
    """A loaded YAML document: its data and where each value (and key) stood."""

    file: str
    data: Any
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def location(self, path: Path) -> Location:
        """Where the entry at `path` is written (its key, for a mapping entry), or the
        nearest written ancestor."""
        p = tuple(path)
        while p:
            pos = self.key_positions.get(p) or self.positions.get(p)
            if pos is not None:
                return Location(self.file, pos[0], pos[1])
            p = p[:-1]
        pos = self.positions.get(())
        return Location(self.file, pos[0] if pos else 1, pos[1] if pos else None)


def load_file(
    path: str, display: str | None = None, *, track: bool = True, follow: bool = False
) -> Document:
    """Read (reconciler/schema/readfile.py: a regular file only, never blocking, at most
    MAX_FILE_BYTES) and parse one YAML file. `follow` allows the path to be a symbolic
    link (the config); a manifest never is."""
    name = display or path
    raw = read_regular(path, follow=follow, display=name).data
    return load_bytes(raw, name, track=track)


def load_bytes(raw: bytes, name: str, *, track: bool = True) -> Document:
    """Parse one YAML file's bytes, as read by read_regular."""
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(
            f"{len(raw)} bytes, more than the {MAX_FILE_BYTES} allowed", Location(name)
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError("file is not valid UTF-8", Location(name, line)) from e
    return load_text(text, name, track=track)


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def load_text(text: str, file: str, *, track: bool = True) -> Document:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise InputError(f"{size} bytes, more than the {MAX_FILE_BYTES} allowed", Location(file))
    for ch, name in _ODD_BREAKS.items():
        i = text.find(ch)
        if i >= 0:
            raise InputError(
                f"invalid YAML: the file contains {name}, which YAML counts as a line break; "
                "remove it",
                Location(file, _line_of(text, i)),
            )
    try:
        loader = _Loader(text)
    except yaml.YAMLError as e:  # pragma: no cover - the C reader fails lazily
        raise InputError(f"invalid YAML: {e}", Location(file)) from e
    builder = _Builder(loader, file, track)
    try:
        return builder.document()
    except yaml.reader.ReaderError as e:
        line = _line_of(text, e.position)
        raise InputError(
            f"invalid YAML: control characters are not allowed (found #x{e.character:02x})",
            Location(file, line),
        ) from None
    except yaml.MarkedYAMLError as e:
        if e.problem == _LIBYAML_DEPTH:
            raise _depth_error(e, file, builder.at) from None
        raise _syntax_error(e, text, file) from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", Location(file)) from None
    finally:
        loader.dispose()


def _depth_error(e: yaml.MarkedYAMLError, file: str, at: Path) -> InputError:
    """libyaml's own nesting limit, hit before ours (PyYAML 6.0.3 and later bundle a libyaml
    that stops at 1000 levels, and its scanner reads a flow collection ahead of the events
    the builder sees). The path is as far as the builder got: the keys that lead there."""
    mark = e.problem_mark or e.context_mark
    where = (e.context or "").removeprefix("while increasing ").removesuffix(" level")
    what = f" ({where} collections)" if where in ("flow", "block") else ""
    message = (
        f"nesting deeper than libyaml's own limit{what}; manifests nest at most {MAX_DEPTH} levels"
    )
    loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
    return InputError(message, loc, render_path(at) or None)


def _syntax_error(e: yaml.MarkedYAMLError, text: str, file: str) -> InputError:
    """Name the line an operator has to fix: for an unclosed quote or bracket, or a key
    missing its ':', that is where it starts, not where the parser gave up."""
    mark = e.problem_mark
    at_start = (e.context or "").startswith(_CONTEXTS_AT_START) and "tab" not in (e.problem or "")
    if e.context_mark is not None and at_start:
        mark = e.context_mark
    if mark is None:
        mark = e.context_mark
    problem = e.problem or e.context or "malformed YAML"
    if mark is e.context_mark and e.context and e.problem:
        problem = f"{e.problem} ({e.context.removeprefix('while ')} that starts here)"
    pm = e.problem_mark
    if pm is not None and 0 <= pm.index < len(text) and text[pm.index] == "\t":
        problem += " (a tab: YAML indentation must be spaces)"
    if mark is None:
        return InputError(f"invalid YAML: {problem}", Location(file))
    last = text.count("\n") + (0 if text.endswith("\n") else 1)
    line = min(mark.line + 1, max(last, 1))
    return InputError(f"invalid YAML: {problem}", Location(file, line, mark.column + 1))


_StreamEnd = yaml.StreamEndEvent
_Scalar = yaml.ScalarEvent
_SeqStart = yaml.SequenceStartEvent
_SeqEnd = yaml.SequenceEndEvent
_MapStart = yaml.MappingStartEvent
_MapEnd = yaml.MappingEndEvent
_Alias = yaml.AliasEvent

# What PyYAML's resolver makes of a plain scalar depends only on its text; remember it.
_resolved: dict[str, str] = {}


class _Builder:
    """Builds plain data from libyaml's events.

    With `track`, every value's (and key's) position and path is kept, for error messages.
    Without, only the lines of the items of the root's `disks` list are (a plan names each
    disk's line), which makes a clean load much cheaper; a file that fails in any way is
    loaded again, tracked, to say where.
    """

    def __init__(self, loader: Any, file: str, track: bool) -> None:
        self.loader = loader
        self.file = file
        self.track = track
        self.positions: dict[Path, tuple[int, int]] = {}
        self.key_positions: dict[Path, tuple[int, int]] = {}
        # Tracked: the path of the value the next event belongs to, so an error the parser
        # raises while reading ahead still names the field it is in.
        self.at: Path = ()

    def _fail(self, message: str, event: Any, path: Path) -> InputError:
        m = event.start_mark
        return InputError(
            message, Location(self.file, m.line + 1, m.column + 1), render_path(path) or None
        )

    def document(self) -> Document:
        get = self.loader.get_event
        get()  # StreamStart
        ev = get()
        if isinstance(ev, _StreamEnd):
            raise InputError("file is empty", Location(self.file, 1))
        first = get()
        data = self.node(first, (), 1) if self.track else self.quick(first, 1, False)
        get()  # DocumentEnd
        ev = get()
        if not isinstance(ev, _StreamEnd):
            raise self._fail("file holds more than one YAML document; write one per file", ev, ())
        return Document(self.file, data, self.positions, self.key_positions)

    def quick(self, ev: Any, depth: int, disks: bool) -> Any:
        """`node` without paths or positions (but the disks' lines). Anything refused is
        raised without a place: the caller loads the file again, tracked, to report it."""
        cls = type(ev)
        if cls is _Alias or ev.anchor is not None or ev.tag is not None or depth > MAX_DEPTH:
            raise InputError("refused construct", Location(self.file))
        if cls is _Scalar:
            return self.scalar(ev, ()) if ev.implicit[0] else ev.value
        get = self.loader.get_event
        if cls is _SeqStart:
            items: list[Any] = []
            item = get()
            while type(item) is not _SeqEnd:
                if disks:
                    m = item.start_mark
                    self.positions[("disks", len(items))] = (m.line + 1, m.column + 1)
                items.append(self.quick(item, depth + 1, False))
                item = get()
            return items
        if cls is _MapStart:
            mapping: dict[str, Any] = {}
            root = depth == 1
            kev = get()
            while type(kev) is not _MapEnd:
                if type(kev) is not _Scalar or kev.anchor is not None or kev.tag is not None:
                    raise InputError("refused key", Location(self.file))
                key: str = kev.value
                if (key == "<<" and kev.implicit[0]) or key in mapping:
                    raise InputError("refused key", Location(self.file))
                mapping[key] = self.quick(get(), depth + 1, root and key == "disks")
                kev = get()
            return mapping
        raise InputError("unexpected YAML event", Location(self.file))  # pragma: no cover

    def node(self, ev: Any, path: Path, depth: int) -> Any:
        cls = type(ev)
        if cls is _Alias:
            raise self._fail("YAML aliases (*name) are not allowed; write the value out", ev, path)
        if ev.anchor is not None:
            raise self._fail(f"YAML anchors (&{ev.anchor}) are not allowed", ev, path)
        if ev.tag is not None:
            raise self._fail(f"YAML tags ({ev.tag}) are not allowed", ev, path)
        if depth > MAX_DEPTH:
            raise self._fail(f"nesting deeper than {MAX_DEPTH} levels", ev, path)
        m = ev.start_mark
        self.positions[path] = (m.line + 1, m.column + 1)
        if cls is _Scalar:
            return self.scalar(ev, path)
        get = self.loader.get_event
        if cls is _SeqStart:
            items: list[Any] = []
            self.at = (*path, 0)
            item = get()
            while type(item) is not _SeqEnd:
                items.append(self.node(item, (*path, len(items)), depth + 1))
                self.at = (*path, len(items))
                item = get()
            return items
        if cls is _MapStart:
            mapping: dict[str, Any] = {}
            self.at = path
            kev = get()
            while type(kev) is not _MapEnd:
                if type(kev) is not _Scalar:
                    raise self._fail("mapping keys must be plain strings", kev, path)
                if kev.anchor is not None or kev.tag is not None:
                    raise self._fail("anchors and tags are not allowed on keys", kev, path)
                key: str = kev.value
                if key == "<<" and kev.implicit[0]:
                    raise self._fail("YAML merge keys (<<) are not allowed", kev, path)
                if key in mapping:
                    raise self._fail(f"duplicate key {key!r}", kev, (*path, key))
                km: Any = kev.start_mark
                self.key_positions[(*path, key)] = (km.line + 1, km.column + 1)
                self.at = (*path, key)
                mapping[key] = self.node(get(), (*path, key), depth + 1)
                self.at = path
                kev = get()
            return mapping
        raise self._fail("unexpected YAML event", ev, path)  # pragma: no cover

    def scalar(self, ev: Any, path: Path) -> Any:
        value: str = ev.value
        if not ev.implicit[0]:
            return value  # quoted: always a string
        tag = _resolved.get(value)
        if tag is None:
            tag = self.loader.resolve(yaml.ScalarNode, value, (True, False))
            if len(_resolved) < 100_000:
                _resolved[value] = tag
        if tag == _STR:
            return value
        if tag == _MERGE:
            raise self._fail("YAML merge keys (<<) are not allowed", ev, path)
        if tag == _NULL:
            return None
        if tag == _BOOL:
            if value.lower() not in ("true", "false"):
                raise self._fail(
                    f"{value!r} is read as a boolean by YAML 1.1; write true or false, or "
                    "quote it if you meant the text",
                    ev,
                    path,
                )
            return value.lower() == "true"
        if tag == _INT:
            if not _DECIMAL.fullmatch(value):
                raise self._fail(
                    f"number {value!r} is not plain decimal (YAML 1.1 reads leading zeros as "
                    "octal, and a:b as base 60); write it in decimal or quote it",
                    ev,
                    path,
                )
            if len(value) > 30:
                raise self._fail(f"number {value[:12]}... has {len(value)} digits", ev, path)
            return int(value)
        if tag == _FLOAT:
            try:
                return float(self.loader.construct_yaml_float(yaml.ScalarNode(tag, value)))
            except ValueError:
                raise self._fail(f"{value!r} is not a number", ev, path) from None
        # Timestamps and other implicit types stay strings: no field here is a date.
        return value


def render_path(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
