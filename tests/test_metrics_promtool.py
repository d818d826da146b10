"""The loop's metrics as Prometheus's own linter reads them: `promtool check metrics`
(Debian's prometheus package, scripts/setup.sh) passes the exposition the metrics port
serves, with every metric present: reconciles of both results, a queue, and a long step
under way."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from reconciler.control.metrics import Metrics
from reconciler.util import progress


def test_promtool_passes_the_loops_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/setup.sh installs prometheus)")
    m = Metrics()
    m.reconciled("success")
    m.reconciled("error")
    m.adds.inc()
    m.depth.set(2)
    m.actions.labels("create", "done").inc()
    m.readiness([("i-1", False)])
    with progress.acting("migrate", "i-1", "root"), progress.task("convert to p/v", 100) as t:
        t.advance(40)
        text = generate_latest(m.registry).decode()
    assert (
        'reconcile_step_done_bytes{action="migrate",disk="root",instance="i-1",step="convert"} 40.0'
        in text
    )
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""
