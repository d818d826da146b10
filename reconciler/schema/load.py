"""Load manifests and the config from YAML, turning every problem into file:line errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from reconciler.errors import ConfigError, InputError, Location
from reconciler.schema.config import Config
from reconciler.schema.manifest import ImageSource, Manifest
from reconciler.schema.yamlload import Document, load_file
from reconciler.schema.yamlload import Path as YPath

M = TypeVar("M", bound=BaseModel)

MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedManifest:
    file: str
    manifest: Manifest
    document: Document

    def disk_location(self, index: int) -> Location:
        return self.document.location(("disks", index))


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
    return part in ("image", "template") and i > 0 and loc[i - 1] == "source"


def validation_errors(doc: Document, err: ValidationError) -> list[InputError]:
    out: list[InputError] = []
    for e in err.errors(include_url=False):
        path, name = _field_path(doc, e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
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
        errors = validation_errors(doc, e)
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
        doc = load_file(path)
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


def check_references(lm: LoadedManifest, config: Config) -> list[InputError]:
    """Checks that need the config: pools, images, duplicate disk names."""
    errors: list[InputError] = []
    doc = lm.document
    seen: dict[str, int] = {}
    for i, disk in enumerate(lm.manifest.disks):
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
    """Load one manifest; never raises for bad input, returns what went wrong instead."""
    try:
        doc = load_file(path)
    except InputError as e:
        return FailedManifest(path, (e,), None)
    try:
        manifest = _validate(Manifest, doc)
    except InputError as e:
        return FailedManifest(path, (e,), _instance_of(doc))
    except InputErrors as e:
        return FailedManifest(path, tuple(e.errors), _instance_of(doc))
    lm = LoadedManifest(path, manifest, doc)
    if config is not None:
        errors = check_references(lm, config)
        if errors:
            return FailedManifest(path, tuple(errors), manifest.instance)
    return lm


def _instance_of(doc: Document) -> str | None:
    """The instance a broken manifest is about, if that much can be read from it."""
    data = doc.data
    if isinstance(data, dict):
        inst = data.get("instance")
        if isinstance(inst, str):
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
    return None


def manifest_files(paths: Iterable[str]) -> tuple[list[str], list[InputError]]:
    """Expand files and directories (not recursively; hidden files skipped), sorted."""
    files: list[str] = []
    errors: list[InputError] = []
    for p in paths:
        if os.path.isdir(p):
            with os.scandir(p) as it:
                names = sorted(
                    e.name
                    for e in it
                    if e.name.endswith(MANIFEST_SUFFIXES) and not e.name.startswith(".")
                )
            files.extend(os.path.join(p, n) for n in names)
        elif os.path.exists(p):
            files.append(p)
        else:
            errors.append(InputError("no such file or directory", Location(p)))
    return files, errors


def load_manifests(
    paths: Iterable[str], config: Config | None
) -> tuple[list[LoadedManifest], list[FailedManifest]]:
    files, errors = manifest_files(paths)
    loaded: list[LoadedManifest] = []
    failed: list[FailedManifest] = [FailedManifest(e.location.file, (e,), None) for e in errors]
    for f in files:
        r = load_manifest(f, config)
        if isinstance(r, LoadedManifest):
            loaded.append(r)
        else:
            failed.append(r)
    return loaded, failed
