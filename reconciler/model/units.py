"""Disk sizes: bytes or IEC units, validated strictly."""

from __future__ import annotations

import re

IEC = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}
SECTOR = 512
MAX_DISK_BYTES = 64 << 40  # 64 TiB

_SIZE_RE = re.compile(r"^\s*(?P<num>[0-9]+)\s*(?P<unit>[A-Za-z]+)\s*$")
_SI_UNITS = {"K", "KB", "M", "MB", "G", "GB", "T", "TB", "P", "PB", "k", "kB"}


# Sizes written as text, already parsed: the same few recur in every manifest of a host.
# Bounded in number and length, as inputs are.
_parsed: dict[str, int] = {}


def parse_size(value: object) -> int:
    """Parse a disk size: an int of bytes or a string like '20GiB'.

    Raises ValueError with an operator-facing message.
    """
    if type(value) is str:
        n = _parsed.get(value)
        if n is None:
            n = _parse_size(value)
            if len(_parsed) < 10_000 and len(value) <= 64:
                _parsed[value] = n
        return n
    return _parse_size(value)


def _parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(
            "size must be a whole number of bytes or a string like '20GiB', not a bool"
        )
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        raise ValueError(
            f"size {value!r} is fractional; give whole bytes or IEC units like '20GiB'"
        )
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"[0-9]+", s):
            raise ValueError(
                f"size {value!r} is a string without a unit; write an integer of bytes "
                f"or add an IEC unit (B, KiB, MiB, GiB, TiB)"
            )
        if re.fullmatch(r"\s*-?[0-9]*\.[0-9]+\s*[A-Za-z]*\s*", s):
            raise ValueError(f"size {value!r} is fractional; use a smaller unit instead")
        if s.startswith("-"):
            raise ValueError(f"size {value!r} is negative")
        m = _SIZE_RE.match(s)
        if not m:
            raise ValueError(f"size {value!r} is not a number of bytes or an IEC size like '20GiB'")
        unit = m.group("unit")
        if unit not in IEC:
            hint = " (SI units are ambiguous; use IEC units like GiB)" if unit in _SI_UNITS else ""
            raise ValueError(f"size {value!r} has unknown unit {unit!r}{hint}")
        n = int(m.group("num")) * IEC[unit]
    else:
        raise ValueError(
            f"size must be an integer or a string like '20GiB', not {type(value).__name__}"
        )
    if n <= 0:
        raise ValueError(f"size must be positive, got {n}")
    if n % SECTOR:
        raise ValueError(f"size {n} bytes is not a multiple of {SECTOR}")
    if n > MAX_DISK_BYTES:
        raise ValueError(f"size {n} bytes is larger than the 64 TiB limit")
    return n


def parse_byte_count(value: object, *, positive: bool = False) -> int:
    """Parse a count of bytes in the config (an image's size, how much of an LV is cleared):
    an int or a string in the manifest's units ('2GiB', '512 B'); unlike a disk size any
    whole number of bytes, 0 included unless `positive`. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"a byte count is an integer or a string like '2GiB', not {type(value).__name__}"
        )
    if isinstance(value, int):
        n = value
    else:
        s = value.strip()
        m = _SIZE_RE.match(s)
        if re.fullmatch(r"[0-9]+", s):
            raise ValueError(
                f"{value!r} is a string without a unit; write an integer of bytes or add an "
                "IEC unit (B, KiB, MiB, GiB, TiB)"
            )
        if m is None:
            raise ValueError(f"{value!r} is not a number of bytes or an IEC size like '2GiB'")
        unit = m.group("unit")
        if unit not in IEC:
            hint = " (SI units are ambiguous; use IEC units like GiB)" if unit in _SI_UNITS else ""
            raise ValueError(f"{value!r} has unknown unit {unit!r}{hint}")
        n = int(m.group("num")) * IEC[unit]
    if n < 0:
        raise ValueError(f"a byte count must not be negative, got {n}")
    if positive and n == 0:
        raise ValueError("must be more than 0 bytes")
    return n


def parse_positive_byte_count(value: object) -> int:
    return parse_byte_count(value, positive=True)


def format_size(n: int) -> str:
    """Render bytes in the largest IEC unit that divides them exactly (so it round-trips)."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        if n >= IEC[unit] and n % IEC[unit] == 0:
            return f"{n // IEC[unit]} {unit}"
    return f"{n} B"


_RATE_RE = re.compile(r"^\s*(?P<num>[0-9]+)\s*(?P<unit>[A-Za-z]+)/s\s*$")


def parse_rate(value: object) -> int:
    """Parse a transfer rate: an int of bytes per second or a string like '1MiB/s'."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("a rate is bytes per second or a string like '1MiB/s'")
    if isinstance(value, int):
        n = value
    else:
        m = _RATE_RE.match(value)
        if m is None or m.group("unit") not in IEC:
            raise ValueError(f"rate {value!r} is not bytes per second or like '1MiB/s'")
        n = int(m.group("num")) * IEC[m.group("unit")]
    if n <= 0:
        raise ValueError(f"rate must be positive, got {n}")
    return n
