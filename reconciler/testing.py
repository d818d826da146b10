"""For a cloud's own repository: pin the actions its manifests plan, with pytest and syrupy.

The manifests are reviewed where they change, far from the host. Export the host's state
there (`reconcile observe --out STATE.json`, on the host), commit or fetch it beside the
manifests, and pin what a change would do:

    from reconciler.testing import plan_directory

    def test_planned_actions(snapshot):
        review = plan_directory("manifests", "observed-state.json", "config.yaml")
        assert review.json == snapshot

`plan_directory` plans exactly as `reconcile --dry-run --observed STATE` does (no
connection is opened) and returns the plan with its JSON, text and Markdown renderings;
none of them carries the state's age, so a snapshot stays put as time passes.
`examples/review/` shows it, and the project's own suite runs that example.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from reconciler.control.session import plan_offline
from reconciler.diff import PlanOptions
from reconciler.diff.render import to_json, to_markdown, to_text
from reconciler.model import Plan
from reconciler.schema import exported
from reconciler.schema.load import load_config


@dataclass(frozen=True)
class Review:
    plan: Plan
    json: str
    text: str
    markdown: str

    @property
    def has_errors(self) -> bool:
        return bool(self.plan.errors)


def plan_directory(
    manifests: str | os.PathLike[str],
    state: str | os.PathLike[str],
    config: str | os.PathLike[str],
    *,
    prune: bool = False,
    allow_replace: bool = False,
    force: bool = False,
) -> Review:
    """Plan the manifests under `manifests` against the exported `state`, with `config`."""
    cfg = load_config(os.fspath(config))
    observed, _ = exported.load(os.fspath(state))
    options = PlanOptions(
        allow_replace=allow_replace,
        prune=prune,
        force=force,
        max_delete_percent=cfg.safety.max_delete_percent,
    )
    _, p = plan_offline(cfg, [os.fspath(manifests)], options, observed)
    return Review(p, to_json(p), to_text(p), to_markdown(p))
