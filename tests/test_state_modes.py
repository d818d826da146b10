"""The state directory is 0700 and every file the reconciler keeps there 0600, whatever the
umask (reconciler/util/statedir.py): the records, the status, the manifest cache, the locks,
SQLite's side files; an existing looser one is tightened."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.schema.speed import mcache
from reconciler.util.statedir import private_dir, private_file
from tests.env import Env, disk
from tests.test_loop import loop, ready, wait_until


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(top: Path) -> dict[str, str]:
    """Every entry under `top` (and `top` itself, as "."): its permission bits, in octal."""
    out = {".": f"{stat.S_IMODE(top.lstat().st_mode):04o}"}
    for p in top.rglob("*"):
        out[str(p.relative_to(top))] = f"{stat.S_IMODE(p.lstat().st_mode):04o}"
    return out


def private(found: dict[str, str], top: Path) -> dict[str, str]:
    """What `found` should be: 0700 for directories, 0600 for everything else."""
    return {k: "0700" if (top / k).is_dir() else "0600" for k in found}


@pytest.mark.libvirtd
def test_every_state_file_is_private_under_umask_000(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))  # new manifests are cached too
    state = env.root / "state"
    assert not state.exists()
    with umask(0o000):
        inst = env.manifest("vm", [disk("d", size="1MiB")])
        rc, out, err = env.run()
        assert rc == 0, out + err
        assert {"records.sqlite", "manifest-cache.json"} <= set(modes(state))
        with loop(env):
            wait_until("the instance to be Ready", lambda: ready(env, inst))
            # The loop holds both databases open: their -wal and -shm files exist now.
            during = modes(state)
        after = modes(state)
    assert {"watch.lock", "status.sqlite", "status.sqlite-wal", "records.sqlite-wal"} <= set(during)
    assert during == private(during, state)
    assert after == private(after, state)


@pytest.mark.libvirtd
def test_a_looser_state_dir_is_tightened(env: Env) -> None:
    """As an older reconciler left it under umask 022: the next run tightens it, once."""
    env.manifest("vm", [disk("d", size="1MiB")])
    state = env.root / "state"
    rc, out, err = env.run()
    assert rc == 0, out + err
    state.chmod(0o755)
    for p in state.iterdir():
        p.chmod(0o644)
    rc, out, err = env.run("--dry-run")
    assert rc == 0, out + err
    assert "state.tightened" in err
    found = modes(state)
    assert found == private(found, state)
    rc, out, err = env.run("--dry-run")
    assert rc == 0 and "state.tightened" not in err  # nothing left to say


def test_parents_made_for_the_state_dir_are_private_too(tmp_path: Path) -> None:
    with umask(0o000):
        private_dir(tmp_path / "a" / "b" / "state")
        private_file(tmp_path / "a" / "b" / "state" / "records.sqlite")
    found = modes(tmp_path / "a")
    assert found == {
        ".": "0700",
        "b": "0700",
        "b/state": "0700",
        "b/state/records.sqlite": "0600",
    }


def test_a_state_dir_of_another_user_is_left_and_reported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    os.chown(d, 65534, 65534)
    private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert "state.foreign_owner" in capfd.readouterr().err
