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

Every commit is made with `synchronous=NORMAL` under the connection's lock; a durable
write then fdatasyncs the WAL (where SQLite appended the commit) itself, after letting go
of the lock and before it returns, which is what `synchronous=FULL` does at COMMIT (the
WAL synced after the commit's frames, its header with them). So the fsyncs of steps
running together (`--jobs N`) overlap, and the file system commits them as one, instead of
each holding every other step's reads and writes for the length of its own fsync.

A fault of the database itself (damaged, locked, read-only, disk full, a newer layout) is
a StoreError naming the file, what is wrong and what to do; it stops the whole run, since
no disk can be worked on without its record. A damaged or unknown database is never
replaced by an empty one: that would forget every disk it records.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from reconciler.drivers.host.checked import MIN_ROWS, CheckedRows, digest
from reconciler.drivers.host.checked import NAME as CHECKED_NAME
from reconciler.drivers.host.decode import record_from_json
from reconciler.model.errors import RecordError
from reconciler.model.record import BadRecord, DiskRecord
from reconciler.util.statedir import SQLITE_SIDE_FILES, private_dir, private_file


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """Who a record store is: a pool it manages names it (see drivers/ownership.py)."""

    id: str  # a UUID made once, when the store was created
    location: str  # where the records live (the database file), for messages
    host: str  # the host that keeps them, for messages


class ConflictError(RecordError):
    """The record changed under us (another reconciler got there first)."""


class StoreError(RecordError):
    """The records database itself cannot be used: the run stops."""


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

    def check_writable(self) -> None:
        """Raise StoreError now if a write would fail for being locked or read-only."""
        ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


# The owner of a record its host let go: any host whose manifest names the disk may take
# it. No host identity can be this (config `host` starts with a letter or digit).
RELEASED = "@released"


@runtime_checkable
class SharedRecordStore(RecordStore, Protocol):
    """A store many hosts share (drivers/rbd/records.py): each record has an owner
    host, and hosts hand records to one another by compare-and-swap."""

    host: str
    last_beat: float | None

    def read_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """(pool, volume) -> an object with `host` and `record`, or a BadRecord."""
        ...

    def beat(self, if_older_than: float | None = None) -> None: ...

    def heartbeats(self) -> dict[str, float]: ...

    def claimants(self, instances: list[str]) -> dict[str, str]:
        """instance -> the host that claimed it (all of its disks are that host's)."""
        ...

    def release(self, pool: str, volume: str, expect_generation: int) -> None: ...

    def take(self, pool: str, volume: str, expect_generation: int, from_host: str) -> None: ...

    def released_for_instance(self, instance: str) -> list[Any]:
        """The instance's records no host holds (released by a hand-over)."""
        ...


# Layout 2 added the `meta` table (the store's identity); a layout-1 database is upgraded.
DB_VERSION = 2
# Instances per query of for_instances (well under SQLite's limit of bound parameters).
_IN_CHUNK = 500
DEFAULT_LOCK_TIMEOUT = 30.0  # seconds to wait for another process's write (state.lockTimeout)
REBUILD = (
    "restore it from a backup, or rebuild the records from the pools with "
    "`reconcile records rebuild POOL`"
)
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
    def misplaced(rec: DiskRecord) -> str | None:
        if rec.pool != pool or rec.volume != volume:
            return f"record stored as {pool}/{volume} describes {rec.pool}/{rec.volume}"
        return None

    return record_from_json(data, f"record for {pool}/{volume}", misplaced)


class SqliteRecordStore:
    """Records in one SQLite file under the state directory."""

    def __init__(self, path: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        self._lock = threading.Lock()
        self._identity: StoreIdentity | None = None
        try:
            # 0700 and 0600 whatever the umask, an older looser state directory tightened
            # (reconciler/util/statedir.py); a converged run makes no change, not even a mkdir.
            private_dir(path.parent)
            private_file(path, (*SQLITE_SIDE_FILES, ".init-lock"))
        except OSError as e:
            raise self._os_fault(e) from e
        with self._errors():
            self._db = sqlite3.connect(
                str(path), timeout=lock_timeout, isolation_level=None, check_same_thread=False
            )
        try:
            with self._errors():
                self._db.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
                # Commits are not synced by SQLite; a durable one by _sync_wal (above).
                self._db.execute("PRAGMA synchronous=NORMAL")
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version != DB_VERSION:
                    self._initialise(version)
        except BaseException:
            self._db.close()
            raise

    def _initialise(self, version: int) -> None:
        """Switch a new database to WAL and create its table, one process at a time: two
        reconcilers opening a new database together would otherwise see 'database is
        locked' (changing the journal mode does not wait for a busy lock)."""
        self._check_version(version)  # before the lock file: an unknown database is not touched
        try:
            fd = os.open(f"{self.path}.init-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._os_fault(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
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

    def _check_version(self, version: int) -> None:
        if version in (0, 1, DB_VERSION):  # 1 is upgraded in place (see DB_VERSION)
            return
        if version > DB_VERSION:
            what = (
                f"was written by a newer reconciler (layout version {version}, this one "
                f"knows {DB_VERSION})"
            )
            todo = "use that newer reconciler, or restore a backup written by this one"
        else:
            what = f"has layout version {version}, which this reconciler cannot read"
            todo = REBUILD
        raise StoreError(f"records database {self.path} {what}; {todo}")

    # -- faults: every sqlite3.Error becomes a StoreError saying what to do -----------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise self._fault(e) from e

    def _fault(self, e: sqlite3.Error) -> StoreError:
        code = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_ERROR) & 0xFF
        what, todo = self._describe(code, str(e))
        return StoreError(f"records database {self.path} {what}; {todo}")

    def _os_fault(self, e: OSError) -> StoreError:
        why = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        what, todo = self._describe(sqlite3.SQLITE_CANTOPEN, why)
        return StoreError(f"records database {self.path} {what}; {todo}")

    def _describe(self, code: int, message: str) -> tuple[str, str]:
        """What is wrong, in words, and what to do about it."""
        again = "and run again"
        where = self.path.parent
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return f"is not a database or is damaged ({message})", REBUILD
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return (
                f"is locked by another process (waited {self.lock_timeout:g} s, state.lockTimeout)",
                f"let it finish (`fuser {self.path}` names it) {again}",
            )
        full = f"free space on the file system holding {where} {again}"
        read_only = f"make {where} writable (is it mounted read-only?) {again}"
        if code == sqlite3.SQLITE_FULL:
            return "cannot be written: the disk is full", full
        if code == sqlite3.SQLITE_READONLY:
            return "is read-only", read_only
        if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM):
            # SQLite says only "unable to open" or "disk I/O error"; the file system says why.
            if self.path.is_dir():
                return (
                    "is a directory, not a database file",
                    f"move that directory away, then {REBUILD}",
                )
            if where.exists() and not where.is_dir():
                return (
                    f"cannot be opened: {where} is not a directory",
                    f"set state.dir to a directory, or move {where} away",
                )
            with contextlib.suppress(OSError):
                fs = os.statvfs(where)
                if fs.f_flag & os.ST_RDONLY:
                    # A WAL database is read through a shared-memory file written beside it.
                    return (
                        "is read-only (its file system is mounted read-only)",
                        f"remount the file system holding {where} read-write {again}",
                    )
                if fs.f_bavail == 0:
                    return "cannot be opened or written: the disk is full", full
            if where.is_dir():
                unreadable = self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK)
                if unreadable or not os.access(where, os.W_OK):
                    return "is read-only (permission denied)", read_only
            failed = "cannot be opened" if code == sqlite3.SQLITE_CANTOPEN else "cannot be read"
            return f"{failed} ({message})", f"check {where} and its disk {again}"
        return f"failed ({message})", f"run again; if it fails again, {REBUILD}"

    @contextlib.contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) has already rolled back; never mask its error.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        if durable:
            self._sync_wal()

    def _sync_wal(self) -> None:
        """Make every commit so far durable: fdatasync the WAL they were appended to (on
        a descriptor of its own: the data synced is the file's, whoever wrote it). With no
        WAL, every commit is in the database file (checkpointed, the WAL removed when its
        last connection closed), which is synced instead."""
        try:
            try:
                fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            # Whether the write is durable is not known: no volume may be changed after it.
            raise StoreError(
                f"records database {self.path}: cannot make a write durable "
                f"({e.strerror or e}); check {self.path.parent} and its disk and run again"
            ) from e

    def identity(self) -> StoreIdentity:
        if self._identity is None:
            with self._lock, self._errors():
                row = self._db.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            if row is None:
                raise StoreError(f"records database {self.path} has no store identity; {REBUILD}")
            # The node name is socket.gethostname() on Linux, without importing socket.
            self._identity = StoreIdentity(str(row[0]), str(self.path), os.uname().nodename)
        return self._identity

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the database
        (SQLite's PRAGMA data_version): a cheap "has anything changed" for a poller."""
        with self._lock, self._errors():
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def load_all(self) -> tuple[list[DiskRecord], list[BadRecord]]:
        good: list[DiskRecord] = []
        bad: list[BadRecord] = []
        with self._lock, self._errors():
            rows = self._db.execute("SELECT pool, volume, data FROM records").fetchall()
        if len(rows) < MIN_ROWS:
            for pool, volume, data in rows:
                try:
                    good.append(_parse(pool, volume, data))
                except RecordError as e:
                    bad.append(BadRecord(pool, volume, str(e)))
            return good, bad
        # A row judged good by this code before, byte for byte, is only parsed (checked.py).
        checked = CheckedRows(self.path.parent / CHECKED_NAME)
        known, seen = checked.known, checked.seen
        for pool, volume, data in rows:
            key = digest(pool, volume, data)
            if key in known:
                try:
                    good.append(DiskRecord.model_validate_json(data))
                    seen.add(key)
                    continue
                except ValueError:  # pydantic's ValidationError: judged below, as any row
                    pass
            try:
                good.append(_parse(pool, volume, data))
                seen.add(key)
            except RecordError as e:
                bad.append(BadRecord(pool, volume, str(e)))
        checked.save()
        return good, bad

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        with self._lock, self._errors():
            row = self._db.execute(
                "SELECT data FROM records WHERE pool=? AND volume=?", (pool, volume)
            ).fetchone()
        return None if row is None else _parse(pool, volume, row[0])

    def references(self, pool: str, volume: str) -> int:
        with self._lock, self._errors():
            row = self._db.execute(
                "SELECT count(*) FROM records WHERE pool=? AND json_extract(data, '$.backing')=?",
                (pool, volume),
            ).fetchone()
        return int(row[0])

    def for_instance(self, instance: str) -> list[DiskRecord]:
        with self._lock, self._errors():
            rows = self._db.execute(
                "SELECT pool, volume, data FROM records WHERE instance=?", (instance,)
            ).fetchall()
        return [_parse(pool, volume, data) for pool, volume, data in rows]

    def for_instances(self, instances: Sequence[str]) -> dict[str, list[DiskRecord] | RecordError]:
        """for_instance() of each of `instances`, read in one transaction (a few queries
        of many instances each, not one per instance) and in the same order; an instance
        whose record cannot be parsed gets that RecordError, as for_instance would raise
        it, and the others their records."""
        rows: dict[str, list[tuple[str, str, str]]] = {i: [] for i in instances}
        wanted = list(rows)
        with self._lock, self._errors():
            self._db.execute("BEGIN")
            try:
                for at in range(0, len(wanted), _IN_CHUNK):
                    chunk = wanted[at : at + _IN_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    for instance, pool, volume, data in self._db.execute(
                        "SELECT instance, pool, volume, data FROM records "
                        f"WHERE instance IN ({marks}) ORDER BY instance, pool, volume",
                        chunk,
                    ):
                        rows[instance].append((pool, volume, data))
            finally:
                self._db.execute("COMMIT")
        out: dict[str, list[DiskRecord] | RecordError] = {}
        for instance, got in rows.items():
            try:
                out[instance] = [_parse(pool, volume, data) for pool, volume, data in got]
            except RecordError as e:
                out[instance] = e
        return out

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

    def check_writable(self) -> None:
        """Take the write lock and let it go, so a locked or read-only database stops a
        run before it changes anything rather than at its first record."""
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def sync(self) -> None:
        """Make every committed write durable (a checkpoint fsyncs the WAL first)."""
        with self._lock, self._errors():
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._lock, self._errors():
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()


def open_store(state_dir: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> SqliteRecordStore:
    return SqliteRecordStore(state_dir / "records.sqlite", lock_timeout)
