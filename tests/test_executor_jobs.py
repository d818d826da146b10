"""How the executor runs actions side by side (`--jobs`): which may overlap, and which wait.

The actions' work is replaced by a recorder, so these tests see only the scheduling: the
libvirt tests (test_images, test_crash, test_concurrency) run the real work in parallel.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from reconciler.apply.executor import Executor
from reconciler.drivers.host.store import open_store
from reconciler.drivers.records import Records
from reconciler.model.plan import Action, ActionKind, Plan, Precondition

GUARD = 30.0


def action(
    volume: str, kind: ActionKind = ActionKind.CREATE, replaces: tuple[str, str] | None = None
) -> Action:
    return Action(
        action=kind,
        instance=f"inst-{volume}",
        disk="root",
        pool="local",
        volume=volume,
        reason="test",
        patch=(),
        destructive=False,
        precondition=Precondition(None, False),
        replaces=replaces,
    )


Gates = dict[tuple[str, ActionKind], threading.Barrier]


class Recorder(Executor):
    """Records when each action starts and ends; an action may wait at a gate first."""

    def __init__(self, tmp: Path, jobs: int, gates: Gates) -> None:
        self.text = io.StringIO()
        # A live run's executor (a replanner it never calls): a saved plan's would first
        # check every precondition against pools these tests do not have.
        super().__init__(
            Records(open_store(tmp / "state"), {}),
            {},
            replan=lambda a: Plan((a,), (), ()),
            out=self.text,
            jobs=jobs,
        )
        self.gates = gates
        self.events: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.most = 0
        self._ev = threading.Lock()

    def _one(self, a: Action) -> tuple[str, str]:
        with self._ev:
            assert a.volume not in self.running, f"two actions on {a.volume} at once"
            self.events.append(("start", a.volume))
            self.running.add(a.volume)
            self.most = max(self.most, len(self.running))
        gate = self.gates.get((a.volume, a.action))
        if gate is not None:
            gate.wait()  # BrokenBarrierError (a failure) if its partners never run beside it
        with self._ev:
            self.running.discard(a.volume)
            self.events.append(("end", a.volume))
        if a.volume == "bad":
            return "failed", "as planned"
        return "done", ""

    def position(self, event: str, volume: str, nth: int = 0) -> int:
        return [i for i, e in enumerate(self.events) if e == (event, volume)][nth]


def test_independent_actions_run_together_up_to_jobs(tmp_path: Path) -> None:
    together = threading.Barrier(3, timeout=GUARD)
    ex = Recorder(tmp_path, 3, {(v, ActionKind.CREATE): together for v in "abc"})
    actions = [action(v) for v in "abcdefg"]
    result = ex.apply(actions)
    assert ex.most == 3  # the three gated ones were in flight at once, never more than 3
    assert [o.action.volume for o in result.outcomes] == list("abcdefg")  # plan order
    assert all(o.status == "done" for o in result.outcomes)


def test_actions_on_one_volume_keep_their_plan_order(tmp_path: Path) -> None:
    # A create of "a" held at a gate until "b" runs beside it, then a resize of "a": with
    # workers free, the resize still waits for the create to end.
    pair = threading.Barrier(2, timeout=GUARD)
    ex = Recorder(tmp_path, 4, {("a", ActionKind.CREATE): pair, ("b", ActionKind.CREATE): pair})
    result = ex.apply([action("a"), action("b"), action("a", ActionKind.RESIZE)])
    assert ex.position("start", "a", 1) > ex.position("end", "a", 0)
    assert [o.action.action for o in result.outcomes] == [
        ActionKind.CREATE,
        ActionKind.CREATE,
        ActionKind.RESIZE,
    ]


def test_a_replace_waits_for_work_on_the_volume_it_removes(tmp_path: Path) -> None:
    gate = threading.Barrier(2, timeout=GUARD)
    ex = Recorder(tmp_path, 4, {("old", ActionKind.RESIZE): gate, ("y", ActionKind.CREATE): gate})
    moving = action("new", ActionKind.REPLACE, replaces=("local", "old"))
    ex.apply([action("old", ActionKind.RESIZE), moving, action("y")])
    assert ex.position("start", "new") > ex.position("end", "old")
    # "y" touches neither volume: it was not held back behind the replace, and ran
    # beside the resize (their gate needs both).
    assert ex.position("start", "y") < ex.position("end", "old")


def test_a_later_action_does_not_overtake_a_waiting_one_on_its_volume(tmp_path: Path) -> None:
    # jobs=2: "a" and "b" fill both workers; the resize and update of "b" wait, in order.
    gate = threading.Barrier(2, timeout=GUARD)
    ex = Recorder(tmp_path, 2, {("a", ActionKind.CREATE): gate, ("b", ActionKind.CREATE): gate})
    ex.apply(
        [action("a"), action("b"), action("b", ActionKind.RESIZE), action("b", ActionKind.UPDATE)]
    )
    assert [e for e in ex.events if e[1] == "b"] == [("start", "b"), ("end", "b")] * 3


def test_one_failure_does_not_stop_the_others(tmp_path: Path) -> None:
    ex = Recorder(tmp_path, 4, {})
    result = ex.apply([action("a"), action("bad"), action("c")])
    assert [o.status for o in result.outcomes] == ["done", "failed", "done"]
    out = ex.text.getvalue()
    assert "FAILED create inst-bad/root (local/bad): as planned" in out
    assert out.count("\n") == 3


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_unexpected_error_stops_the_run(tmp_path: Path, jobs: int) -> None:
    class Broken(Recorder):
        def _one(self, a: Action) -> tuple[str, str]:
            if a.volume == "boom":
                raise RuntimeError("a bug")
            return super()._one(a)

    ex = Broken(tmp_path, jobs, {})
    with pytest.raises(RuntimeError, match="a bug"):
        ex.apply([action("boom"), *(action(f"v{i}") for i in range(20))])
    # Nothing started after the error was seen beyond what was already under way.
    assert len([e for e in ex.events if e[0] == "start"]) < 20
