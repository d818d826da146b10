"""Write manifests (and plans) atomically, so a watcher never reads half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import yaml

from reconciler.schema.manifest import Manifest


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and a rename."""
    write_atomic_bytes(path, text.encode("utf-8"))


def write_atomic_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def manifest_yaml(manifest: Manifest) -> str:
    data: dict[str, Any] = manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not data.get("deleted"):
        data.pop("deleted", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_manifest(path: str, manifest: Manifest) -> None:
    """Validate-by-construction and write one instance's manifest atomically."""
    write_atomic(path, manifest_yaml(manifest))
