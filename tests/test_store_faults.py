"""Faults of the records database, through the real CLI against the private libvirtd.

Each fault (damaged, a directory in its place, locked, from a newer layout, read-only,
disk full when opened or while applying) must end the run with exit 1 and one line
`reconcile: error: ...` naming the database file and what to do: no traceback, no volume
made, and the database file left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.host.store import DB_VERSION
from tests.env import Env, cli, disk

pytestmark = pytest.mark.libvirtd


def set_config(env: Env, **state: Any) -> None:
    """Add fields to the config's `state` section (the config is JSON, which is YAML)."""
    cfg = json.loads(env.config_path.read_text())
    cfg["state"].update(state)
    env.config_path.write_text(json.dumps(cfg, indent=2))


def pool_listing(env: Env) -> list[str]:
    return sorted(p.name for p in env.pool_dir().iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_error(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1, no traceback, exactly one `reconcile: error:` line containing `words`."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("reconcile: error:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def mounted(*argv: str) -> Iterator[None]:
    """Run `mount ARGV` (its last argument the mount point) and unmount after."""
    subprocess.run(["mount", *argv], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", argv[-1]], check=False)


@contextlib.contextmanager
def tiny_fs(tmp_path: Path, where: Path) -> Iterator[None]:
    """An 8 MiB ext4 on a loop device mounted at `where`."""
    image = tmp_path / "state-fs.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(image)], check=True)
    where.mkdir(parents=True, exist_ok=True)
    with mounted("-o", "loop", str(image), str(where)):
        yield


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory` until it has no byte left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


@pytest.fixture
def made(env: Env) -> Env:
    """One instance applied (so the database holds records), and a second one to make."""
    env.manifest("first", [disk("d", size="1MiB")])
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    env.manifest("second", [disk("a", size="1MiB"), disk("b", size="1MiB")])
    return env


def db_path(env: Env) -> Path:
    return env.root / "state" / "records.sqlite"


def db_files(env: Env) -> list[str]:
    """The database and the files SQLite and the store keep beside it."""
    return sorted(p.name for p in db_path(env).parent.glob("records.sqlite*"))


def garbage_from_4k(env: Env) -> None:
    db = db_path(env)
    size = db.stat().st_size
    assert size > 4096  # page 1 (the header) stays, the pages with the records do not
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(random.Random(7).randbytes(size - 4096))


def newer_layout(env: Env) -> None:
    db = sqlite3.connect(db_path(env))
    db.execute("PRAGMA user_version=99")
    db.close()


# Each fault: how to make it, and words the error must contain besides the file's path.
SIMPLE_FAULTS: dict[str, tuple[Callable[[Env], None], tuple[str, ...]]] = {
    "garbage-from-4KiB": (
        garbage_from_4k,
        ("is not a database or is damaged", "restore it from a backup", "records rebuild"),
    ),
    "newer-layout": (
        newer_layout,
        (f"was written by a newer reconciler (layout version 99, this one knows {DB_VERSION})",),
    ),
}


@pytest.mark.parametrize("fault", sorted(SIMPLE_FAULTS))
def test_damaged_or_newer_store_stops_the_run(made: Env, fault: str) -> None:
    env = made
    make_fault, words = SIMPLE_FAULTS[fault]
    make_fault(env)
    before, db_before = pool_listing(env), digest(db_path(env))
    state_before = db_files(env)
    assert_one_error(env.subprocess(), str(db_path(env)), *words)
    assert pool_listing(env) == before
    assert digest(db_path(env)) == db_before
    # Not "repaired" by starting an empty database beside or instead of it.
    assert db_files(env) == state_before


def test_damaged_store_stops_every_command(made: Env, tmp_path: Path) -> None:
    """Dry run, a saved plan, `cache ls` and `cache gc` all stop at a damaged store."""
    env = made
    plan = tmp_path / "plan.json"
    res = env.subprocess("--dry-run", "--plan-out", str(plan))
    assert res.returncode == 0, res.stderr
    garbage_from_4k(env)
    before = pool_listing(env)
    cfg = str(env.config_path)
    for res in (
        env.subprocess("--dry-run"),
        cli("apply", str(plan), "--config", cfg, str(env.manifests)),
        cli("cache", "ls", "--config", cfg),
        cli("cache", "gc", "--config", cfg),
    ):
        assert_one_error(res, str(db_path(env)), "is not a database or is damaged")
    assert pool_listing(env) == before


def test_directory_in_place_of_the_database(made: Env) -> None:
    env = made
    db = db_path(env)
    db.unlink()
    db.mkdir()
    before = pool_listing(env)
    assert_one_error(env.subprocess(), str(db), "is a directory")
    assert pool_listing(env) == before
    assert db.is_dir() and not any(db.iterdir())


def test_state_dir_that_is_a_file(made: Env) -> None:
    env = made
    state = db_path(env).parent
    subprocess.run(["rm", "-rf", "--one-file-system", str(state)], check=True)
    state.write_text("not a directory\n")
    before = pool_listing(env)
    assert_one_error(env.subprocess(), str(db_path(env)), f"{state} is not a directory")
    assert pool_listing(env) == before
    assert state.read_text() == "not a directory\n"


def test_locked_store_waits_the_configured_time_then_stops(made: Env) -> None:
    """Another process holds the write lock (BEGIN EXCLUSIVE): apply waits state.lockTimeout
    for it, then stops before changing anything; once it is let go, a run converges."""
    env = made
    set_config(env, lockTimeout=1)
    before = pool_listing(env)
    holder = sqlite3.connect(db_path(env), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        res = env.subprocess()
        assert_one_error(
            res,
            str(db_path(env)),
            "is locked by another process (waited 1 s, state.lockTimeout)",
            "fuser",
        )
        assert pool_listing(env) == before
    finally:
        holder.close()
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(pool_listing(env)) == len(before) + 2


def test_read_only_store(made: Env) -> None:
    env = made
    state = db_path(env).parent
    db_before = digest(db_path(env))
    before = pool_listing(env)
    with mounted("--bind", str(state), str(state)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        assert_one_error(env.subprocess(), str(db_path(env)), "is read-only")
    assert pool_listing(env) == before
    assert digest(db_path(env)) == db_before


@pytest.mark.parametrize("when", ["opened", "applying"])
def test_full_disk_under_the_store(env: Env, tmp_path: Path, when: str) -> None:
    """The state directory's file system is full. When the run opens the database it
    cannot even read it (SQLite needs room for its shared-memory file); with that file
    already there (another reader holds the database open), the plan is made and the
    first record write fails. Either way: one error, nothing made, and once there is room
    again a run converges."""
    state = env.root / "state"
    with tiny_fs(tmp_path, state):
        env.manifest("first", [disk("d", size="1MiB")])
        res = env.subprocess()
        assert res.returncode == 0, res.stdout + res.stderr
        env.manifest("second", [disk("a", size="1MiB"), disk("b", size="1MiB")])
        before = pool_listing(env)
        reader = None
        if when == "applying":
            reader = sqlite3.connect(db_path(env), isolation_level=None)
            reader.execute("SELECT count(*) FROM records").fetchall()
        try:
            filler = fill(state)
            res = env.subprocess()
        finally:
            if reader is not None:
                reader.close()
        assert_one_error(res, str(db_path(env)), "the disk is full", "free space")
        if when == "applying":
            assert "Applying" in res.stdout  # the plan was made; the first write failed
        assert pool_listing(env) == before
        filler.unlink()
        res = env.subprocess()
        assert res.returncode == 0, res.stdout + res.stderr
        assert len(pool_listing(env)) == len(before) + 2
