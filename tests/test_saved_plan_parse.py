"""The bounds a saved plan file is read under, without a daemon: nesting and values are
counted without recursion (by reconciler/schema/bounded.py), and only outside JSON strings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.saved_plan import (
    MAX_DEPTH,
    MAX_LISTED,
    MAX_VALUES,
    PlanFileError,
    PlanMismatch,
    SavedPlan,
    check,
    differences,
    parse,
)
from reconciler.diff import PlanOptions
from reconciler.model import Action, ActionKind, Desired, Plan, Precondition
from reconciler.schema.bounded import json_depth
from tests.helpers import example_config


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def refusal(data: bytes) -> str:
    with pytest.raises(PlanFileError) as e:
        parse("p.json", data)
    return str(e.value)


# Within the bounds, JSON that is no plan: refused for that, after a parse.
NO_PLAN = "saved plan p.json: is not a plan"


def test_nesting_up_to_the_limit_passes_and_one_more_does_not() -> None:
    assert refusal(nested(MAX_DEPTH)).startswith(NO_PLAN)
    assert json.loads(nested(MAX_DEPTH)) is not None
    assert refusal(nested(MAX_DEPTH + 1)) == (
        f"saved plan p.json: JSON nested deeper than {MAX_DEPTH} levels"
    )
    mixed = b'{"a": [{"b": [1, {"c": {}}]}], "d": [[], {}]}'
    assert json_depth(mixed) == 6 and refusal(mixed).startswith(NO_PLAN)


def test_values_up_to_the_limit_pass_and_one_more_does_not() -> None:
    # One array of MAX_VALUES - 1 numbers: MAX_VALUES values.
    assert refusal(b"[" + b"0," * (MAX_VALUES - 2) + b"0]").startswith(NO_PLAN)
    assert refusal(b"[" + b"0," * (MAX_VALUES - 1) + b"0]") == (
        f"saved plan p.json: JSON of more than {MAX_VALUES} values"
    )
    # Commas and brackets in a string are no values.
    assert refusal(b'{"a": "' + b",[{" * MAX_VALUES + b'"}').startswith(NO_PLAN)


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"reason": "[" * 1000 + '\\"]' + "{" * 1000, "x": ["]]]", '"'], "y": {}})
    assert json_depth(text.encode()) == 2 and refusal(text.encode()).startswith(NO_PLAN)


def test_unbalanced_brackets_are_refused_in_one_line() -> None:
    """The parse refuses them: the depth counted before it is what nests before the first
    bracket that does not match, where the parse stops."""
    for data in (b"[" * 10, b"]]]", b"[}", b'{"a": [}'):
        assert re.fullmatch(r"saved plan p\.json:1:\d+: not valid JSON: [^\n]+", refusal(data))


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
    # The file, and where in it if the JSON is not valid.
    assert re.fullmatch(r"saved plan p\.json(:\d+:\d+)?: [^\n]+", refusal(data))


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
