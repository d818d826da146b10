"""Running the tools the reconciler uses (qemu-img, mkfs, prlimit): a minimal environment,
only the descriptors they are given, their own message on failure. Below both the drivers
and the image checks (images.py), which share it."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reconciler.model.errors import ReconcileError
from reconciler.util import progress


class ToolError(ReconcileError):
    pass


# qemu-img's subcommands that report progress with -p ("    (42.00/100%)" lines ending in
# a carriage return on stdout), and the option a quiet compare has, which -p cannot join.
_PROGRESS_SUBCOMMANDS = frozenset({"convert", "compare"})
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def execute(
    argv: Sequence[str],
    fds: Sequence[int],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool with a minimal environment (plus `env`) and only the descriptors it is
    given; a tool still running after `timeout` seconds is killed and named. A qemu-img
    convert or compare run while a progress task is open in this thread reports to it
    (reconciler/util/progress.py)."""
    argv = list(argv)
    task = progress.current()
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **(env or {})}
    try:
        if (
            task is not None
            and argv[:1] == ["qemu-img"]
            and argv[1:2]
            and (argv[1] in _PROGRESS_SUBCOMMANDS)
        ):
            return _with_progress(argv, fds, full_env, timeout, task)
        return subprocess.run(
            argv,
            pass_fds=tuple(fds),
            capture_output=True,
            text=True,
            check=False,
            env=full_env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ToolError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None


def _with_progress(
    argv: list[str],
    fds: Sequence[int],
    env: Mapping[str, str],
    timeout: float | None,
    task: progress.Task,
) -> subprocess.CompletedProcess[str]:
    """`argv` with qemu-img's -p, its percentages read as they come (its other output
    kept, without them, as subprocess.run would give it)."""
    args = [argv[0], argv[1], "-p", *(a for a in argv[2:] if a != "-q")]
    proc = subprocess.Popen(
        args,
        pass_fds=tuple(fds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        stdin=subprocess.DEVNULL,
    )
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(stderr.read()), daemon=True)
    reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    out = bytearray()
    pending = b""
    # poll, not select: a process with many descriptors open (apply's, with its limit
    # raised) has them numbered past select's 1024.
    poller = select.poll()
    poller.register(stdout.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        while True:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                raise subprocess.TimeoutExpired(args, timeout or 0)
            if not poller.poll(int(min(wait, 1.0) * 1000)):
                continue
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                m = _PERCENT.search(line)
                if m is not None:
                    task.reach(float(m.group(1)) / 100)
                elif line.strip():
                    out += line + b"\n"
        out += pending
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        rc = proc.wait(left)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        stdout.close()
    reader.join()
    stderr.close()
    return subprocess.CompletedProcess(
        args, rc, out.decode("utf-8", "replace"), b"".join(err).decode("utf-8", "replace")
    )


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    msg = (res.stderr or res.stdout).strip().splitlines()
    return msg[-1] if msg else f"exit status {res.returncode}"


def run(argv: Sequence[str], *, fds: Sequence[int] = (), what: str) -> str:
    """Run a tool; on failure raise ToolError with its own message."""
    res = execute(argv, fds, what)
    if res.returncode != 0:
        raise ToolError(f"{what}: {argv[0]} failed: {last_line(res)}")
    return res.stdout


# What a bounded program may write on each of stdout and stderr before its group is killed.
BOUND = 4096


@dataclass(frozen=True)
class Bounded:
    """How a bounded program ended: its exit status (negative: the signal that killed it),
    what it wrote, and whether this runner killed its group, and why."""

    returncode: int
    stdout: bytes
    stderr: bytes
    killed: str | None  # "timeout", "stdout" or "stderr" (past BOUND), or None


def bounded(
    argv: Sequence[str], *, stdin: bytes | None, timeout: float, what: str, limit: int = BOUND
) -> Bounded:
    """Run a program that is not ours (a KMS's command): only PATH and LC_ALL=C in its
    environment, in /, no descriptors but its three pipes, in a session and process group
    of its own. The whole group is killed past `timeout` seconds or past `limit` bytes on
    stdout or on stderr (a child it left behind included: the group is killed when the
    program ends, too, while its leader is still unreaped, so the group id cannot have been
    reused). Raises ToolError only when the program cannot be started; its output is the
    caller's to judge (and never to quote carelessly: it may be a key)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        raise ToolError(f"{what}: {argv[0]} cannot be run: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None and proc.stderr is not None
    pidfd = os.pidfd_open(proc.pid)
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    killed: str | None = None
    try:
        if proc.stdin is not None:
            # A key is far smaller than a pipe's buffer: this never blocks, read or not.
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin or b"")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        poller = select.poll()
        for fd in bufs:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(pidfd, select.POLLIN)
        open_fds, exited = set(bufs), False
        while open_fds or not exited:
            wait = deadline - time.monotonic()
            if wait <= 0:
                killed = "timeout"
                break
            for fd, _ in poller.poll(max(1, int(wait * 1000))):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    poller.unregister(fd)
                    continue
                bufs[fd] += chunk
                if len(bufs[fd]) > limit:
                    killed = names[fd]
            if killed:
                break
    finally:
        # The leader is not reaped yet (a zombie at worst), so its group id is still its.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    # At most `limit` plus one read past it each: bounded, and the byte counts honest.
    out, err = (bytes(b) for b in bufs.values())
    return Bounded(rc, out, err, killed)
