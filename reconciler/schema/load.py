"""Load the config and one manifest from YAML, turning every problem into file:line
errors (a directory of manifests: schema/manifestdir.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, Tag, ValidationError

from reconciler.model.errors import ConfigError, InputError, Location
from reconciler.schema.common import API_VERSION
from reconciler.schema.config import Config
from reconciler.schema.manifest import ImageSource, Manifest
from reconciler.schema.readfile import read_regular
from reconciler.schema.speed.mcache import Key, stat_key
from reconciler.schema.speed.plainyaml import load_plain
from reconciler.schema.yamlload import MAX_FILE_BYTES, Document, load_bytes, load_file, load_text
from reconciler.schema.yamlload import Path as YPath

M = TypeVar("M", bound=BaseModel)

MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedManifest:
    file: str
    manifest: Manifest
    disk_lines: tuple[int | None, ...]  # where each disk's entry starts, for messages
    # The fstat (mcache.stat_key) of the bytes it was parsed from, for the manifest cache.
    key: Key | None = field(default=None, compare=False)

    def disk_line(self, index: int) -> int | None:
        return self.disk_lines[index] if index < len(self.disk_lines) else None


@dataclass(frozen=True)
class FailedManifest:
    """A manifest that did not load; `instance` is set when it could still be read."""

    file: str
    errors: tuple[InputError, ...]
    instance: str | None


def _field_path(doc: Document, loc: Sequence[int | str]) -> tuple[YPath, str]:
    """Map a pydantic error location onto the document path and a readable field name.

    Pydantic adds union tags to locations (`source.template.label`); elements that are
    not in the document are skipped, except a final one (a missing or unknown field).
    """
    path: list[str | int] = []
    if loc and loc[-1] == "[key]":  # a mapping key (a pool or image name) is the problem
        loc = loc[:-1]
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if i < last and _is_tag(part, loc, i):
            continue
        if (*path, part) in doc.positions or i == last:
            path.append(part)
    name = ""
    for p in path:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return tuple(path), name


def _is_tag(part: Any, loc: Sequence[int | str], i: int) -> bool:
    return part in ("image", "template", "snapshot") and i > 0 and loc[i - 1] == "source"


def _unwrap(t: Any) -> Any:
    """The type under Annotated[...] and Optional[...] (X | None)."""
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
            continue
        if get_origin(t) in (Union, UnionType):
            args = [a for a in get_args(t) if a is not type(None)]
            if len(args) == 1:
                t = args[0]
                continue
        return t


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model whose mapping holds the field at pydantic location `loc` + one more
    part: the model's fields are followed by alias, lists and dicts by their items, a
    tagged union by its tag (`source.image`); None where the walk is lost."""
    t: Any = model
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            fields = t.model_fields
            found = [f for n, f in fields.items() if (f.alias or n) == part]
            if not found:
                return None
            t = found[0].annotation
        elif get_origin(t) in (Union, UnionType):
            tagged = [
                get_args(a)[0]
                for a in get_args(t)
                if get_origin(a) is Annotated
                and any(isinstance(m, Tag) and m.tag == part for m in get_args(a)[1:])
            ]
            if not tagged:
                return None
            t = tagged[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        elif get_origin(t) is list and isinstance(part, int):
            t = get_args(t)[0]
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def unknown_field_message(model: type[BaseModel] | None, loc: Sequence[int | str]) -> str:
    """ "unknown field", with the nearest field the mapping at `loc` takes (difflib; case
    and '_' or '-' against camelCase count for little), or the fields it takes."""
    at = _model_at(model, loc[:-1]) if model is not None and loc else None
    if at is None:
        return "unknown field"
    known = [f.alias or n for n, f in at.model_fields.items()]
    if not known:
        return "unknown field: this mapping takes no fields"

    def fold(k: str) -> str:
        return re.sub(r"[_-]", "", k).lower()

    key = str(loc[-1])
    folded = {fold(k): k for k in known}
    import difflib  # only for a bad input's message, never at start-up (issue 27)

    near = difflib.get_close_matches(fold(key), list(folded), n=1, cutoff=0.6)
    if near:
        return f"unknown field; did you mean {folded[near[0]]!r}?"
    return "unknown field; it takes " + ", ".join(sorted(known, key=str.lower))


def validation_errors(
    doc: Document, err: ValidationError, model: type[BaseModel] | None = None
) -> list[InputError]:
    out: list[InputError] = []
    for e in err.errors(include_url=False):
        path, name = _field_path(doc, e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = unknown_field_message(model, e["loc"])
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e['input']!r}"
        out.append(InputError(msg, doc.location(path), name or None))
    return out


def _validate(model: type[M], doc: Document) -> M:
    if not isinstance(doc.data, dict):
        raise InputError("the file must hold a YAML mapping", doc.location(()))
    try:
        return model.model_validate(doc.data)
    except ValidationError as e:
        errors = validation_errors(doc, e, model)
        raise InputErrors(errors) from None


class InputErrors(Exception):
    """Several errors in one file."""

    def __init__(self, errors: list[InputError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def load_config(path: str) -> Config:
    """Load and validate the config; raises ConfigError naming file and line."""
    if not os.path.exists(path):
        raise ConfigError(
            f"config file {path} does not exist (give --config or set RECONCILER_CONFIG)"
        )
    try:
        # The operator's file: it may be a link (config management's), but is read as
        # any input is, a regular file only and never blocking.
        doc = load_file(path, follow=True)
        cfg = _validate(Config, doc)
    except InputError as e:
        raise ConfigError(str(e)) from None
    except InputErrors as e:
        raise ConfigError(str(e)) from None
    for name, pool in cfg.pools.items():
        seen: set[str] = set()
        for i, b in enumerate(pool.backends):
            if b in seen:
                where = doc.location(("pools", name, "backends", i))
                raise ConfigError(
                    str(
                        InputError(
                            f"backend {b} is listed more than once",
                            where,
                            f"pools.{name}.backends[{i}]",
                        )
                    )
                )
            seen.add(b)
    return cfg.with_base_dir(str(Path(path).resolve().parent))


def check_references(manifest: Manifest, doc: Document, config: Config) -> list[InputError]:
    """Checks that need the config: pools, images, duplicate disk names."""
    errors: list[InputError] = []
    seen: dict[str, int] = {}
    for i, disk in enumerate(manifest.disks):
        if disk.name in seen:
            errors.append(
                InputError(
                    f"disk name {disk.name!r} is also used by disks[{seen[disk.name]}]",
                    doc.location(("disks", i, "name")),
                    f"disks[{i}].name",
                )
            )
        seen.setdefault(disk.name, i)
        pool = config.pools.get(disk.pool)
        if pool is None:
            known = ", ".join(sorted(config.pools)) or "none"
            errors.append(
                InputError(
                    f"unknown pool {disk.pool!r} (configured pools: {known})",
                    doc.location(("disks", i, "pool")),
                    f"disks[{i}].pool",
                )
            )
        elif disk.backend not in pool.backends:
            serves = ", ".join(b.value for b in pool.backends)
            errors.append(
                InputError(
                    f"pool {disk.pool!r} does not serve backend {disk.backend} "
                    f"(it serves {serves})",
                    doc.location(("disks", i, "backend")),
                    f"disks[{i}].backend",
                )
            )
        if isinstance(disk.source, ImageSource):
            image = config.images.get(disk.source.image)
            if image is None:
                errors.append(
                    InputError(
                        f"unknown image {disk.source.image!r} (not in the config's catalog)",
                        doc.location(("disks", i, "source", "image")),
                        f"disks[{i}].source.image",
                    )
                )
            elif image.format == "raw" and image.size > disk.size:
                errors.append(
                    InputError(
                        f"raw image {disk.source.image!r} is {image.size} bytes, "
                        f"larger than the disk ({disk.size} bytes)",
                        doc.location(("disks", i, "size")),
                        f"disks[{i}].size",
                    )
                )
    return errors


def load_manifest(path: str, config: Config | None) -> LoadedManifest | FailedManifest:
    """Load one manifest; never raises for bad input, returns what went wrong instead.

    The file is read as reconciler/schema/readfile.py reads input (a regular file only,
    never through a symbolic link, never blocking, bounded); see parse_manifest."""
    try:
        read = read_regular(path)
    except InputError as e:
        return FailedManifest(path, (e,), None)
    return parse_manifest(path, read.data, config, stat_key(read.stat))


def parse_manifest(
    path: str, raw: bytes, config: Config | None, key: Key | None = None
) -> LoadedManifest | FailedManifest:
    """Parse one manifest file's bytes (as read_regular read them; `key`, their fstat's
    stat_key, for the manifest cache); never raises for bad input.

    The bytes are first parsed without position tracking (the common, clean case is
    several times cheaper that way); if they fail validation they are parsed again,
    tracked, so every error can name its line. An error quotes the file only if it is a
    manifest (see _not_a_manifest).
    """
    try:
        doc = _load_untracked(raw, path)
    except InputError:
        return _failed(path, raw, config)
    try:
        manifest = _validate(Manifest, doc)
    except (InputError, InputErrors):
        return _failed(path, raw, config)
    if config is not None and check_references(manifest, doc, config):
        return _failed(path, raw, config)
    disks = len(manifest.disks)
    lines = tuple((doc.positions.get(("disks", i)) or (None, None))[0] for i in range(disks))
    return LoadedManifest(path, manifest, lines, key)


def _load_untracked(raw: bytes, path: str) -> Document:
    """The clean path's parse, without positions: plainyaml's subset when the file lies
    within it (what the service writes does), else libyaml's events. Raises InputError on
    any problem, without saying where: the caller parses the bytes again, tracked."""
    doc = load_plain(raw, path)
    if doc is not None:
        return doc
    if len(raw) > MAX_FILE_BYTES:
        raise InputError("file is too large", Location(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("file is not valid UTF-8", Location(path)) from None
    return load_text(text, path, track=False)


def _failed(path: str, raw: bytes, config: Config | None) -> FailedManifest:
    """Parse a manifest known to be invalid again, tracking positions, for its errors."""
    try:
        doc = load_bytes(raw, path, track=True)
    except InputError as e:
        if not _declares_manifest(raw):
            why = e.message if e.message in _SAYS_NOTHING else "YAML cannot read it"
            why += (
                ", and no line of it says 'apiVersion: reconciler/v1' and 'kind: InstanceStorage'"
            )
            return _not_a_manifest(path, why, e.location)  # a line number quotes nothing
        return FailedManifest(path, (e,), _instance_of_raw(raw))
    data = doc.data
    if not isinstance(data, dict):
        return _not_a_manifest(path, "it does not hold a YAML mapping", doc.location(()))
    for name, ours in (("apiVersion", API_VERSION), ("kind", KIND)):
        if data.get(name) != ours:
            why = f"its {name} is not {ours}" if name in data else f"it has no {name}"
            return _not_a_manifest(path, why, doc.location((name,)), name)
    try:
        manifest = _validate(Manifest, doc)
    except InputError as e:
        return FailedManifest(path, (e,), _instance_of(doc))
    except InputErrors as e:
        return FailedManifest(path, tuple(e.errors), _instance_of(doc))
    errors = check_references(manifest, doc, config) if config is not None else []
    if not errors:  # pragma: no cover - the bytes parse the same both times
        errors = [InputError("the file changed while it was read; run again", Location(path))]
    return FailedManifest(path, tuple(errors), manifest.instance)


# What a manifest is, for errors. The manifest directory is written by someone else, and
# a name in it may lead to a file that is no manifest at all (a hard link to a secret,
# what a bug wrote), whose lines an error must not carry into logs, plans and status. A
# file is a manifest when YAML reads it as a mapping whose apiVersion is reconciler/v1
# and whose kind is InstanceStorage, or, when YAML cannot read it, when two of its lines
# say exactly that (`apiVersion: reconciler/v1`, `kind: InstanceStorage`, at the start of
# a line, quotes and a comment allowed). Errors about a manifest name the lines, fields
# and values at fault; about any other file there is one error, which quotes nothing of
# it, and the file names no instance (so, as any file that names none, it holds up
# --prune until it is fixed or removed).
KIND = "InstanceStorage"
_API_LINE = re.compile(rb"^apiVersion:[ \t]*([\"']?)reconciler/v1\1[ \t]*(?:#.*)?\r?$", re.M)
_KIND_LINE = re.compile(rb"^kind:[ \t]*([\"']?)InstanceStorage\1[ \t]*(?:#.*)?\r?$", re.M)


# The loader's messages that say nothing of what the file holds.
_SAYS_NOTHING = frozenset(("file is empty", "file is not valid UTF-8"))


def _declares_manifest(raw: bytes) -> bool:
    return bool(_API_LINE.search(raw) and _KIND_LINE.search(raw))


def _not_a_manifest(
    path: str, why: str, where: Location | None = None, field: str | None = None
) -> FailedManifest:
    message = f"not a manifest: {why}; nothing of the file is quoted"
    return FailedManifest(path, (InputError(message, where or Location(path), field),), None)


def _instance_of_raw(raw: bytes) -> str | None:
    """The instance of a file YAML refuses: read the `instance:` line on its own."""
    m = _INSTANCE_LINE.search(raw, 0, MAX_HEAD)
    return _instance_of_text(m.group(1).decode()) if m else None


MAX_HEAD = 1 << 16
_INSTANCE_LINE = re.compile(rb"^instance:[ \t]*[\"']?([0-9a-f-]{36})[\"']?[ \t]*(?:#.*)?$", re.M)


def _instance_of_text(inst: str) -> str | None:
    try:
        return Manifest.model_validate(
            {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": inst,
                "deleted": True,
            }
        ).instance
    except ValidationError:
        return None


def _instance_of(doc: Document) -> str | None:
    """The instance a broken manifest is about, if that much can be read from it."""
    data = doc.data
    if isinstance(data, dict) and isinstance(data.get("instance"), str):
        return _instance_of_text(data["instance"])
    return None
