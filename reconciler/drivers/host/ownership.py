"""Which record store manages a pool: a small file the pool keeps about itself.

A pool that knows its manager cannot be silently taken over by a store that does not hold
its records: a records database that was deleted and started anew, or a second host's
reconciler pointed at the same shared directory. Either would otherwise see the disks it
made as strangers (and, for the second, refuse each other's volumes forever).

The file is `owner` in the pool's state directory (`.reconciler/`, beside the locks):
JSON naming the store's id, where its database is and on which host, for messages. It is
written once, exclusively (a temporary file linked into place, so exactly one of two
stores claiming together wins), before the first change a store makes in the pool, and
replaced only by `reconcile records rebuild`, an operator's explicit decision. A pool
without the file is unclaimed: planning reads it, and the first apply claims it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from reconciler.drivers.host.store import StoreIdentity
from reconciler.model.errors import PoolError
from reconciler.schema.bounded import load_json
from reconciler.util.outfile import fsync_dir

OWNER_FILE = "owner"
FORMAT = 1


@dataclass(frozen=True)
class Owner:
    store: str
    location: str
    host: str
    since: str

    @classmethod
    def of(cls, ident: StoreIdentity) -> Owner:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(ident.id, ident.location, ident.host, now)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "store": self.store,
                "location": self.location,
                "host": self.host,
                "since": self.since,
            },
            sort_keys=True,
        )


class ManagedElsewhere(PoolError):
    """The pool is managed by another record store than this one."""


def read_owner(state_dir: Path, pool: str) -> Owner | None:
    """The pool's manager, or None if the pool is unclaimed; a damaged file is an error."""
    path = state_dir / OWNER_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PoolError(f"pool {pool}: cannot read {path}: {e.strerror}") from None
    try:
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        doc = load_json(raw, what="its JSON")
        if doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        return Owner(str(doc["store"]), str(doc["location"]), str(doc["host"]), str(doc["since"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PoolError(
            f"pool {pool}: {path} is damaged ({e}); it names the record store that manages "
            "the pool. Restore it, or run 'reconcile records rebuild "
            f"{pool}' to have this store manage the pool"
        ) from None


def refusal(pool: str, owner: Owner, ident: StoreIdentity) -> str | None:
    """Why `ident` must not manage a pool `owner` manages (None: it is the owner)."""
    if owner.store == ident.id:
        return None
    if owner.location == ident.location and owner.host == ident.host:
        return (
            f"pool {pool} is managed by record store {owner.store}, kept in {owner.location}, "
            f"but that file now holds store {ident.id}: the records database was lost or "
            "replaced, and the disks it recorded are left untouched. Restore the database "
            "from a backup, or rebuild its records from the copies the volumes carry: "
            f"reconcile records rebuild {pool}"
        )
    return (
        f"pool {pool} is managed by another reconciler's record store ({owner.store}, in "
        f"{owner.location} on host {owner.host}, since {owner.since}); this one "
        f"({ident.location} on {ident.host}) leaves it alone. Two stores cannot both manage "
        "one pool: give each its own pool, or point this one at that store"
    )


def check(state_dir: Path, pool: str, ident: StoreIdentity) -> Owner | None:
    """The pool's owner if it is `ident` or unclaimed (None); raises ManagedElsewhere."""
    owner = read_owner(state_dir, pool)
    if owner is not None:
        why = refusal(pool, owner, ident)
        if why is not None:
            raise ManagedElsewhere(why)
    return owner


def claim(state_dir: Path, pool: str, ident: StoreIdentity) -> None:
    """Make `ident` the pool's manager unless it is already; raises ManagedElsewhere when
    another store manages it (also when it claimed the pool a moment before us)."""
    if check(state_dir, pool, ident) is not None:
        return
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Per thread too: the loop's workers may claim one pool at the same moment, and one
    # must not remove the other's temporary file before it is linked.
    tmp = state_dir / f".{OWNER_FILE}.{os.getpid()}.{threading.get_ident()}.{ident.id}"
    _write(tmp, Owner.of(ident))
    try:
        os.link(tmp, state_dir / OWNER_FILE)  # fails if the file exists: one store wins
    except FileExistsError:
        check(state_dir, pool, ident)  # raises unless the winner is this store
    else:
        fsync_dir(state_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def take_over(state_dir: Path, ident: StoreIdentity) -> None:
    """Make `ident` the manager whoever managed the pool before (records rebuild only)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_dir / f".{OWNER_FILE}.{os.getpid()}.{ident.id}"
    _write(tmp, Owner.of(ident))
    os.rename(tmp, state_dir / OWNER_FILE)
    fsync_dir(state_dir)


def _write(path: Path, owner: Owner) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, owner.to_json().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
