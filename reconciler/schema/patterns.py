"""Regular expressions for the JSON Schema `reconcile schema` prints: what parse_size and
parse_rate (reconciler/model/units.py) accept, written as patterns an editor can check.

The patterns are meant to mean the same in Python's `re` (the jsonschema package's
engine) and in ECMA-262 (an editor's): they use no `\\s`, `\\d` or `\\w` (whose meaning
differs), only explicit character classes and lookaheads. Python's `$` also matches
before a final newline, so a Python validator may pass a value ending in "\\n" that
`validate` refuses; never the other way round.

What no pattern of reasonable size can say is left out, never guessed: a byte count
written as a string ("1000 B") is checked to be a multiple of BYTE_STRING_MULTIPLE, not
of 512 (whether a decimal number is a multiple of 512 depends on its last nine digits: a
pattern for it would be megabytes long, and one for 32 is 5 kB: each further factor of
two makes it five times longer); `validate` checks 512.
"""

from __future__ import annotations

from typing import Any

from reconciler.model.units import IEC, MAX_DISK_BYTES, SECTOR

# Every character Python's str.strip() and re's \s (Unicode) take for white space, as a
# class: the size parser strips them and allows them between number and unit.
# tests/test_json_schema.py holds it to str.isspace over every code point.
WS = r"[\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

# A byte count written as a string is checked to be a multiple of this (see above).
BYTE_STRING_MULTIPLE = 32

_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _at_most(n: int) -> str:
    """A pattern for the decimal numbers 1..n written without leading zeros."""
    s = str(n)
    alts = []
    if len(s) > 1:
        alts.append("[1-9]" if len(s) == 2 else f"[1-9][0-9]{{0,{len(s) - 2}}}")
    for i, ch in enumerate(s):
        low = 1 if i == 0 else 0
        d = int(ch)
        if d > low:
            cls = f"[{low}-{d - 1}]" if d - 1 > low else str(low)
            rest = len(s) - i - 1
            alts.append(s[:i] + cls + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(s)
    return "(?:" + "|".join(alts) + ")"


def _digit_class(digits: list[int]) -> str:
    return str(digits[0]) if len(digits) == 1 else "[" + "".join(map(str, digits)) + "]"


def _residue(m: int, r: int) -> str:
    """A pattern for digit strings (possibly empty: the value 0) whose value is r modulo
    2**m. A string is x followed by a last digit d, and 10x + d = r (mod 2**m) holds when
    d = r (mod 2) and x = (r - d) / 2 / 5 (mod 2**(m - 1)), so the pattern is built from
    the last digit back."""
    if m == 0:
        return "[0-9]*"
    mod = 1 << (m - 1)
    inverse5 = pow(5, -1, mod) if mod > 1 else 0
    by_prefix: dict[int, list[int]] = {}
    for d in range(r % 2, 10, 2):
        by_prefix.setdefault(((r - d) // 2 * inverse5) % mod, []).append(d)
    alts = [f"{_residue(m - 1, x)}{_digit_class(ds)}" for x, ds in sorted(by_prefix.items())]
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    return body if r % (1 << m) else f"(?:{body})?"


def size_json_schema() -> dict[str, Any]:
    """JSON Schema of a disk size (common.Size): an integer of bytes, or a string of a
    number and an IEC unit, whose bytes are a positive multiple of 512, at most 64 TiB."""
    ws = WS + "*"
    strings: list[dict[str, Any]] = []
    for unit in _SIZE_UNITS:
        limit = _at_most(MAX_DISK_BYTES // IEC[unit])
        pattern = f"^{ws}0*{limit}{ws}{unit}{ws}$"
        if IEC[unit] % SECTOR == 0:
            strings.append({"pattern": pattern})
            continue
        multiple = BYTE_STRING_MULTIPLE.bit_length() - 1
        strings.append(
            {
                "allOf": [
                    {"pattern": pattern},
                    {"not": {"pattern": f"^{ws}0*{_at_most(SECTOR - 1)}{ws}{unit}{ws}$"}},
                    {"pattern": f"^{ws}{_residue(multiple, 0)}{ws}{unit}{ws}$"},
                ]
            }
        )
    return {
        "oneOf": [
            {"type": "integer", "minimum": SECTOR, "maximum": MAX_DISK_BYTES, "multipleOf": SECTOR},
            {"type": "string", "anyOf": strings},
        ],
        "description": (
            "bytes, or a whole number and an IEC unit (B, KiB, MiB, GiB, TiB), such as "
            f"'20GiB' or '512 B'; a positive multiple of {SECTOR} bytes, at most 64 TiB "
            f"(this schema checks a string in B only to be a multiple of "
            f"{BYTE_STRING_MULTIPLE}; `reconcile validate` checks {SECTOR})"
        ),
        "examples": ["20GiB", "512MiB", 1073741824],
    }


def rate_json_schema() -> dict[str, Any]:
    """JSON Schema of a rate (common.Rate): a positive integer of bytes per second, or a
    positive whole number, an IEC unit and '/s'."""
    units = "|".join(IEC)
    return {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": f"^{WS}*0*[1-9][0-9]*{WS}*(?:{units})/s{WS}*$"},
        ],
        "description": "bytes per second, or like '100MiB/s' (IEC units B to PiB)",
        "examples": ["100MiB/s", 1048576],
    }
