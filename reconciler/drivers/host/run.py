"""Running the tools the reconciler uses (qemu-img, mkfs, prlimit): a minimal environment,
only the descriptors they are given, their own message on failure. Below both the drivers
and the image checks (images.py), which share it."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from reconciler.model.errors import ReconcileError


class ToolError(ReconcileError):
    pass


def execute(
    argv: Sequence[str],
    fds: Sequence[int],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool with a minimal environment (plus `env`) and only the descriptors it is
    given; a tool still running after `timeout` seconds is killed and named."""
    try:
        return subprocess.run(
            list(argv),
            pass_fds=tuple(fds),
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **(env or {})},
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ToolError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    msg = (res.stderr or res.stdout).strip().splitlines()
    return msg[-1] if msg else f"exit status {res.returncode}"


def run(argv: Sequence[str], *, fds: Sequence[int] = (), what: str) -> str:
    """Run a tool; on failure raise ToolError with its own message."""
    res = execute(argv, fds, what)
    if res.returncode != 0:
        raise ToolError(f"{what}: {argv[0]} failed: {last_line(res)}")
    return res.stdout
