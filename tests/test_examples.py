"""The project's examples run as they are shown: the review example's own pytest run."""

from __future__ import annotations

import subprocess
import sys

from tests.env import ROOT


def test_the_review_example_passes_as_a_clouds_repository_would_run_it() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/review"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 passed" in res.stdout
