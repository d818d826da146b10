"""The bounds a saved plan file is read under, without a daemon: nesting is measured
without recursion, and only outside JSON strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.diff import Action, ActionKind, Desired, Plan, PlanOptions, Precondition
from reconciler.saved_plan import (
    MAX_DEPTH,
    MAX_LISTED,
    PlanFileError,
    PlanMismatch,
    SavedPlan,
    check,
    check_shape,
    differences,
    parse,
)
from tests.helpers import example_config


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_up_to_the_limit_passes_and_one_more_does_not() -> None:
    assert check_shape(nested(MAX_DEPTH)) is None
    assert json.loads(nested(MAX_DEPTH)) is not None
    why = check_shape(nested(MAX_DEPTH + 1))
    assert why is not None and f"nested more than {MAX_DEPTH} deep" in why
    mixed = b'{"a": [{"b": [1, {"c": {}}]}], "d": [[], {}]}'
    assert check_shape(mixed) is None


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"reason": "[" * 1000 + '\\"]' + "{" * 1000, "x": ["]]]", '"'], "y": {}})
    assert check_shape(text.encode()) is None


def test_unbalanced_brackets_are_refused_before_a_parse() -> None:
    for data in (b"[" * 10, b"]]]", b"[}", b'{"a": [}'):
        assert check_shape(data) is not None, data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"[" * 100_000,
        b'{"format_version": 1}',
        b'{"format_version": 1, "saved_plan": 7}',
        b'{"format_version": 1, "saved_plan": {}, "actions": "all"}',
        b"1" * 5000,
        b"NaN",
        b'"\\ud800"',
    ],
)
def test_anything_but_a_saved_plan_is_one_plan_file_error(data: bytes) -> None:
    with pytest.raises(PlanFileError) as e:
        parse("p.json", data)
    assert "\n" not in str(e.value) and str(e.value).startswith("saved plan p.json: ")


def _action(disk: str, size: int) -> Action:
    spec = {"size": size, "format": "raw"}
    return Action(
        action=ActionKind.CREATE,
        instance="00000000-0000-4000-8000-000000000001",
        disk=disk,
        pool="local",
        volume=f"00000000-0000-4000-8000-000000000001_{disk}",
        reason="no volume yet",
        patch=({"op": "add", "path": f"/disks/{disk}", "value": spec},),
        destructive=False,
        precondition=Precondition(None, False),
        spec=spec,
    )


def _saved(actions: list[dict[str, Any]]) -> SavedPlan:
    made = {
        "version": 2,
        "config_sha256": "0" * 64,
        "manifests_sha256": "0" * 64,
        "allow_replace": False,
        "prune": False,
        "force": False,
    }
    doc = {
        "format_version": 1,
        "saved_plan": made,
        "actions": actions,
        "errors": [],
        "warnings": [],
        "summary": {},
    }
    return parse("p.json", json.dumps(doc).encode())


def test_differences_are_named_escaped_and_counted() -> None:
    fresh = Plan((_action("a", 1024), _action("b", 2048)), (), ())
    same = [a.to_json() for a in fresh.actions]
    assert differences(_saved(same), fresh) == []
    # The reason is for people: another one is no difference.
    reworded = [{**a, "reason": "because"} for a in same]
    assert differences(_saved(reworded), fresh) == []
    assert differences(_saved(same[::-1]), fresh) == [
        "the actions are in another order than a fresh plan's"
    ]
    # A value from the file is shown as JSON: a control character cannot reach a terminal.
    tampered = [same[0], {**same[1], "spec": {"size": "\x1b[2J", "format": "raw"}}]
    (line,) = differences(_saved(tampered), fresh)
    assert line.endswith('spec.size: "\\u001b[2J" in the plan, 2048 now') and "\x1b" not in line
    # `true` is not `1`.
    flagged = [same[0], {**same[1], "spec": {"size": 2048, "format": "raw", "x": True}}]
    assert differences(_saved(flagged), fresh)[0].endswith("spec.x: true in the plan, absent now")


def test_a_refusal_lists_at_most_max_listed_differences(tmp_path: Path) -> None:
    fresh = Plan((_action("a", 1024),), (), ())
    added = [_action(f"x{i}", 1).to_json() for i in range(3 * MAX_LISTED)]
    with pytest.raises(PlanMismatch) as e:
        check(
            _saved([a.to_json() for a in fresh.actions] + added),
            fresh,
            config=example_config(tmp_path),
            desired=Desired(()),
            options=PlanOptions(),
        )
    text = str(e.value)
    # Both digests ("0" * 64 here) differ too.
    total = 3 * MAX_LISTED + 2
    assert f"none of its {3 * MAX_LISTED + 1} action(s) were applied" in text
    assert f"{total} difference(s):" in text
    assert text.count("\n  ") == MAX_LISTED + 1
    assert text.endswith(f"\n  ... and {total - MAX_LISTED} more")
    assert "the config differs" in text and "the manifests differ" in text
