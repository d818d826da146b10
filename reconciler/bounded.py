"""Bounded reading of what others can write (DESIGN invariant 8): files, gzip, JSON.

Every input from outside the reconciler's own store (a saved plan, an exported state,
Nova's disk.info, a record copy on a volume) is read through here, so that no input costs
unbounded work or ends in a traceback:

- a file is read only if it is a regular file (of another kind it is refused before it is
  opened, and again after: it may have been replaced between), opened without blocking
  (O_NONBLOCK: a FIFO never hangs the open), up to a byte limit;
- gzip is inflated as a stream, stopping one byte past a limit (a small .gz that would
  inflate to gigabytes is refused after the limit, not after the gigabytes);
- JSON must be UTF-8, under a byte limit, nested no deeper than a limit and, where a caller
  bounds it, of no more values than a limit, checked by scans that skip strings before
  anything recursive (json, pydantic) sees it; a caller may also refuse duplicate keys and
  NaN or Infinity, which json accepts.

Each refusal is an UnsafeInput: one line, naming what was read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import zlib
from itertools import accumulate
from typing import Any

from reconciler.errors import ReconcileError

MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 128 << 20
_READ = 1 << 20


class UnsafeInput(ReconcileError, ValueError):
    """An input over a bound (size, nesting), of the wrong kind, or not UTF-8. A ValueError
    too, so a caller that already turns a ValueError of bad JSON into its own message (a
    damaged record copy) does the same with this one."""


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "of another kind"


def _check_kind(mode: int, *, what: str) -> None:
    if stat.S_ISLNK(mode):
        raise UnsafeInput(f"{what}: is a symbolic link; not read")
    if not stat.S_ISREG(mode):
        raise UnsafeInput(f"{what}: is {_kind(mode)}, not a regular file; not read")


def read_regular(path: str, *, what: str, max_bytes: int, follow_symlinks: bool = False) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`. Never blocks,
    and never opens what its stat says is not a regular file (a device, a FIFO); one put
    in its place between the stat and the open is opened without waiting and refused. A
    symbolic link is refused unless `follow_symlinks`. FileNotFoundError is left to the
    caller."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        # Before the open: opening some devices does something (a tape rewinds).
        _check_kind(os.stat(path, follow_symlinks=follow_symlinks).st_mode, what=what)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafeInput(f"{what}: is a symbolic link; not read") from None
        raise UnsafeInput(f"{what}: cannot read: {e.strerror}") from None
    try:
        try:
            st = os.fstat(fd)  # what was opened, if the path changed since the stat
        except OSError as e:
            raise UnsafeInput(f"{what}: cannot read: {e.strerror}") from None
        _check_kind(st.st_mode, what=what)
        if st.st_size > max_bytes:
            raise UnsafeInput(f"{what}: {st.st_size} bytes, more than the {max_bytes} allowed")
        parts: list[bytes] = []
        got = 0
        while got <= max_bytes:  # the size may have grown since fstat
            try:
                chunk = os.read(fd, min(_READ, max_bytes + 1 - got))
            except OSError as e:
                raise UnsafeInput(f"{what}: cannot read: {e.strerror}") from None
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got > max_bytes:
            raise UnsafeInput(f"{what}: more than the {max_bytes} bytes allowed")
        return b"".join(parts)
    finally:
        os.close(fd)


def gunzip(data: bytes, *, what: str, max_bytes: int) -> bytes:
    """Inflate gzip `data` (one or more members) to at most `max_bytes`."""
    out: list[bytes] = []
    total = 0
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            pending = rest
            while not d.eof:
                chunk = d.decompress(pending, max_bytes + 1 - total)
                total += len(chunk)
                if total > max_bytes:
                    raise UnsafeInput(f"{what}: inflates to more than {max_bytes} bytes")
                out.append(chunk)
                pending = d.unconsumed_tail
                if not pending and not chunk and not d.eof:
                    raise UnsafeInput(f"{what}: not a readable gzip file (truncated?)")
            rest = d.unused_data
    except zlib.error as e:
        raise UnsafeInput(f"{what}: not a readable gzip file (truncated?): {e}") from None
    return b"".join(out)


def inflate(data: bytes, *, what: str, max_bytes: int) -> bytes:
    """Inflate zlib `data` to at most `max_bytes` (zlib.decompress has no limit)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise UnsafeInput(f"{what}: not readable zlib data: {e}") from None
    if len(out) > max_bytes:
        raise UnsafeInput(f"{what}: inflates to more than {max_bytes} bytes")
    if not d.eof:
        raise UnsafeInput(f"{what}: not readable zlib data (truncated?)")
    return out


# A JSON string, escapes included, or an unterminated one to the end of the input: the
# pattern matches at every quote on its first, greedy try, so a scan never backtracks
# (a pattern that could fail there would be quadratic on `"` followed by many `\"`).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTA = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def _depth(bare: bytes) -> int:
    brackets = bare.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def _values(bare: bytes) -> int:
    """The values JSON text holds, as counted before a parse: its arrays and objects, and
    one more than its commas (what a parse allocates grows with this count)."""
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1


def json_depth(data: bytes) -> int:
    """How deep brackets nest in `data`, outside strings. Never recurses; every loop is
    C's (a state of megabytes is scanned in milliseconds). What follows an unterminated
    string is inside it: the parser never nests into it."""
    return _depth(_STRING.sub(b"", data))


def check_json(
    data: bytes | str,
    *,
    what: str,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    max_values: int | None = None,
) -> str:
    """Refuse JSON text over the limits (of values, only if `max_values` is given) or not
    UTF-8, before anything parses it (json and pydantic's model_validate_json both
    recurse). Returns the text."""
    if isinstance(data, str):
        text = data
        try:
            raw = data.encode()
        except UnicodeEncodeError:
            raise UnsafeInput(f"{what}: not UTF-8 text") from None
    else:
        raw = data
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise UnsafeInput(
                f"{what}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x})"
            ) from None
    if len(raw) > max_bytes:
        raise UnsafeInput(f"{what}: {len(raw)} bytes of JSON, more than the {max_bytes} allowed")
    # Counted strings and all, the text is within the limits: so is what is outside its
    # strings, and no scan is needed.
    deep = raw.count(b"[") + raw.count(b"{") > max_depth
    many = max_values is not None and _values(raw) > max_values
    if deep or many:
        bare = _STRING.sub(b"", raw)
        if deep and _depth(bare) > max_depth:
            raise UnsafeInput(f"{what}: JSON nested deeper than {max_depth} levels")
        if max_values is not None and _values(bare) > max_values:
            raise UnsafeInput(f"{what}: JSON of more than {max_values} values")
    return text


def shown(value: Any) -> str:
    """A value from input, safe to put in a message: JSON with every control character
    escaped, cut short."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {shown(k)}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(
    data: bytes | str,
    *,
    what: str,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    max_values: int | None = None,
    unique_keys: bool = False,
    finite: bool = False,
) -> Any:
    """json.loads within bounds; any refusal is UnsafeInput "WHAT[:LINE:COL]: why".
    `unique_keys` refuses an object that names a key twice (json keeps the last one, where
    another reader may keep the first); `finite` refuses NaN and Infinity (json reads them,
    but they are not JSON)."""
    text = check_json(
        data, what=what, max_depth=max_depth, max_bytes=max_bytes, max_values=max_values
    )
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique if unique_keys else None,
            parse_constant=_no_constant if finite else None,
        )
    except json.JSONDecodeError as e:
        raise UnsafeInput(f"{what}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # a refused key or constant, 5,000 digits
        raise UnsafeInput(f"{what}: not valid JSON: {' '.join(str(e).split())[:300]}") from None
