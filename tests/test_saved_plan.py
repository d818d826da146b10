"""A saved plan is a precondition, never a program (DESIGN invariant 8), through the real
CLI and daemon: apply plans again from its own command line and applies that fresh plan
only if the file equals it; an edited, foreign or malformed file changes nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from reconciler.commands.saved_plan import MAX_DEPTH, MAX_PLAN_BYTES, MAX_VALUES
from tests.env import ROOT, Env, cli, disk

pytestmark = pytest.mark.libvirtd

MiB = 1024 * 1024


def apply_argv(
    env: Env, plan: Path, *flags: str, config: Path | None = None, manifests: str | None = None
) -> list[str]:
    return [
        *(sys.executable, "-m", "reconciler", "apply", str(plan)),
        *("--config", str(config or env.config_path), *flags, manifests or str(env.manifests)),
    ]


def apply(
    env: Env, plan: Path, *flags: str, config: Path | None = None, manifests: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`reconcile apply PLAN --config CFG FLAGS MANIFESTS` in a process of its own, which
    must end within a minute (a plan file must never make it wait)."""
    argv = apply_argv(env, plan, *flags, config=config, manifests=manifests)
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reconcile apply {plan} did not end within 60 s")


def snapshot(env: Env) -> tuple[dict[str, tuple[int, int, int]], list[dict[str, Any]]]:
    """Every volume of the pool (inode, size, mtime) and every record, to show that
    nothing changed."""
    vols = {}
    for p in sorted(env.pool_dir().iterdir()):
        st = p.stat()
        vols[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    store = env.store()
    try:
        good, bad = store.load_all()
    finally:
        store.close()
    assert bad == []
    return vols, sorted((r.model_dump(mode="json") for r in good), key=lambda r: r["volume"])


def save(env: Env, plan: Path, *flags: str) -> dict[str, Any]:
    res = env.subprocess("--dry-run", "--plan-out", str(plan), *flags)
    assert res.returncode == 0, res.stdout + res.stderr
    doc: dict[str, Any] = json.loads(plan.read_text())
    return doc


def refused(res: subprocess.CompletedProcess[str], *words: str) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("reconcile: error: "), res.stderr
    for w in words:
        assert w in res.stderr, f"{w!r} not in: {res.stderr}"
    return res.stderr


def test_a_stale_precondition_refuses_the_whole_plan(env: Env) -> None:
    insts = {name: env.manifest(name, [disk("d", size="1MiB")]) for name in "abcd"}
    plan = env.root / "plan.json"
    save(env, plan)
    # Two of the four actions go stale: `a` is made by a live run of its manifest alone (a
    # record and a volume now exist), and a file appears where `b` would go.
    res = cli("--config", str(env.config_path), str(env.manifests / "a.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    stranger = env.volume(insts["b"], "d")
    stranger.write_bytes(b"not ours")
    before = snapshot(env)

    err = refused(apply(env, plan), "none of its 4 action(s) were applied", "make a new plan")
    vol_a, vol_b = env.volume(insts["a"], "d").name, stranger.name
    assert f"create {insts['a']}/d (local/{vol_a}): in the plan, but not in a fresh plan" in err
    assert f"create {insts['b']}/d (local/{vol_b}): in the plan, but not in a fresh plan " in err
    assert "2 difference(s)" in err and insts["c"] not in err and insts["d"] not in err
    assert snapshot(env) == before  # nothing else made
    assert not env.volume(insts["c"], "d").exists()

    # A new plan of what is left applies (the stranger is reported, never touched).
    stranger.unlink()
    save(env, plan)
    res = apply(env, plan)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(env.volume(i, "d").exists() for i in insts.values())
    assert env.plan_json()["actions"] == []


@pytest.fixture
def grown(env: Env) -> tuple[Env, dict[str, str], dict[str, Any]]:
    """Disks of `a` and `b` made; `a`'s manifest then grows its disk and `c` is new: a
    saved plan to resize a/d and create c/d."""
    insts = {n: env.manifest(n, [disk("d", size="1MiB")]) for n in "ab"}
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    env.manifest("a", [disk("d", size="2MiB")])
    insts["c"] = env.manifest("c", [disk("d", size="1MiB")])
    doc = save(env, env.root / "plan.json")
    assert [(a["action"], a["instance"]) for a in doc["actions"]] == [
        ("resize", insts["a"]),
        ("create", insts["c"]),
    ]
    return env, insts, doc


def _delete_of_b(env: Env, insts: dict[str, str], doc: dict[str, Any]) -> None:
    """An action as the planner would write it: a delete of another instance's disk, with
    the precondition its record and volume satisfy now."""
    store = env.store()
    try:
        rec = store.get("local", env.volume(insts["b"], "d").name)
    finally:
        store.close()
    assert rec is not None
    doc["actions"].append(
        {
            "action": "delete",
            "instance": insts["b"],
            "disk": "d",
            "pool": "local",
            "volume": rec.volume,
            "reason": "no manifest names its instance (--prune)",
            "patch": [{"op": "remove", "path": "/disks/d"}],
            "destructive": True,
            "precondition": {"record_generation": rec.generation, "volume_exists": True},
        }
    )


def _only(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    actions: list[dict[str, Any]] = doc["actions"]
    (a,) = [a for a in actions if a["action"] == kind]
    return a


def _size_of_c(env: Env, insts: dict[str, str], doc: dict[str, Any]) -> None:
    _only(doc, "create")["spec"]["size"] = 64 * MiB


def _without_resize(env: Env, insts: dict[str, str], doc: dict[str, Any]) -> None:
    doc["actions"].remove(_only(doc, "resize"))


def _generation_of_a(env: Env, insts: dict[str, str], doc: dict[str, Any]) -> None:
    _only(doc, "resize")["precondition"]["record_generation"] += 1


EDITS: dict[str, tuple[Callable[[Env, dict[str, str], dict[str, Any]], None], str]] = {
    "an added delete of another instance's disk": (
        _delete_of_b,
        "delete {b}/d (local/{b}_d): in the plan, but not in a fresh plan",
    ),
    "a changed spec": (
        _size_of_c,
        f"create {{c}}/d (local/{{c}}_d): spec.size: {64 * MiB} in the plan, {MiB} now",
    ),
    "a removed action": (
        _without_resize,
        "resize {a}/d (local/{a}_d): in a fresh plan, but not in the plan",
    ),
    "a changed precondition": (
        _generation_of_a,
        "resize {a}/d (local/{a}_d): "
        "precondition.record_generation: {edited} in the plan, {gen} now",
    ),
}


def test_an_edited_plan_is_refused_naming_each_difference(
    grown: tuple[Env, dict[str, str], dict[str, Any]],
) -> None:
    env, insts, doc = grown
    gen = doc["actions"][0]["precondition"]["record_generation"]
    names = {**insts, "gen": gen, "edited": gen + 1}
    before = snapshot(env)
    edited = env.root / "edited.json"
    for name, (edit, words) in EDITS.items():
        changed = json.loads(json.dumps(doc))
        edit(env, insts, changed)
        edited.write_text(json.dumps(changed, indent=2))
        err = refused(apply(env, edited), words.format(**names))
        assert "1 difference(s)" in err, name
        assert snapshot(env) == before, name

    # Three edits at once: each is named.
    changed = json.loads(json.dumps(doc))
    at_once = [EDITS[n] for n in ("an added delete of another instance's disk", "a changed spec")]
    at_once.append(EDITS["a removed action"])
    for edit, _ in at_once:
        edit(env, insts, changed)
    edited.write_text(json.dumps(changed))
    err = refused(apply(env, edited), "none of its 2 action(s) were applied", "3 difference(s)")
    for _, words in at_once:
        assert words.format(**names) in err
    assert snapshot(env) == before

    # A config path written into the plan is no field of it (the config comes from the
    # command line, see test_a_plan_from_other_inputs_is_refused).
    changed = json.loads(json.dumps(doc))
    changed["config"] = "/tmp/elsewhere/config.yaml"
    edited.write_text(json.dumps(changed))
    err = refused(apply(env, edited), f"saved plan {edited}: ", "config: Extra inputs")
    assert err.count("\n") == 1
    assert snapshot(env) == before

    # The unchanged plan applies, and only what it says is done.
    res = apply(env, env.root / "plan.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert env.volume(insts["a"], "d").stat().st_size == 2 * MiB
    assert env.volume(insts["c"], "d").exists()
    assert snapshot(env)[0][f"{insts['b']}_d"] == before[0][f"{insts['b']}_d"]
    assert env.plan_json()["actions"] == []


def test_a_plan_from_other_inputs_is_refused(
    grown: tuple[Env, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    env, insts, _ = grown
    plan = env.root / "plan.json"
    before = snapshot(env)
    # Other manifests that plan the same actions: one more, of an instance with no disks.
    other = tmp_path / "other-manifests"
    shutil.copytree(env.manifests, other)
    (other / "e.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": "00000000-0000-4000-8000-00000000000e",
                "deleted": True,
            }
        )
    )
    # Another config that plans the same actions: another share of disks to destroy.
    cfg = json.loads(env.config_path.read_text())
    cfg["safety"] = {"maxDeletePercent": 50}
    other_cfg = tmp_path / "other-config.yaml"
    other_cfg.write_text(json.dumps(cfg))

    err = refused(apply(env, plan, manifests=str(other)), "1 difference(s)")
    assert "the manifests differ from those the plan was made from" in err
    err = refused(apply(env, plan, config=other_cfg), "1 difference(s)")
    assert "the config differs from the one the plan was made from" in err
    err = refused(apply(env, plan, "--allow-replace"), "1 difference(s)")
    assert "--allow-replace: not given when the plan was made, given now" in err
    assert snapshot(env) == before

    # A plan made with --prune applies only with --prune.
    save(env, plan, "--prune")
    err = refused(apply(env, plan), "--prune: given when the plan was made, not given now")
    assert snapshot(env) == before
    # The same manifests, named another way, are the same manifests.
    res = apply(env, plan, "--prune", manifests=os.path.relpath(env.manifests, ROOT))
    assert res.returncode == 0, res.stdout + res.stderr
    assert env.volume(insts["c"], "d").exists()


def _valid(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _edited(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], bytes]:
    def make(doc: dict[str, Any]) -> bytes:
        d = json.loads(json.dumps(doc))
        change(d)
        return json.dumps(d).encode()

    return make


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return change


def _old_format(d: dict[str, Any]) -> None:
    """A plan as saved before: it named its config, which apply then read."""
    del d["saved_plan"]
    d.update(config="/dev/zero", config_sha256="0" * 64, paths=["/srv/manifests"])


# name -> (the file's bytes from a valid plan document, words of the one-line error)
CONTENTS: dict[str, tuple[Callable[[dict[str, Any]], bytes], str]] = {
    "bad UTF-8": (lambda d: _valid(d).replace(b'"local"', b'"lo\xffcal"', 1), "not UTF-8"),
    "deep lists": (lambda d: b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_DEPTH}"),
    "deep objects": (lambda d: b'{"a":' * 100_000, f"nested deeper than {MAX_DEPTH}"),
    "unclosed": (lambda d: b"[" * 100_000, f"nested deeper than {MAX_DEPTH}"),
    "many values": (lambda d: b"[" + b"0," * MAX_VALUES + b"0]", f"more than {MAX_VALUES}"),
    "not JSON": (lambda d: b"apply everything", ":1:1: not valid JSON: Expecting value"),
    "a list": (lambda d: b"[]", "is not a plan"),
    "a number of 5000 digits": (lambda d: b"1" * 5000, "not valid JSON: Exceeds the limit"),
    "NaN": (_edited(_set("actions.0.spec.size", float("nan"))), "NaN is not a JSON number"),
    "a duplicate key": (
        lambda d: b'{"format_version": 1, "format_version": 1}',
        'duplicate key "format_version"',
    ),
    "an old plan naming its config": (
        _edited(_old_format),
        "not a plan saved by this version",
    ),
    "actions not a list": (_edited(_set("actions", {})), "actions: Input should be a valid list"),
    "a string for a bool": (
        _edited(_set("actions.0.precondition.volume_exists", "no")),
        "actions[0].precondition.volume_exists: Input should be a valid boolean",
    ),
    "a string for a generation": (
        _edited(_set("actions.0.precondition.record_generation", "1")),
        "actions[0].precondition.record_generation",
    ),
    "an unknown action": (
        _edited(_set("actions.0.action", "format-disk")),
        "actions[0].action: Input should be",
    ),
    "a missing precondition": (
        _edited(_set("actions.0.precondition", KeyError)),
        "actions[0].precondition: Field required",
    ),
    "a missing digest": (
        _edited(_set("saved_plan.config_sha256", KeyError)),
        "saved_plan.config_sha256: Field required",
    ),
    "a control character in a name": (
        _edited(_set("actions.0.volume", "\x1b]0;owned\x07")),
        "actions[0].volume: String should match pattern",
    ),
}


def test_a_malformed_plan_is_refused_in_one_line(env: Env, tmp_path: Path) -> None:
    insts = {n: env.manifest(n, [disk("d", size="1MiB")]) for n in "ab"}
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    env.manifest("a", [disk("d", size="2MiB")])
    doc = save(env, tmp_path / "valid.json")
    assert doc["actions"][0]["instance"] == insts["a"]
    before = snapshot(env)

    cases: dict[str, tuple[Path, str]] = {}
    for name, (make, words) in CONTENTS.items():
        path = tmp_path / f"{len(cases)}.json"
        path.write_bytes(make(doc))
        cases[name] = (path, words)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    cases["a FIFO"] = (fifo, "is a FIFO, not a regular file")
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    cases["a symlink to /dev/zero"] = (zero, "is a symbolic link")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "valid.json")
    cases["a symlink to a valid plan"] = (link, "is a symbolic link")
    cases["/dev/zero"] = (Path("/dev/zero"), "is a character device")
    cases["a directory"] = (tmp_path, "is a directory")
    cases["a missing file"] = (tmp_path / "missing.json", "No such file or directory")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)  # sparse: refused by its size, never read
    cases["over the size limit"] = (
        big,
        f"{MAX_PLAN_BYTES + 1} bytes, more than the {MAX_PLAN_BYTES} allowed",
    )

    # All at once (each is a process of its own): the machine's cores are few, and the
    # interpreter's start is most of each one's time.
    running = {
        name: subprocess.Popen(apply_argv(env, path), stdout=PIPE, stderr=PIPE, text=True, cwd=ROOT)
        for name, (path, _) in cases.items()
    }
    for name, proc in running.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in running.values():
                p.kill()
            pytest.fail(f"{name}: reconcile apply did not end within 120 s")
        path, words = cases[name]
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        err = refused(res, words)
        # The file, and where in it if the JSON is not valid.
        assert re.match(rf"reconcile: error: saved plan {re.escape(str(path))}(:\d+:\d+)?: ", err)
        assert err.count("\n") == 1, f"{name}: {err}"
        assert out == "", name
    assert snapshot(env) == before

    # The valid plan it was all made from still applies.
    res = apply(env, tmp_path / "valid.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert env.volume(insts["a"], "d").stat().st_size == 2 * MiB
