"""A forked worker that shares a list of independent jobs with this process.

Loading manifests is CPU work in Python (libyaml's events, pydantic), so one process uses
one core; the hosts this runs on have two or more. `Worker.start(n, job)` forks a process
that runs job(i) for i in [0, n) from the back of the list while this process takes
chunks from the front (`claim`), after whatever else it has to do first. Each side
publishes how far it has claimed in two counters in shared memory, so they meet where
their work balances; near the meeting point both may take the same chunk, and this
process keeps its own result.

What a job returns must be plain data (marshal: str, int, float, bool, None, lists, tuples,
dicts): it is sent back through a pipe in length-prefixed frames, one per chunk, and the
caller rebuilds its objects from it. Nothing here decides what a result means. A worker
given a `then` stays after its last chunk for one more piece of work: `hand_off(data)`
passes it plain data, and it runs then(data) while this process goes on (the manifest
cache is written so, while the plan is made); `close` waits for that.

A worker never outlives the run and never hangs it:
  * it is forked only from a single-threaded process: a fork copies only the calling
    thread, and a lock another thread held (libvirt's, logging's) would stay held in the
    child;
  * it writes after every chunk; once this process is gone its writes fail with EPIPE and
    it exits, and `close` (called however loading ends) kills and reaps it;
  * `wait` stops when the worker says it is done or exits, or when nothing arrived for
    STALL_S; jobs not delivered by then are the caller's to run (`missing`), and `failure`
    says why; `close` waits at most STALL_S for work handed off;
  * it leaves with os._exit: nothing this process buffered, opened or registered (stdout,
    the records database, atexit handlers) is flushed or closed by the child too.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import marshal
import mmap
import os
import select
import signal
import threading
from collections.abc import Callable
from typing import Any

from reconciler.util.logs import get_logger

log = get_logger(__name__)

CHUNK = 32  # jobs per claim: ~5 ms of manifest loading; the two sides overlap by at most one
# After this process's last claim, how long a worker may send nothing (it has one chunk
# left at most) before it is stopped and its jobs are run here.
STALL_S = 30.0
_HEADER = 4  # frame length, big-endian
_RESULTS, _ERROR, _DONE = 0, 1, 2  # frame kinds
_FAILED_EXIT = 70  # the worker's exit status after an exception in a job or in `then`


def can_fork() -> bool:
    """Fork only where it is safe and helps: os.fork exists, two CPUs are ours, and this
    process runs one thread (Python's or any other, as Linux counts them)."""
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    with contextlib.suppress(OSError):
        return len(os.listdir("/proc/self/task")) == 1
    return True


class _Counters:
    """front (claimed by this process up to, excluding) and back (claimed by the worker
    from, including), in an anonymous shared mapping; each is written by one side only."""

    def __init__(self, n: int) -> None:
        self._map = mmap.mmap(-1, 8)
        self._ints = memoryview(self._map).cast("i")  # aligned 4-byte stores: never torn
        self._ints[0], self._ints[1] = 0, n

    @property
    def front(self) -> int:
        return self._ints[0]

    @front.setter
    def front(self, value: int) -> None:
        self._ints[0] = value

    @property
    def back(self) -> int:
        return self._ints[1]

    @back.setter
    def back(self, value: int) -> None:
        self._ints[1] = value

    def close(self) -> None:
        self._ints.release()
        self._map.close()


class Worker:
    """One forked process running `job` on the jobs this process does not claim first."""

    def __init__(self, n: int, pid: int, fd: int, then_fd: int | None, counters: _Counters) -> None:
        self.n = n
        self.pid: int | None = pid
        self.failure: str | None = None
        self.handed = False  # whether hand_off gave the worker its `then` to run
        self._fd: int | None = fd
        self._then_fd = then_fd  # where hand_off writes; closing it tells the worker to go
        self._counters = counters
        self._buf = bytearray()
        self._delivered: set[int] = set()
        self._done = False  # the worker has sent all it will send of the jobs
        self._front = 0  # this process's claims end here

    @classmethod
    def start(
        cls, n: int, job: Callable[[int], Any], then: Callable[[Any], None] | None = None
    ) -> Worker | None:
        """Fork a worker for jobs [0, n) (and `then`, see hand_off); None when forking is
        not possible here."""
        if n <= 0 or not can_fork():
            return None
        counters = _Counters(n)
        rfd, wfd = os.pipe()
        then_r, then_w = os.pipe() if then is not None else (None, None)
        with contextlib.suppress(OSError, AttributeError):  # Linux only, and best effort
            # A larger pipe lets the worker stream more results while this process is busy.
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("worker.fork_failed", error=str(e))
            for fd in (rfd, wfd, then_r, then_w):
                if fd is not None:
                    os.close(fd)
            counters.close()
            return None
        if pid == 0:  # the worker: it never returns from here
            status = _FAILED_EXIT
            try:
                os.close(rfd)
                if then_w is not None:
                    os.close(then_w)
                status = _work(job, n, wfd, counters)
                if status == 0 and then is not None and then_r is not None:
                    status = _then(then, then_r, wfd)
            finally:
                os._exit(status)
        os.close(wfd)
        if then_r is not None:
            os.close(then_r)
        os.set_blocking(rfd, False)
        return cls(n, pid, rfd, then_w, counters)

    # -- this process's side ----------------------------------------------------------

    def claim(self) -> range | None:
        """The next chunk of jobs for this process, or None when the two sides have met."""
        back = self._counters.back
        if self._front >= back:
            return None
        start, self._front = self._front, min(self._front + CHUNK, back)
        self._counters.front = self._front
        return range(start, self._front)

    def poll(self) -> list[tuple[int, Any]]:
        """Results the worker has sent so far, without waiting: (index, result), each
        index once, none that this process had claimed when they arrived."""
        if self._fd is not None:
            self._read()
        return self._take()

    def wait(self) -> list[tuple[int, Any]]:
        """After the last claim: the rest of the worker's results, until it exits, stops
        sending for STALL_S, or dies. Then `missing` lists the jobs nobody delivered."""
        out: list[tuple[int, Any]] = []
        while self._fd is not None and not self._done:
            ready, _, _ = select.select([self._fd], [], [], STALL_S)
            if not ready:
                self.failure = f"it sent nothing for {STALL_S:g} s and was stopped"
                self._stop()
                break
            self._read()
            out += self._take()
        return out + self._take()

    def missing(self) -> list[int]:
        """Jobs neither side completed (the worker died, or was stopped): run them here."""
        return [i for i in range(self._front, self.n) if i not in self._delivered]

    def hand_off(self, data: Any) -> bool:
        """After wait(): have the worker run its `then` on `data` (plain data) while this
        process goes on. False when it cannot (no `then`, or the worker is gone or did not
        finish its jobs): then the caller does that work itself."""
        if self._then_fd is None or self.pid is None or not self._done or self.failure:
            return False
        payload = marshal.dumps(data)
        fd, self._then_fd = self._then_fd, None
        try:
            os.set_blocking(fd, False)
            with memoryview(payload) as view:
                sent = 0
                while sent < len(view):
                    _, ready, _ = select.select([], [fd], [], STALL_S)
                    if not ready:  # a worker that does not read is stopped
                        self.failure = f"it took nothing for {STALL_S:g} s and was stopped"
                        self._stop()
                        return False
                    with contextlib.suppress(BlockingIOError):
                        sent += os.write(fd, view[sent:])
        except OSError:  # the worker died after its jobs: EPIPE
            return False
        finally:
            os.close(fd)  # the end of the data, for the worker
        self.handed = True
        return True

    def close(self) -> None:
        """Let the worker finish work handed off (STALL_S at most), else stop it; reap it.
        Idempotent. After a hand-off, `failure` says why that work did not get done."""
        if self._then_fd is not None:
            os.close(self._then_fd)  # a worker waiting for a hand-off leaves
            self._then_fd = None
        if self.handed:
            while self._fd is not None:
                ready, _, _ = select.select([self._fd], [], [], STALL_S)
                if not ready:
                    self.failure = f"it did not finish within {STALL_S:g} s and was stopped"
                    break
                self._read()
                self._take()
        self._stop()
        self._counters.close()

    # -- internals --------------------------------------------------------------------

    def _read(self) -> None:
        assert self._fd is not None
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return
            if not data:  # end of file: the worker has exited
                self._reap()
                return
            self._buf += data

    def _take(self) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        buf, pos = self._buf, 0
        while len(buf) - pos >= _HEADER:
            size = int.from_bytes(buf[pos : pos + _HEADER], "big")
            end = pos + _HEADER + size
            if len(buf) < end:
                break
            kind, start, payload = marshal.loads(buf[pos + _HEADER : end])
            pos = end
            if kind == _ERROR:
                self.failure = str(payload)
                continue
            if kind == _DONE:
                self._done = True
                continue
            for offset, result in enumerate(payload):
                i = start + offset
                if i >= self._front and i not in self._delivered:
                    self._delivered.add(i)
                    out.append((i, result))
        del buf[:pos]
        return out

    def _reap(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.pid is None:
            return
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else's SIGCHLD handler: status unknown
            code = 0
        self.pid = None
        if code != 0 and self.failure is None:
            self.failure = (
                f"it was killed by signal {-code}" if code < 0 else f"it exited with status {code}"
            )

    def _stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._reap()


# -- the worker's side ---------------------------------------------------------------------


def _work(job: Callable[[int], Any], n: int, fd: int, counters: _Counters) -> int:
    """Claim chunks from the back and send their results; the exit status to leave with."""
    # The worker lives for one load and exits with os._exit: collecting cycles would only
    # walk (and copy-on-write) the heap it shares with its parent. This process only.
    gc.disable()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # die quietly with the run, no traceback
    os.set_blocking(fd, False)
    out = bytearray()
    try:
        while True:
            front, back = counters.front, counters.back
            if back <= front:
                break
            start = max(back - CHUNK, front)
            counters.back = start
            results = [job(i) for i in range(start, back)]
            _frame(out, (_RESULTS, start, results))
            _send(fd, out, block=False)
    except BrokenPipeError:
        return 1  # this process is gone: nobody to send to
    except BaseException as e:
        _frame(out, (_ERROR, 0, f"{type(e).__name__}: {e}"))
        with contextlib.suppress(OSError):
            _send(fd, out, block=True)
        return _FAILED_EXIT
    _frame(out, (_DONE, 0, None))
    try:
        _send(fd, out, block=True)
    except BrokenPipeError:
        return 1
    return 0


def _then(then: Callable[[Any], None], then_fd: int, fd: int) -> int:
    """Wait for what hand_off sends (nothing: the parent closed the pipe) and run then()."""
    data = bytearray()
    while chunk := os.read(then_fd, 1 << 20):
        data += chunk
    if not data:
        return 0
    try:
        then(marshal.loads(data))
    except BaseException as e:
        out = bytearray()
        _frame(out, (_ERROR, 0, f"{type(e).__name__}: {e}"))
        with contextlib.suppress(OSError):
            _send(fd, out, block=True)
        return _FAILED_EXIT
    return 0


def _frame(out: bytearray, value: tuple[int, int, Any]) -> None:
    data = marshal.dumps(value)
    out += len(data).to_bytes(_HEADER, "big")
    out += data


def _send(fd: int, out: bytearray, *, block: bool) -> None:
    if block:
        os.set_blocking(fd, True)
    while out:
        try:
            n = os.write(fd, out)
        except BlockingIOError:
            return  # the pipe is full: keep working, send the rest later
        del out[:n]
