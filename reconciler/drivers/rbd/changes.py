"""A host-local mark of record writes, so a long-lived process (`reconcile watch`) reads
again only the records that may have changed since its last read, instead of every record
of the host on every resync (its RADOS operations would grow with the instances it keeps).

The mark is a file in the host's state directory (0600 in the 0700 directory) holding a
random token. Every write of a record by a process of this host (create, update, delete,
hand-over; drivers/rbd/records.py) replaces the token *after* the RADOS write is
acknowledged. A reader takes the token *before* it reads, and keeps its decoded records
only while the token is the one it took: a write whose token change it has not seen was
then made after its token read, so the next read sees the token change and reads all.

What else changes a record of this host is seen in its index (drivers/rbd/index.py),
which every load reads whole: a create adds an entry, a delete removes it, a hand-over
(`take` by another host, `release`) moves it; a rewritten entry carries a new nonce. A
record is kept only while its index entry is byte for byte the one it was read with.
Another host never updates a record this host owns (its compare-and-swap names the host).
What is left is a writer that crashed between its RADOS write and the token, or a client
outside the reconciler writing a record: every record is read again at least every
FULL_EVERY seconds, and an instance's own reconcile always reads its records afresh.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from pathlib import Path

from reconciler.util.statedir import private_file

FILE = "rados-changes"  # in the state directory
FULL_EVERY = 3600.0  # seconds: every record read again at least this often
TOKEN = 16


class ChangeMark:
    """The token file of one state directory (None: no mark; every load reads all)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self) -> bytes | None:
        """The token now (b"" before any write made one); None: no mark can be read, so
        nothing read before may be kept."""
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                return f.read(TOKEN + 1)
        except FileNotFoundError:
            return b""
        except OSError:
            return None

    def bump(self) -> None:
        """Replace the token (after a record write): every reader reads all again. A mark
        that cannot be written leaves readers to FULL_EVERY; the write itself stands."""
        if self.path is None:
            return
        with self._lock, contextlib.suppress(OSError):
            if self._fd is None:
                private_file(self.path, ())  # 0600 exactly, as the state directory's files
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            os.pwrite(self._fd, secrets.token_bytes(TOKEN), 0)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
