"""Which stored rows of the host's database passed every check already, so a converged run
does not check 30,000 unchanged records again (bench/plan.py: check_record and its
placement check were a third of reading them).

A record read from the database is input (DESIGN invariant 8; drivers/host/decode.py):
bounded, validated by pydantic, checked to describe the row it was read as, and checked by
schema/recordcheck.py. Of those, only pydantic's validation builds the record; the rest
only judge it. This file keeps, for each row that passed them all, the SHA-256 of exactly
what was judged (the row's pool, volume and JSON text, each length-prefixed), under a
fingerprint of the code that judged it (these modules' sources, the models', pydantic's
version): a row whose digest is here was judged by this very code on these very bytes, so
it is only parsed (model_validate_json, which still refuses anything it would refuse). A
row changed in any byte, or read by other code, is judged again.

The file sits in the 0700 state directory beside the database and is read only if it is a
regular file this user owns and nobody else can write: whoever could write it could as
well replace the reconciler. A damaged file (its length, its header) is ignored; losing it
costs one run its speed. Used only for a store of at least MIN_ROWS records: a small one
gains nothing and keeps its state directory as it was.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pydantic_core

from reconciler import __version__
from reconciler.schema.speed.owncache import read_own
from reconciler.util.logs import get_logger

log = get_logger(__name__)

MIN_ROWS = 1000
MAGIC = b"reconciler-checked-rows-1\n"
DIGEST = 32
MAX_BYTES = 1 << 30
NAME = "records-checked.bin"

# The code that judges a row: any change to it empties the file.
_SOURCES = (
    "drivers/host/checked.py",
    "drivers/host/decode.py",
    "drivers/host/store.py",
    "schema/bounded.py",
    "schema/common.py",
    "schema/recordcheck.py",
)


@functools.cache  # once a process: the code that runs, not what is on disk later
def _fingerprint() -> bytes:
    h = hashlib.sha256(__version__.encode() + b"\0" + pydantic_core.__version__.encode())
    package = Path(__file__).resolve().parent.parent.parent  # reconciler/
    for name in _SOURCES:
        h.update((package / name).read_bytes())
    for path in sorted((package / "model").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.digest()


def digest(pool: str, volume: str, data: str) -> bytes:
    """What identifies a judged row: its key and its text, each length-prefixed."""
    h = hashlib.sha256()
    for part in (pool, volume, data):
        raw = part.encode("utf-8", "surrogatepass")
        h.update(b"%d:" % len(raw))
        h.update(raw)
    return h.digest()


class CheckedRows:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fingerprint = _fingerprint()
        self.known: frozenset[bytes] = frozenset()
        self.seen: set[bytes] = set()
        read = read_own(path, limit=MAX_BYTES, event="checked_rows")
        if read is None:
            return  # missing or unusable: it is only a cache
        data = read.data
        head = len(MAGIC) + DIGEST
        if (
            not data.startswith(MAGIC)
            or data[len(MAGIC) : head] != self.fingerprint
            or (len(data) - head) % DIGEST
        ):
            return  # other code's, or damaged
        self.known = frozenset(data[i : i + DIGEST] for i in range(head, len(data), DIGEST))

    def save(self) -> None:
        """Keep the digests of the rows judged good this run (rows gone drop out), unless
        that is what the file holds; a failure is logged (it only costs speed)."""
        if self.seen == self.known:
            return
        from reconciler.schema.write import write_atomic_bytes
        from reconciler.util.statedir import private_dir

        try:
            private_dir(self.path.parent)
            write_atomic_bytes(
                str(self.path), MAGIC + self.fingerprint + b"".join(sorted(self.seen))
            )
        except OSError as e:
            log.warning("checked_rows.write_failed", path=str(self.path), error=str(e))
