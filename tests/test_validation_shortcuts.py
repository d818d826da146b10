"""The validators' shortcuts (names and sizes remembered, canonical UUIDs by pattern) give
the answers the full checks give, however often and in whatever order they are asked."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from reconciler.schema.common import check_name
from reconciler.schema.manifest import Manifest
from reconciler.units import parse_size

NAMES = ["disk", "disk.eph0", "a" * 100, "a" * 101, "", ".x", "-x", "a..b", "a/b", "ok_1"]
SIZES = ["1GiB", "512 B", " 1GiB ", "1.5GiB", "1GB", "-1GiB", "10", "1KiB", "0B", "65TiB"]


def _outcome(check: Callable[[str], object], value: str) -> tuple[str, object]:
    try:
        return ("ok", check(value))
    except ValueError as e:
        return ("error", str(e))


@pytest.mark.parametrize(("check", "values"), [(check_name, NAMES), (parse_size, SIZES)])
def test_remembered_answers_are_the_first_ones(
    check: Callable[[str], object], values: list[str]
) -> None:
    first = [_outcome(check, v) for v in values]
    assert any(o[0] == "ok" for o in first) and any(o[0] == "error" for o in first)
    for _ in range(3):
        assert [_outcome(check, v) for v in reversed(values)] == first[::-1]


def _instance_error(instance: str) -> str | None:
    try:
        Manifest.model_validate(
            {"apiVersion": "reconciler/v1", "kind": "InstanceStorage", "instance": instance,
             "deleted": True}
        )  # fmt: skip
    except ValidationError as e:
        return str(e.errors()[0]["msg"])
    return None


def test_only_canonical_uuids_pass() -> None:
    u = str(uuid.uuid4())
    assert _instance_error(u) is None
    assert "lower case with dashes" in (_instance_error(u.upper()) or "")
    assert "lower case with dashes" in (_instance_error(u.replace("-", "")) or "")
    assert "lower case with dashes" in (_instance_error("{" + u + "}") or "")
    assert "must be a UUID" in (_instance_error(u[:-1] + "g") or "")
    assert "must be a UUID" in (_instance_error(u + "0") or "")
