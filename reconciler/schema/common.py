"""Types shared by the manifest, config and record schemas."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

from reconciler.units import parse_size

API_VERSION = "reconciler/v1"

# Strict models: unknown fields are errors, nothing is coerced silently.
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class Backend(StrEnum):
    FLAT = "flat"
    QCOW2 = "qcow2"
    LVM = "lvm"
    RBD = "rbd"
    PLOOP = "ploop"


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    PLOOP = "ploop"


# Which on-disk formats each backend can hold (DESIGN: never guess; refuse impossible pairs).
BACKEND_FORMATS: dict[Backend, frozenset[DiskFormat]] = {
    Backend.FLAT: frozenset({DiskFormat.RAW, DiskFormat.QCOW2}),
    Backend.QCOW2: frozenset({DiskFormat.QCOW2}),
    Backend.LVM: frozenset({DiskFormat.RAW}),
    Backend.RBD: frozenset({DiskFormat.RAW}),
    Backend.PLOOP: frozenset({DiskFormat.PLOOP}),
}

# Formats whose disks cannot be grown here, and why (planned as an error, refused by apply).
NOT_RESIZABLE: dict[DiskFormat, str] = {
    DiskFormat.PLOOP: (
        "qemu-img cannot resize parallels (ploop) images, and the ploop tools need the ploop "
        "kernel module, which this host lacks"
    ),
}


# Names already found good: a host's manifests repeat the same few (disk, pool and image
# names), and this check runs seven times a manifest. Bounded, as inputs are.
_good_names: set[str] = set()


def check_name(value: Any) -> str:
    """A name that is safe as (part of) a file or volume name."""
    if type(value) is str and value in _good_names:
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    if not _NAME_RE.match(value):
        if len(value) > 100:
            raise ValueError(f"name is {len(value)} characters long; the limit is 100")
        if not value:
            raise ValueError("name is empty")
        raise ValueError(f"name {value!r} may only contain letters, digits, '.', '_' and '-'")
    if value[0] in ".-":
        raise ValueError(f"name {value!r} must not start with {value[0]!r}")
    if ".." in value:
        raise ValueError(f"name {value!r} must not contain '..'")
    if type(value) is str and len(_good_names) < 10_000:
        _good_names.add(value)
    return value


Name = Annotated[
    str,
    BeforeValidator(check_name),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(?![.-])(?!.*\.\.)[A-Za-z0-9._-]{1,100}$",
            "description": "letters, digits, '.', '_', '-'; no leading '.' or '-', no '..'",
        }
    ),
]

# Sizes are accepted as bytes or IEC strings and always held (and written) as bytes.
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(int),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 512, "maximum": 64 << 40, "multipleOf": 512},
                {"type": "string", "pattern": r"^[0-9]+ ?(B|KiB|MiB|GiB|TiB)$"},
            ],
            "description": (
                "bytes, or an IEC size such as '20GiB'; a multiple of 512, at most 64 TiB"
            ),
        }
    ),
]
