"""The CLI under an operator's habits (issue 21, items 11-13): installed without Ceph's
bindings, a first libvirt connection that fails, image URLs that refuse, global options
before a subcommand, and `reconcile status` after one-shot applies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.env import ROOT, Env, disk

# Ceph's bindings unimportable, as in a venv made without --system-site-packages.
NO_CEPH = (
    "import sys; sys.modules['rados'] = None; sys.modules['rbd'] = None; "
    "from reconciler.commands.cli import main; sys.exit(main(sys.argv[1:]))"
)


def run_py(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


@pytest.mark.libvirtd
def test_rbd_pool_without_bindings_is_its_error_and_other_pools_go_on(env: Env) -> None:
    env.extra_pools["ceph"] = {
        "uri": env.uri,
        "libvirtPool": "no-such-rbd-pool",
        "backends": ["rbd"],
        "ceph": {"conf": str(env.root / "ceph.conf"), "pool": "rbd"},
    }
    env.write_config()
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    env.manifest("vm2", [disk("r", backend="rbd", pool="ceph", size="1MiB")])
    for flags in (["--dry-run"], []):
        res = run_py(NO_CEPH, "--config", str(env.config_path), *flags, str(env.manifests))
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "Traceback" not in out, out
        assert "pool ceph cannot be used" in out and "[pool-unreachable]" in out, out
        assert "python3-rbd" in out and "--system-site-packages" in out, out
    assert env.volume(inst, "d").exists()  # the file pool's disk was applied


@pytest.mark.libvirtd
def test_global_options_before_a_subcommand(env: Env, tmp_path: Path) -> None:
    env.manifest("vm", [disk("d", size="1MiB")])
    cfg = str(env.config_path)
    # `status`, `validate` and `apply` after --config/-v: the subcommand, never a manifest.
    rc, out, err = Env.main(["--config", cfg, "status"])
    assert rc == 0 and "0 instance(s)" in out, out + err
    rc, out, err = Env.main(["-v", f"--config={cfg}", "validate", str(env.manifests)])
    assert rc == 0 and "1 valid" in out, out + err
    saved = tmp_path / "plan.json"
    rc, out, err = env.run("--dry-run", "--plan-out", str(saved))
    assert rc == 0, out + err
    rc, out, err = Env.main(["--config", cfg, "-vv", "apply", str(saved), str(env.manifests)])
    assert rc == 0 and "Apply: 1 done" in out, out + err
    # Another option before a subcommand's name: a usage error, nothing planned.
    with pytest.raises(SystemExit) as e:
        Env.main(["--config", cfg, "--dry-run", "status"])
    assert e.value.code == 2
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "--config", cfg, "--dry-run", "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert "--dry-run before 'status'" in res.stderr, res.stderr
    # The default command keeps its global options first (`reconcile --config C PATH`).
    rc, out, _ = env.run("--dry-run")
    assert rc == 0 and "No changes." in out


def test_first_libvirt_connection_failing_says_so_in_one_line(tmp_path: Path) -> None:
    """No daemon at the config's URI (a private socket path): one line names the URI and
    asks whether libvirtd runs there; exit 1, no traceback. (The subprocess's timeout only
    keeps a hang from stalling the suite; the wait is FIRST_CONTACT, test_retry_libvirt.)"""
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-daemon.sock'}"
    env = Env(tmp_path / "env", uri, {"local": ("nowhere", tmp_path / "pool")})
    env.write_config()
    env.manifest("vm", [disk("d", size="1MiB")])
    res = env.subprocess(timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if uri in line]
    assert len(lines) == 1, out
    assert f"cannot connect to libvirt at {uri}" in lines[0], lines
    assert f"is libvirtd running at {uri}?" in lines[0], lines
    assert "libvirt.reconnect" not in res.stderr  # quick tries of a first contact: no notices


def status_rows(env: Env) -> dict[str, dict[str, Any]]:
    rc, out, err = Env.main(["status", "--config", str(env.config_path), "--output", "json"])
    assert rc == 0, err
    return {r["instance"]: r for r in json.loads(out)}


def ready(row: dict[str, Any]) -> tuple[str, str]:
    (c,) = [c for c in row["conditions"] if c["type"] == "Ready"]
    return c["status"], c["reason"]


@pytest.mark.libvirtd
def test_status_shows_what_one_shot_applies_reconciled(env: Env) -> None:
    a = env.manifest("a", [disk("d", size="1MiB")])
    b = env.manifest("b", [disk("d", size="1MiB"), disk("e", size="1MiB")])
    assert env.run("--dry-run")[0] == 0
    assert status_rows(env) == {}  # a dry run changes nothing, the status neither
    assert env.run()[0] == 0
    rows = status_rows(env)
    assert set(rows) == {a, b}
    assert ready(rows[a]) == ("True", "Converged") and rows[b]["disks"] == 2
    (cond,) = [c for c in rows[a]["conditions"] if c["type"] == "Ready"]
    assert cond["message"] == "1 action(s) applied (one-shot run)"
    rc, out, _ = Env.main(["--config", str(env.config_path), "status"])
    assert rc == 0 and a in out and "Converged" in out and "2 instance(s)" in out
    # An error the plan shows is the instance's status, with the loop's reason.
    env.manifest("a", [disk("d", size="512KiB")], instance=a)  # a shrink
    assert env.run()[0] == 1
    rows = status_rows(env)
    assert ready(rows[a]) == ("False", "ShrinkRefused") and "shrink" in rows[a]["lastError"]
    assert ready(rows[b]) == ("True", "Converged")
    # Nothing to do for it any more: Ready again, though no action was applied.
    env.manifest("a", [disk("d", size="1MiB")], instance=a)
    rc, out, _ = env.run()
    assert rc == 0 and "No changes." in out
    assert ready(status_rows(env)[a]) == ("True", "Converged")
    # Its manifest gone and its disks deleted (--prune): its status goes too.
    env.remove_manifest("a")
    assert env.run("--prune", "--force")[0] == 0
    assert set(status_rows(env)) == {b}


def test_not_ready_reads_only_statuses_whose_ready_is_not_true(tmp_path: Path) -> None:
    """What a one-shot run with nothing to do reads; a message quoting a Ready True
    condition's JSON does not hide a status that is not Ready."""
    from reconciler.control.status import InstanceStatus, StatusStore, now_iso, with_conditions

    trick = '"status": "True", "type": "Ready"}'
    store = StatusStore(tmp_path / "state" / "status.sqlite")
    try:
        rows = [
            with_conditions(
                None,
                InstanceStatus(name, 1, "", 1),
                {"Ready": (ready, "Reason", trick), "Degraded": ("False", "AsExpected", "")},
                now_iso(),
            )
            for name, ready in (("a", "True"), ("b", "False"), ("c", "Unknown"), ("d", "True"))
        ]
        store.put_many(rows)
        assert [st.instance for st in store.not_ready()] == ["b", "c"]
    finally:
        store.close()
