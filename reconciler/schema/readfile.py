"""The one way a manifest or the config is read: reconciler/schema/bounded.py's opener, its
refusals as InputErrors naming the file.

The manifest directory is written by another service (Nova), and the reconciler runs as
root, so a name in it may be anything: a symbolic link to /etc/shadow, a FIFO (an open
for reading waits for a writer, for ever), a device (/dev/zero never ends), a directory,
a file of gigabytes. `read_regular` reads only regular files, never through a symbolic
link unless the caller allows it, never waits, and at most `limit` bytes: it is
bounded.read_file (O_PATH, the opened object's own fstat, the same inode reopened;
see open_regular there), with every refusal an InputError naming the file and quoting
nothing of it. The fstat of what was read comes back with the bytes, so a cache keyed on
a file's identity is keyed on what was actually read (reconciler/schema/speed/mcache.py).

It lives in bounded.py, which imports only reconciler.model.errors, so schema/ depends on
nothing above it for this, and every input file of the reconciler is opened by the same
code.
"""

from __future__ import annotations

from reconciler.model.errors import InputError, Location
from reconciler.schema.bounded import FileRead as FileRead
from reconciler.schema.bounded import NotRead, read_file

MAX_FILE_BYTES = 1 << 20


def read_regular(
    path: str,
    *,
    limit: int = MAX_FILE_BYTES,
    follow: bool = False,
    display: str | None = None,
) -> FileRead:
    """Read the regular file at `path` without blocking; raises InputError (one line,
    naming `display` or `path`, quoting nothing of the file) for anything else.

    `follow` allows a symbolic link as the last component (the config, an argument of the
    operator's); manifests are never read through one (docs/concepts.md: the manifest directory).
    """
    where = Location(display or path)
    try:
        return read_file(path, what=str(where), max_bytes=limit, follow_symlinks=follow)
    except NotRead as e:
        raise InputError(e.reason, where) from None
    except FileNotFoundError as e:
        raise InputError(f"cannot read: {e.strerror}", where) from None
