"""Record stores: where the durable disk records live.

The store is an interface so a backend can keep records elsewhere (Ceph will keep them in
the cluster beside its images). The embedded default is SQLite: one file, WAL journal.
Writes are compare-and-set on the record's generation, so two reconcilers never silently
overwrite each other's records.

An intent (creating, resizing, deleting) is written durably, fsync'ed before the volume is
touched. A completion (ready, removed) need not be: if a power cut loses it, the record
still holds the intent and the next run finishes that step again, which every step allows.
Completions ride on the next durable write's fsync, and `sync()` (called on close) makes
them durable at the end of a run. This halves the fsyncs of a create (bench/apply.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from reconciler.errors import RecordError
from reconciler.schema.record import BadRecord, DiskRecord


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """Who a record store is: a pool it manages names it (see drivers/ownership.py)."""

    id: str  # a UUID made once, when the store was created
    location: str  # where the records live (the database file), for messages
    host: str  # the host that keeps them, for messages


class ConflictError(RecordError):
    """The record changed under us (another reconciler got there first)."""


class RecordStore(Protocol):
    def identity(self) -> StoreIdentity: ...

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]: ...

    def get(self, pool: str, volume: str) -> DiskRecord | None: ...

    def for_instance(self, instance: str) -> list[DiskRecord]: ...

    def references(self, pool: str, volume: str) -> int:
        """How many records name `pool/volume` as their cache entry (`backing`)."""
        ...

    def put(
        self, record: DiskRecord, expect_generation: int | None, *, durable: bool = True
    ) -> None: ...

    def delete(
        self, pool: str, volume: str, expect_generation: int, *, durable: bool = True
    ) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


# Layout 2 added the `meta` table (the store's identity); a layout-1 database is upgraded.
DB_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    pool TEXT NOT NULL,
    volume TEXT NOT NULL,
    instance TEXT NOT NULL,
    generation INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (pool, volume)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_instance ON records (instance);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def _parse(pool: str, volume: str, data: str) -> DiskRecord:
    try:
        rec = DiskRecord.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecordError(
            f"record for {pool}/{volume} is unreadable ({where}: {first['msg']})"
        ) from None
    if rec.pool != pool or rec.volume != volume:
        raise RecordError(f"record stored as {pool}/{volume} describes {rec.pool}/{rec.volume}")
    return rec


class SqliteRecordStore:
    """Records in one SQLite file under the state directory."""

    def __init__(self, path: Path) -> None:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(path), timeout=30, isolation_level=None, check_same_thread=False
        )
        self._durable = True
        self._identity: StoreIdentity | None = None
        try:
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version != DB_VERSION:
                self._initialise(version)
        except sqlite3.Error as e:
            raise RecordError(f"records database {path}: {e}") from None

    def _initialise(self, version: int) -> None:
        """Switch a new database to WAL and create its table, one process at a time: two
        reconcilers opening a new database together would otherwise see 'database is
        locked' (changing the journal mode does not wait for a busy lock)."""
        fd = os.open(f"{self.path}.init-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, DB_VERSION):
                raise RecordError(
                    f"records database {self.path} has layout version {version}; this "
                    f"reconciler knows version {DB_VERSION}"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            if version != DB_VERSION:
                with self._tx():
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                        (str(uuid.uuid4()),),
                    )
                    self._db.execute(f"PRAGMA user_version={DB_VERSION}")
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if durable != self._durable:
                # FULL: this commit fsyncs the WAL (and with it every earlier commit).
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def identity(self) -> StoreIdentity:
        if self._identity is None:
            with self._lock:
                row = self._db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            if row is None:
                raise RecordError(f"records database {self.path} has no store identity")
            self._identity = StoreIdentity(str(row[0]), str(self.path), socket.gethostname())
        return self._identity

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]:
        good: list[DiskRecord] = []
        bad: list[BadRecord] = []
        with self._lock:
            rows = self._db.execute("SELECT pool, volume, data FROM records").fetchall()
        for pool, volume, data in rows:
            try:
                good.append(_parse(pool, volume, data))
            except RecordError as e:
                bad.append(BadRecord(pool, volume, str(e)))
        return good, bad

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM records WHERE pool=? AND volume=?", (pool, volume)
            ).fetchone()
        return None if row is None else _parse(pool, volume, row[0])

    def references(self, pool: str, volume: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM records WHERE pool=? AND json_extract(data, '$.backing')=?",
                (pool, volume),
            ).fetchone()
        return int(row[0])

    def for_instance(self, instance: str) -> list[DiskRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT pool, volume, data FROM records WHERE instance=?", (instance,)
            ).fetchall()
        return [_parse(pool, volume, data) for pool, volume, data in rows]

    def put(
        self, record: DiskRecord, expect_generation: int | None, *, durable: bool = True
    ) -> None:
        """Write `record`; `expect_generation` None means it must not exist yet."""
        data = record.model_dump_json()
        with self._tx(durable) as db:
            row = db.execute(
                "SELECT generation FROM records WHERE pool=? AND volume=?",
                (record.pool, record.volume),
            ).fetchone()
            current = None if row is None else int(row[0])
            if current != expect_generation:
                raise ConflictError(
                    f"record {record.pool}/{record.volume} is at generation {current}, "
                    f"expected {expect_generation}: another reconciler changed it"
                )
            db.execute(
                "INSERT OR REPLACE INTO records (pool, volume, instance, generation, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.pool, record.volume, record.instance, record.generation, data),
            )

    def delete(
        self, pool: str, volume: str, expect_generation: int, *, durable: bool = True
    ) -> None:
        with self._tx(durable) as db:
            cur = db.execute(
                "DELETE FROM records WHERE pool=? AND volume=? AND generation=?",
                (pool, volume, expect_generation),
            )
            if cur.rowcount != 1:
                raise ConflictError(
                    f"record {pool}/{volume} is not at generation {expect_generation}"
                )

    def put_raw(
        self, pool: str, volume: str, generation: int, data: str, instance: str = ""
    ) -> None:
        """Write a record's bytes unchecked; for tests that need a damaged record."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO records (pool, volume, instance, generation, data) "
                "VALUES (?, ?, ?, ?, ?)",
                (pool, volume, instance, generation, data),
            )

    def sync(self) -> None:
        """Make every committed write durable (a checkpoint fsyncs the WAL first)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()


def open_store(state_dir: Path) -> SqliteRecordStore:
    return SqliteRecordStore(state_dir / "records.sqlite")
