"""A strict YAML loader that remembers where every value came from.

Manifests are hand-edited by operators and written by a service, so the loader refuses
everything that makes a file mean something other than what it shows: anchors, aliases,
merge keys, explicit tags, duplicate keys, several documents. It also bounds size and
nesting so a hostile file cannot exhaust memory. Every value's 1-based line and column is
kept in `positions`, keyed by its path, so schema errors can name file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler.errors import InputError, Location

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32

Path = tuple[str | int, ...]

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"


@dataclass
class Document:
    """A loaded YAML document: its data and where each value stood."""

    file: str
    data: Any
    positions: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def location(self, path: Path) -> Location:
        """The location of the value at `path`, or of its nearest located ancestor."""
        p = tuple(path)
        while p:
            pos = self.positions.get(p)
            if pos is not None:
                return Location(self.file, pos[0], pos[1])
            p = p[:-1]
        pos = self.positions.get(())
        return Location(self.file, pos[0] if pos else 1, pos[1] if pos else None)


def load_file(path: str, display: str | None = None) -> Document:
    """Read and parse one YAML file, refusing oversized files before reading them whole."""
    name = display or path
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", Location(name)) from e
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"file is larger than {MAX_FILE_BYTES} bytes", Location(name))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError("file is not valid UTF-8", Location(name, line)) from e
    return load_text(text, name)


def load_text(text: str, file: str) -> Document:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise InputError(f"file is larger than {MAX_FILE_BYTES} bytes", Location(file))
    loader = _Loader(text)
    try:
        return _Builder(loader, file).document()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        problem = e.problem or e.context or "malformed YAML"
        raise InputError(f"invalid YAML: {problem}", loc) from e
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", Location(file)) from e
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, loader: Any, file: str) -> None:
        self.loader = loader
        self.file = file
        self.positions: dict[Path, tuple[int, int]] = {}

    def _loc(self, event: Any) -> Location:
        m = event.start_mark
        return Location(self.file, m.line + 1, m.column + 1)

    def _fail(self, message: str, event: Any, path: Path) -> InputError:
        return InputError(message, self._loc(event), _render_path(path) or None)

    def document(self) -> Document:
        get = self.loader.get_event
        ev = get()  # StreamStart
        ev = get()
        if isinstance(ev, yaml.StreamEndEvent):
            raise InputError("file is empty", Location(self.file, 1))
        if not isinstance(ev, yaml.DocumentStartEvent):  # pragma: no cover - parser guarantees
            raise self._fail("expected a YAML document", ev, ())
        data = self.node((), 1)
        ev = get()  # DocumentEnd
        ev = get()
        if not isinstance(ev, yaml.StreamEndEvent):
            raise self._fail("file holds more than one YAML document; write one per file", ev, ())
        return Document(self.file, data, self.positions)

    def node(self, path: Path, depth: int) -> Any:
        ev = self.loader.get_event()
        if isinstance(ev, yaml.AliasEvent):
            raise self._fail("YAML aliases (*name) are not allowed; write the value out", ev, path)
        if ev.anchor is not None:
            raise self._fail(f"YAML anchors (&{ev.anchor}) are not allowed", ev, path)
        if ev.tag is not None and not (
            isinstance(ev, yaml.ScalarEvent) and ev.tag == "!" and not ev.implicit[0]
        ):
            raise self._fail(f"YAML tags ({ev.tag}) are not allowed", ev, path)
        if depth > MAX_DEPTH:
            raise self._fail(f"nesting deeper than {MAX_DEPTH} levels", ev, path)
        m = ev.start_mark
        self.positions[path] = (m.line + 1, m.column + 1)
        if isinstance(ev, yaml.ScalarEvent):
            return self.scalar(ev)
        if isinstance(ev, yaml.SequenceStartEvent):
            items: list[Any] = []
            while not self.loader.check_event(yaml.SequenceEndEvent):
                items.append(self.node((*path, len(items)), depth + 1))
            self.loader.get_event()
            return items
        if isinstance(ev, yaml.MappingStartEvent):
            mapping: dict[str, Any] = {}
            while not self.loader.check_event(yaml.MappingEndEvent):
                kev = self.loader.peek_event()
                if not isinstance(kev, yaml.ScalarEvent):
                    raise self._fail("mapping keys must be plain strings", kev, path)
                self.loader.get_event()
                if kev.anchor is not None or kev.tag is not None:
                    raise self._fail("anchors and tags are not allowed on keys", kev, path)
                key = self.scalar(kev, key=True)
                if not isinstance(key, str):
                    raise self._fail(f"mapping key {kev.value!r} must be a string", kev, path)
                if key in mapping:
                    raise self._fail(f"duplicate key {key!r}", kev, (*path, key))
                mapping[key] = self.node((*path, key), depth + 1)
            self.loader.get_event()
            return mapping
        raise self._fail("unexpected YAML event", ev, path)  # pragma: no cover

    def scalar(self, ev: Any, key: bool = False) -> Any:
        value: str = ev.value
        if not ev.implicit[0]:
            # Quoted (or '!'-tagged) scalars are always strings.
            return value
        tag = self.loader.resolve(yaml.ScalarNode, value, ev.implicit)
        if tag == _MERGE:
            raise self._fail("YAML merge keys (<<) are not allowed", ev, ())
        if key or tag == _STR:
            # Keys stay text: `1: x` or `yes: x` must not turn into int or bool keys.
            return value
        node = yaml.ScalarNode(tag, value)
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return self.loader.construct_yaml_bool(node)
        if tag == _INT:
            return self.loader.construct_yaml_int(node)
        if tag == _FLOAT:
            return self.loader.construct_yaml_float(node)
        # Timestamps and other implicit types stay strings: no field here is a date.
        return value


def _render_path(path: Path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
