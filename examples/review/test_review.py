"""Pin what the example manifests would do on the host, as a cloud's own repository would.

`observed-state.json` was exported on the host with `reconcile observe --out` (by
scripts/review-example.sh); it holds the example instances converged but for one drift
(db-1's config drive was removed behind the reconciler's back). Run with
`pytest examples/review`; after a deliberate change to the manifests,
`pytest examples/review --snapshot-update` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from syrupy.assertion import SnapshotAssertion

from reconciler.testing import Review, plan_directory

HERE = Path(__file__).resolve().parent


@pytest.fixture
def review(monkeypatch: pytest.MonkeyPatch) -> Review:
    # Manifest paths appear in the plan as given: relative ones keep the snapshot the same
    # in every checkout.
    monkeypatch.chdir(HERE.parent)
    return plan_directory("manifests", "review/observed-state.json", "review/config.yaml")


def test_planned_actions(review: Review, snapshot: SnapshotAssertion) -> None:
    assert review.json == snapshot


def test_the_review_comment(review: Review, snapshot: SnapshotAssertion) -> None:
    assert review.markdown == snapshot


def test_nothing_destructive_and_no_errors(review: Review) -> None:
    assert not review.has_errors
    assert not any(a.destructive for a in review.plan.actions)
    assert [(a.action.value, a.disk) for a in review.plan.actions] == [("create", "disk.config")]
