"""A saved plan is applied exactly or not at all, through the real CLI and daemon."""

from __future__ import annotations

import pytest

from tests.env import Env, cli, disk

pytestmark = pytest.mark.libvirtd


def test_a_stale_precondition_refuses_the_whole_plan(env: Env) -> None:
    insts = {name: env.manifest(name, [disk("d", size="1MiB")]) for name in "abcd"}
    plan = env.root / "plan.json"
    res = env.subprocess("--dry-run", "--plan-out", str(plan))
    assert res.returncode == 0, res.stderr
    # Two of the four preconditions go stale: `a` is made by a live run of its manifest
    # alone (a record and a volume now exist), and a file appears where `b` would go.
    res = cli("--config", str(env.config_path), str(env.manifests / "a.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    stranger = env.volume(insts["b"], "d")
    stranger.write_bytes(b"not ours")
    before = sorted(p.name for p in env.pool_dir().iterdir())

    res = cli("apply", str(plan))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr
    assert "none of its 4 action(s) were applied" in err and "make a new plan" in err
    vol_a, vol_b = env.volume(insts["a"], "d").name, stranger.name
    assert f"create {insts['a']}/d (local/{vol_a}): a record now exists (generation" in err
    assert "the volume now exists" in err
    assert f"create {insts['b']}/d (local/{vol_b}): the volume now exists" in err
    assert insts["c"] not in err and insts["d"] not in err
    assert sorted(p.name for p in env.pool_dir().iterdir()) == before  # nothing else made
    assert not env.volume(insts["c"], "d").exists()

    # A new plan of what is left applies (the stranger is reported, never touched).
    stranger.unlink()
    res = env.subprocess("--dry-run", "--plan-out", str(plan))
    assert res.returncode == 0, res.stderr
    res = cli("apply", str(plan))
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(env.volume(i, "d").exists() for i in insts.values())
    assert env.plan_json()["actions"] == []
