"""The bounds a saved plan file is read under, without a daemon: nesting is measured
without recursion, and only outside JSON strings."""

from __future__ import annotations

import json

import pytest

from reconciler.saved_plan import MAX_DEPTH, PlanFileError, check_shape, parse


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
