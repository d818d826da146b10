"""Pool locks exclude threads of one process exactly as they exclude processes.

The executor runs actions on threads, so a lock that only excluded other processes (as
classic POSIX record locks do) would let two threads fill one cache entry at once.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.drivers.host.locks import LockDir, _offset

GUARD = 30.0  # only a failing test ever waits this long


def other_process_can_take(path: Path, name: str, *, shared: bool = False) -> bool:
    """Whether a separate process could take the lock right now (classic POSIX lockf)."""
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path / 'locks')!r}, os.O_RDWR)\n"
        f"op = fcntl.LOCK_{'SH' if shared else 'EX'} | fcntl.LOCK_NB\n"
        f"try:\n    fcntl.lockf(fd, op, 1, {_offset(name)})\n"
        "except OSError:\n    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def blocked_waiters(path: Path) -> int:
    """Lock requests blocked on the lock file (the '->' lines of /proc/locks)."""
    ino = os.stat(path / "locks").st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and f":{ino} " in line)


def until(cond: Callable[[], bool]) -> None:
    """Wait for a condition the kernel shows (reading /proc lets other threads run)."""
    deadline = time.monotonic() + GUARD
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"


def test_a_lock_held_by_one_thread_is_refused_to_another(tmp_path: Path) -> None:
    locks = LockDir(tmp_path)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with locks.hold("entry"):
            held.set()
            release.wait(GUARD)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(GUARD)
    with locks.attempt("entry") as taken:
        assert not taken
    with locks.attempt("another") as taken:
        assert taken
    assert not other_process_can_take(tmp_path, "entry", shared=True)
    release.set()
    t.join(GUARD)
    with locks.attempt("entry") as taken:
        assert taken
    assert other_process_can_take(tmp_path, "entry")


def test_a_waiting_thread_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    locks = LockDir(tmp_path)
    order: list[str] = []
    got = threading.Event()

    def waiter() -> None:
        with locks.hold("vol"):
            order.append("waiter")
            got.set()

    with locks.hold("vol"):
        t = threading.Thread(target=waiter)
        t.start()
        until(lambda: blocked_waiters(tmp_path) == 1)  # in the kernel, waiting for us
        assert not got.is_set()
        order.append("holder")
    assert got.wait(GUARD)
    t.join(GUARD)
    assert order == ["holder", "waiter"]


def test_shared_holds_coexist_and_keep_out_an_exclusive_one(tmp_path: Path) -> None:
    locks = LockDir(tmp_path)
    inside = threading.Barrier(3, timeout=GUARD)  # both readers in at once, and the test
    leave = threading.Event()

    def reader() -> None:
        with locks.hold("entry", shared=True):
            inside.wait()
            leave.wait(GUARD)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    inside.wait()  # would time out (BrokenBarrierError) if a reader excluded the other
    with locks.attempt("entry") as taken:
        assert not taken  # garbage collection must wait for the users of an entry
    assert other_process_can_take(tmp_path, "entry", shared=True)
    assert not other_process_can_take(tmp_path, "entry")
    leave.set()
    for t in readers:
        t.join(GUARD)
    with locks.attempt("entry") as taken:
        assert taken


def test_releasing_one_lock_keeps_the_others(tmp_path: Path) -> None:
    """With POSIX locks, closing any descriptor of the file drops all of the process's
    locks; here each hold is its own, whatever another thread does."""
    locks = LockDir(tmp_path)
    with locks.hold("a"):
        for _ in range(3):
            with locks.hold("b"):
                pass
        fd = os.open(tmp_path / "locks", os.O_RDONLY)
        os.close(fd)
        assert not other_process_can_take(tmp_path, "a", shared=True)
    assert other_process_can_take(tmp_path, "a")


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    locks = LockDir(tmp_path)
    with locks.hold("warm"):
        pass  # creates the file
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(tmp_path / 'locks')!r}, os.O_RDWR)\n"
        f"fcntl.lockf(fd, fcntl.LOCK_EX, 1, {_offset('entry')})\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with locks.attempt("entry") as taken:
            assert not taken
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(GUARD)
    with locks.attempt("entry") as taken:  # released by the process's exit
        assert taken


def test_the_lock_file_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("host file")
    d = tmp_path / "locks-dir"
    d.mkdir()
    (d / "locks").symlink_to(target)
    with pytest.raises(OSError) as e, LockDir(d).hold("x"):
        pass
    assert e.value.errno == errno.ELOOP
    assert target.read_text() == "host file"
