"""Every problem code has exactly one outcome in `reconcile watch`, declared with the code.

The codes are read from the planner's sources (diff/) (every `draft.error(...)` and
`draft.warn(...)`: every `.error`/`.warn` call there is made on the Draft, named `draft`) and
from the loop's (control/), so a code added there without its ProblemCode member, or a member
that nothing emits any more, fails here before any plan is made.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reconciler.control.outcome import Outcome, QueueAction, Result, Settlement, settlement
from reconciler.model import Handling, Problem, ProblemCode, Severity

SOURCE = Path(__file__).resolve().parent.parent / "reconciler"
# What the planner's modules call the plan being built (reconciler/diff/draft.py's Draft).
RECEIVER = "draft"


def planner_codes() -> dict[str, set[str]]:
    """`error` and `warn` -> the code strings the planner passes to each."""
    found: dict[str, set[str]] = {"error": set(), "warn": set()}
    for path in sorted((SOURCE / "diff").rglob("*.py")):
        _scan(path, found)
    return found


def _scan(path: Path, found: dict[str, set[str]]) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in found
        ):
            continue
        # A problem reported through another name would escape the scan: there is one.
        assert isinstance(node.func.value, ast.Name) and node.func.value.id == RECEIVER, (
            f"{path.name}:{node.lineno}: report a problem as {RECEIVER}.{node.func.attr}(...)"
        )
        first = node.args[0] if node.args else None
        # A code computed at run time would escape this test: every code is a literal.
        assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
            f"{path.name}:{node.lineno}: a problem's code must be a string literal"
        )
        found[node.func.attr].add(first.value)


def loop_codes() -> set[str]:
    """The ProblemCode members the loop names itself (its own `apply-failed`)."""
    trees = [ast.parse(p.read_text()) for p in sorted((SOURCE / "control").rglob("*.py"))]
    return {
        ProblemCode[node.attr].value
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ProblemCode"
    }


def test_every_code_the_planner_emits_is_a_member_with_the_handling_of_its_severity() -> None:
    found = planner_codes()
    assert found["error"] and found["warn"]  # the scan sees the planner's calls
    members = {c.value for c in ProblemCode}
    assert found["error"] | found["warn"] <= members, (found["error"] | found["warn"]) - members
    for code in found["error"]:
        assert ProblemCode(code).handling in (Handling.TERMINAL, Handling.RETRY), code
    for code in found["warn"]:
        assert ProblemCode(code).handling is Handling.WARNING, code


def test_every_member_is_emitted_somewhere() -> None:
    found = planner_codes()
    emitted = found["error"] | found["warn"] | loop_codes()
    assert {c.value for c in ProblemCode} == emitted


@pytest.mark.parametrize("code", list(ProblemCode), ids=str)
def test_every_member_has_one_outcome(code: ProblemCode) -> None:
    if code.handling is Handling.WARNING:
        # A warning never fails a reconcile; only owned-elsewhere names the status the
        # loop writes for it (waiting, see outcome.decide).
        assert code.reason == ("OwnedElsewhere" if code is ProblemCode.OWNED_ELSEWHERE else "")
        return
    assert code.reason and code.reason[0].isupper() and code.reason.isalnum(), code.reason
    o = Outcome.of(Problem(Severity.ERROR, code, "what went wrong"))
    assert o.ready == ("False", code.reason, "what went wrong")
    assert o.degraded == ("True", code.reason, "what went wrong")
    if code.handling is Handling.TERMINAL:
        assert o.settled == Settlement(QueueAction.FORGET, "error", terminal=True)
    else:
        assert o.settled == Settlement(QueueAction.BACKOFF, "error", terminal=False)


def test_the_codes_once_retried_forever_wait_for_their_manifest() -> None:
    for code in ("resize-unsupported", "delete-threshold"):
        assert ProblemCode(code).handling is Handling.TERMINAL, code
    # A live owner elsewhere is the normal state while an instance moves: a warning, and
    # the loop waits (no backoff) for a resync to plan the take-over.
    assert ProblemCode("owned-elsewhere").handling is Handling.WARNING


def test_each_result_settles_into_one_queue_action_and_label_and_errors_are_errors() -> None:
    got = {r: settlement(r) for r in Result}
    assert {r for r, s in got.items() if s.label == "error"} == {Result.BACKOFF, Result.TERMINAL}
    assert {r for r, s in got.items() if s.queue is QueueAction.BACKOFF} == {Result.BACKOFF}
    assert {s.label for s in got.values()} == {"success", "error"}


def test_a_problem_serialises_its_code_as_the_plain_string() -> None:
    p = Problem(Severity.ERROR, ProblemCode.RESIZE_UNSUPPORTED, "m", disk="d")
    doc = p.to_json()
    assert doc == {"code": "resize-unsupported", "message": "m", "disk": "d"}
    assert type(doc["code"]) is str
