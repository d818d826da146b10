"""A key source that is a command (config `keys: {command: [PROG, ARGS...], timeout: T}`):
the way to a KMS, as ceph-csi's KMS plugins are. It is called as

  PROG ARGS get UUID      the key of secret UUID on stdout (64 lowercase hex digits, one
                          newline after them allowed), exit 0; no such key: exit non-zero
  PROG ARGS put UUID      store the key read from stdin as UUID (replacing one of a redo)
  PROG ARGS delete UUID   forget UUID's key; one already gone is fine (exit 0)

each through `run.bounded`: only PATH and LC_ALL=C, in /, a session of its own, its whole
process group killed past `timeout` or past 4 KiB on stdout or stderr.

The command is not ours, so what it prints is judged, never trusted or echoed: a `put` is
followed by a `get` that must give the same key back before any secret or volume is made
with it (a command that ignored its stdin, or stored something else, fails the create
while nothing depends on the key yet); a fetched key must be exactly 64 lowercase hex
digits. Error messages never quote stdout (a key), nor the stderr of `get` and `put` (a
command tracing itself, `set -x`, prints the key there): they give its byte count.
`delete`'s stderr is quoted as one bounded line with every run of hex digits masked.
"""

from __future__ import annotations

import re
import signal

from reconciler.drivers.host.run import Bounded, bounded
from reconciler.model.errors import ReconcileError
from reconciler.util import faults

KEY = re.compile(rb"[0-9a-f]{64}\n?")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{8,}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_QUOTED = 200  # characters of a delete's stderr line that an error quotes


class KeyCommandError(ReconcileError):
    """The key command failed, or gave what is not a key."""


def check_key(data: bytes, where: str) -> bytes:
    """`data` as a key (64 lowercase hex digits, a newline after them dropped), or
    KeyCommandError that never quotes it."""
    if KEY.fullmatch(data) is None:
        raise KeyCommandError(
            f"{where} is not a key: a key is 64 lowercase hex digits, this was "
            f"{len(data)} bytes (not quoted)"
        )
    return data[:64]


def _ended(res: Bounded, timeout: float) -> str:
    if res.killed == "timeout":
        return f"it did not finish within {timeout:g} s (its process group was killed)"
    if res.killed is not None:
        return f"it wrote more than 4 KiB on {res.killed} (its process group was killed)"
    if res.returncode < 0:
        try:
            name = signal.Signals(-res.returncode).name
        except ValueError:
            name = f"signal {-res.returncode}"
        return f"it was killed by {name}"
    return f"it exited with status {res.returncode}"


def _one_line(err: bytes) -> str:
    """A delete's stderr as one bounded line: its last non-blank line, printable ASCII,
    every run of 8 or more hex digits masked (a key, or part of one, never passes)."""
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    line = _HEX_RUN.sub("[hex]", _UNPRINTABLE.sub("?", lines[-1].strip()))
    return line if len(line) <= _QUOTED else line[:_QUOTED] + "..."


class KeyCommand:
    """A KMS's command as a key source (see the module docstring)."""

    def __init__(self, argv: list[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.label = f"key command {self.argv[0]}"

    def _run(self, verb: str, uuid_: str, stdin: bytes | None = None) -> Bounded:
        return bounded(
            [*self.argv, verb, uuid_],
            stdin=stdin,
            timeout=self.timeout,
            what=f"{self.label} {verb} {uuid_}",
        )

    def _failed(self, verb: str, uuid_: str, res: Bounded) -> KeyCommandError:
        said = (
            f"; its stderr ({len(res.stderr)} bytes) is not quoted: it may hold the key"
            if res.stderr
            else ""
        )
        return KeyCommandError(
            f"{self.label} {verb} {uuid_} failed: {_ended(res, self.timeout)}{said}"
        )

    def get(self, uuid_: str) -> bytes:
        """The key of `uuid_` from the command; KeyCommandError (quoting nothing it printed)
        when it fails or prints anything but a key."""
        res = self._run("get", uuid_)
        if res.killed or res.returncode != 0:
            raise self._failed("get", uuid_, res)
        return check_key(res.stdout, f"what {self.label} get {uuid_} printed")

    def put(self, uuid_: str, key: bytes) -> None:
        """Store `key` as `uuid_` and read it back: the same key, or KeyCommandError."""
        res = self._run("put", uuid_, stdin=key)
        if res.killed or res.returncode != 0:
            raise self._failed("put", uuid_, res)
        if self.get(uuid_) != key:
            raise KeyCommandError(
                f"{self.label} put {uuid_} succeeded but a get right after gave back another "
                "key: the command does not keep what it is given on stdin"
            )
        faults.point("key.stored")

    def delete(self, uuid_: str) -> None:
        """Forget `uuid_`'s key (one already gone must succeed: a redo)."""
        res = self._run("delete", uuid_)
        if res.killed or res.returncode != 0:
            line = _one_line(res.stderr)
            raise KeyCommandError(
                f"{self.label} delete {uuid_} failed: {_ended(res, self.timeout)}"
                + (f": {line}" if line else "")
            )
        faults.point("key.deleted")
