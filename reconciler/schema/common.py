"""Types shared by the manifest, config and record schemas."""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

from reconciler.model.units import (
    parse_byte_count,
    parse_positive_byte_count,
    parse_rate,
    parse_size,
)
from reconciler.schema.patterns import rate_json_schema, size_json_schema

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


class Preallocation(StrEnum):
    """How much of a file disk's virtual size is allocated when it is made and grown (a
    file pool's `preallocation`; qemu-img's names): `off` sparse, `metadata` a qcow2's
    tables only, `falloc` every block reserved (fallocate, not written), `full` every
    block allocated and written with zeros."""

    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


# The modes a format's disks cannot be made with, and why (planned as an error, refused by
# apply and by the record check). Measured with qemu-img 7.2: `create -f raw -o
# preallocation=metadata` is "Unsupported preallocation mode: metadata"; a parallels image
# accepts falloc and full at create and ignores them (the option is the file protocol's,
# applied to an empty file before the header is written) and allocates a cluster only when
# it is written, so only writing every cluster (full) allocates it.
PREALLOCATION_REFUSED: dict[tuple[DiskFormat, Preallocation], str] = {
    (DiskFormat.RAW, Preallocation.METADATA): (
        "a raw disk has no metadata to preallocate (qemu-img refuses preallocation=metadata "
        "for raw); a raw disk needs a pool whose preallocation is off, falloc or full"
    ),
    (DiskFormat.PLOOP, Preallocation.METADATA): (
        "a ploop (parallels) image's table is always whole, and qemu-img refuses "
        "preallocation=metadata for it; a ploop disk needs a pool whose preallocation is "
        "off or full"
    ),
    (DiskFormat.PLOOP, Preallocation.FALLOC): (
        "qemu's parallels driver allocates a cluster only when it is written, so none can "
        "be reserved without writing it (qemu-img accepts falloc for parallels and ignores "
        "it); a ploop disk needs a pool whose preallocation is off or full"
    ),
}


def preallocation_refusal(fmt: DiskFormat, mode: Preallocation | None) -> str | None:
    """Why a disk of `fmt` cannot be made with preallocation `mode` (None: it can)."""
    if mode is None or mode is Preallocation.OFF:
        return None
    return PREALLOCATION_REFUSED.get((fmt, mode))


# Volume names a backend's storage refuses (a volume is `<instance>_<disk>`), so that a
# manifest naming one fails validation instead of its disk failing at apply. LVM refuses
# LV names over 127 characters and names containing the suffixes it keeps for sub-LVs
# (lvm(8), "VALID NAMES"; lib/metadata/lv_manip.c's reserved list).
LV_NAME_MAX = 127
LVM_RESERVED = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog",
    "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
)  # fmt: skip


def lv_name_refusal(volume: str) -> str | None:
    """Why LVM would refuse `volume` as an LV name (None: it would not)."""
    if len(volume) > LV_NAME_MAX:
        return (
            f"volume {volume} is {len(volume)} characters long; an LVM LV name is at most "
            f"{LV_NAME_MAX} (use a disk name of at most {LV_NAME_MAX - 37})"
        )
    for bad in LVM_RESERVED:
        if bad in volume:
            return f"volume {volume} contains {bad!r}, which LVM reserves for its own LVs"
    return None


VOLUME_NAME_RULES: dict[Backend, Callable[[str], str | None]] = {Backend.LVM: lv_name_refusal}


# Names already found good: a host's manifests repeat the same few (disk, pool and image
# names), and this check runs seven times a manifest. Bounded, as inputs are.
_good_names: set[str] = set()


def check_name(value: Any) -> str:
    """A name that is safe as (part of) a file or volume name."""
    if type(value) is str and value in _good_names:
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    if not _NAME_RE.fullmatch(value):  # match's $ would pass a final newline
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
    int, BeforeValidator(parse_size), PlainSerializer(int), WithJsonSchema(size_json_schema())
]

# A count of bytes in the config (how much of an LV is cleared, an image file's size): an
# int or in the manifest's units ('2GiB'), any whole number (no sector rule, unlike a disk's
# Size), always held and written as bytes. PositiveByteCount refuses 0.
_IEC_UNITS = "(B|KiB|MiB|GiB|TiB|PiB)"
ByteCount = Annotated[
    int,
    BeforeValidator(parse_byte_count),
    PlainSerializer(int),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": rf"^\s*[0-9]+\s*{_IEC_UNITS}\s*$"},
            ],
            "description": "bytes, or in IEC units such as '2GiB'",
        }
    ),
]
PositiveByteCount = Annotated[
    int,
    BeforeValidator(parse_positive_byte_count),
    PlainSerializer(int),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": rf"^\s*0*[1-9][0-9]*\s*{_IEC_UNITS}\s*$"},
            ],
            "description": "bytes (more than 0), or in IEC units such as '2GiB'",
        }
    ),
]

# Bytes per second, as an int or like '100MiB/s' (QoS limits, fetch rates).
Rate = Annotated[
    int, BeforeValidator(parse_rate), PlainSerializer(int), WithJsonSchema(rate_json_schema())
]
