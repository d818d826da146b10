"""Bounded reading of what others can write (DESIGN invariant 8): files, gzip, JSON.

Every input from outside the reconciler's own store (a saved plan, an exported state,
Nova's disk.info, a record copy on a volume, a manifest and the config through
reconciler/schema/readfile.py, the manifest cache's JSON, a file:// image) is read
through here, so that no input costs unbounded work or ends in a traceback:

- a file is opened only if it is a regular file: its name is opened with O_PATH (which
  opens nothing: no FIFO wait, no device side effect; a symbolic link, unless followed,
  is found as the link itself), that object's own fstat decides, and only then is the
  same inode opened for reading, without blocking (open_regular); it is read up to a
  byte limit (read_file, read_regular) or, for an image, streamed (open_stream). Every
  opener of an input file (here, reconciler/schema/readfile.py, reconciler/drivers/ingest/fetch.py)
  is this one;
- gzip is inflated as a stream, stopping one byte past a limit (a small .gz that would
  inflate to gigabytes is refused after the limit, not after the gigabytes);
- JSON must be UTF-8, under a byte limit, nested no deeper than a limit and, where a caller
  bounds it, of no more values than a limit, checked by scans that skip strings before
  anything recursive (json, pydantic) sees it; a caller may also refuse duplicate keys and
  NaN or Infinity, which json accepts.

Each refusal is an UnsafeInput: one line, naming what was read (a refused file's is a
NotRead, whose reason a caller may put under its own error, as readfile.py does).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import zlib
from dataclasses import dataclass
from itertools import accumulate
from typing import IO, Any

from reconciler.model.errors import ReconcileError

MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 128 << 20
_READ = 1 << 20
_SMALL_READ = 1 << 16  # below malloc's mmap threshold: no mmap and munmap per read


class UnsafeInput(ReconcileError, ValueError):
    """An input over a bound (size, nesting), of the wrong kind, or not UTF-8. A ValueError
    too, so a caller that already turns a ValueError of bad JSON into its own message (a
    damaged record copy) does the same with this one."""


# What a name can be besides a regular file, as a refusal names it. Linux has no other
# type, so the fallback is never seen.
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "of another kind"  # pragma: no cover - every type Linux has is listed


class NotRead(UnsafeInput):
    """A file refused by open_regular: `reason` is the message without the name, for a
    caller that names the file its own way (a manifest's InputError carries a Location)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


@dataclass(frozen=True)
class FileRead:
    """A regular file's bytes (at most the limit) and the fstat of the opened file."""

    data: bytes
    stat: os.stat_result


def open_regular(
    path: str, *, what: str, max_bytes: int | None = None, follow_symlinks: bool = False
) -> tuple[int, os.stat_result]:
    """A descriptor (O_RDONLY, O_NONBLOCK, close-on-exec; the caller closes it) of the
    regular file at `path`, and its fstat; NotRead for anything else, or for a file of
    more than `max_bytes` when given. A symbolic link is refused unless
    `follow_symlinks`. FileNotFoundError is left to the caller.

    The name is opened with O_PATH, which opens nothing (no FIFO wait, no device side
    effect), and that object's own fstat decides, not a stat of the name that another
    process could swap before the open. Only then is that same inode opened for reading,
    through /proc/self/fd; without /proc, the name is opened again (O_NONBLOCK, and
    O_NOFOLLOW unless following) and must still be that inode."""
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC | nofollow)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotRead(what, f"cannot read: {e.strerror}") from None
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRead(what, f"is {kind_of(st.st_mode)}, not a regular file; not read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise NotRead(what, f"{st.st_size} bytes, more than the {max_bytes} allowed")
        fd = _reopen(pfd, path, st, nofollow, what)
    finally:
        os.close(pfd)
    try:
        return fd, os.fstat(fd)
    except OSError as e:  # pragma: no cover - fstat of an open descriptor
        os.close(fd)
        raise NotRead(what, f"cannot read: {e.strerror}") from None


def _reopen(pfd: int, path: str, st: os.stat_result, nofollow: int, what: str) -> int:
    """Open for reading the regular file `pfd` (an O_PATH descriptor) refers to."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(f"/proc/self/fd/{pfd}", flags)
    except FileNotFoundError:
        pass  # no /proc: open the name again, and check it is still the same file
    except OSError as e:
        raise NotRead(what, f"cannot read: {e.strerror}") from None
    try:
        fd = os.open(path, flags | nofollow)
    except OSError as e:
        if e.errno == errno.ELOOP and nofollow:
            raise NotRead(
                what, "replaced by a symbolic link while it was opened; not read"
            ) from None
        raise NotRead(what, f"cannot read: {e.strerror}") from None
    again = os.fstat(fd)
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise NotRead(what, "replaced by another file while it was opened; run again")
    return fd


def open_stream(path: str, *, what: str, follow_symlinks: bool = False) -> IO[bytes]:
    """open_regular's file as a blocking binary stream, read to its end with no limit (an
    image: its size is the catalog's to check). The caller closes it."""
    fd, _ = open_regular(path, what=what, follow_symlinks=follow_symlinks)
    os.set_blocking(fd, True)  # a regular file never waits; reads are ordinary again
    return os.fdopen(fd, "rb")


def read_file(path: str, *, what: str, max_bytes: int, follow_symlinks: bool = False) -> FileRead:
    """The bytes of the regular file at `path`, at most `max_bytes` (checked on the
    fstat, and again on what is read: the file may grow), with the fstat of what was
    read (for a cache keyed on a file's identity). Refusals as open_regular's."""
    fd, st = open_regular(path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    try:
        parts: list[bytes] = []
        got = 0
        # First the size fstat gave, and one byte to see growth: a read allocates what it
        # asks for, and a 1 MiB buffer per small file was a third of reading a manifest.
        want = st.st_size + 1
        while got <= max_bytes:  # the size may have grown since fstat
            try:
                chunk = os.read(fd, min(want, _READ, max_bytes + 1 - got))
            except OSError as e:
                raise NotRead(what, f"cannot read: {e.strerror}") from None
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            want = max(st.st_size + 1 - got, _SMALL_READ)
        if got > max_bytes:
            raise NotRead(what, f"more than the {max_bytes} bytes allowed")
        return FileRead(b"".join(parts), st)
    finally:
        os.close(fd)


def read_regular(path: str, *, what: str, max_bytes: int, follow_symlinks: bool = False) -> bytes:
    """read_file's bytes alone."""
    return read_file(path, what=what, max_bytes=max_bytes, follow_symlinks=follow_symlinks).data


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


# What a scan keeps of JSON text: quotes (to tell strings apart), brackets and commas.
_NOT_SCANNED = bytes(b for b in range(256) if b not in b'"[]{},')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DELTA = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def _depth(bare: bytes) -> int:
    brackets = bare.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


def _values(bare: bytes) -> int:
    """The values JSON text holds, as counted before a parse: its arrays and objects, and
    one more than its commas (what a parse allocates grows with this count)."""
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1


def _bare(data: bytes) -> bytes:
    """The brackets and commas of JSON text that are outside its strings, in order; what
    follows an unterminated string is inside it. Every loop is C's (bytes.replace,
    translate, split: a state of 25 MB in about 0.1 s, where a regular expression matching
    each string took 3 s).

    Escapes go first, paired left to right as a parser pairs them: every `\\\\`, then
    every `\\"` (a backslash left before a quote after that escapes it), so each quote left
    opens or closes a string, and every other piece of text between two of them is a
    string. Where the text stops being JSON this may count differently, but the parser
    stops there too: up to that point the count is exact, so it still bounds what nests."""
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SCANNED)
    pieces = text.split(b'"')
    if not any(pieces[1::2]):  # the common case: no string holds a bracket or a comma
        return text.replace(b'"', b"")
    return b"".join(pieces[::2])


def json_depth(data: bytes) -> int:
    """How deep brackets nest in `data`, outside strings. Never recurses; every loop is
    C's (a state of megabytes is scanned in milliseconds). What follows an unterminated
    string is inside it: the parser never nests into it."""
    return _depth(_bare(data))


def check_json(
    data: bytes | str,
    *,
    what: str,
    max_depth: int | None = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    max_values: int | None = None,
) -> str:
    """Refuse JSON text over the limits (of values, only if `max_values` is given; of
    nesting, unless `max_depth` is None: for a file of the reconciler's own whose parse
    catches RecursionError) or not UTF-8, before anything parses it (json and pydantic's
    model_validate_json both recurse). Returns the text."""
    if isinstance(data, str):
        text = data
        if data.isascii() and len(data) <= max_bytes and max_values is None:
            # The common case (a record row): ASCII is its own UTF-8, so the bounds are
            # counted on the text itself, without encoding it.
            if (
                max_depth is not None
                and data.count("[") + data.count("{") > max_depth
                and _depth(_bare(data.encode())) > max_depth
            ):
                raise UnsafeInput(f"{what}: JSON nested deeper than {max_depth} levels")
            return text
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
    deep = max_depth is not None and raw.count(b"[") + raw.count(b"{") > max_depth
    many = max_values is not None and _values(raw) > max_values
    if deep or many:
        bare = _bare(raw)
        if max_depth is not None and deep and _depth(bare) > max_depth:
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
    max_depth: int | None = MAX_JSON_DEPTH,
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
