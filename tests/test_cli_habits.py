"""The CLI under an operator's habits (issue 21, items 11-13): installed without Ceph's
bindings, a first libvirt connection that fails, image URLs that refuse, global options
before a subcommand, and `reconcile status` after one-shot applies."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.env import ROOT, Env, disk

# Ceph's bindings unimportable, as in a venv made without --system-site-packages.
NO_CEPH = (
    "import sys; sys.modules['rados'] = None; sys.modules['rbd'] = None; "
    "from reconciler.cli import main; sys.exit(main(sys.argv[1:]))"
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
