"""Exported states of older formats: what they lack is refused with a re-export hint, never
planned from a default; the review example is a real export that plans as its host does.

tests/states/review-example-v1.json is examples/review/observed-state.json as it was
before it was re-exported (format 1, without pool layouts, free space, holds): kept to
show that such a state cannot plan a move between pools as `migrate-unsupported` or, with
--allow-replace, as a destructive replace, where the host plans a safe migrate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.model import ActionKind
from reconciler.schema import exported as observed_state
from reconciler.schema.exported import FORMAT_VERSION, LACKS, StateError
from reconciler.testing import Review, plan_directory
from tests.conftest import Pools
from tests.env import ROOT, Env

EXAMPLES = ROOT / "examples"
OLD = ROOT / "tests" / "states" / "review-example-v1.json"
NEW = EXAMPLES / "review" / "observed-state.json"
CONFIG = EXAMPLES / "review" / "config.yaml"
WEB = "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01"
DB = "5d6c2b7e-0f4a-4b8e-a1d3-7e9f00c4a2b2"
HINT = "re-export it with `reconcile observe`"
# web-1's ephemeral disk, as examples/manifests/web-1.yaml places it, and moved.
EPH0_HERE = "    pool: demo\n    format: raw\n    size: 512MiB\n"
EPH0_MOVED = "    pool: demo-fast\n    format: raw\n    size: 512MiB\n"


def manifests(dest: Path, *, move: bool = False, drop: str | None = None) -> Path:
    """A copy of examples/manifests; `move`: web-1's disk.eph0 moved from demo to
    demo-fast; `drop`: that manifest left out."""
    shutil.copytree(EXAMPLES / "manifests", dest)
    if move:
        web = dest / "web-1.yaml"
        text = web.read_text()
        assert text.count(EPH0_HERE) == 1
        web.write_text(text.replace(EPH0_HERE, EPH0_MOVED))
    if drop:
        (dest / drop).unlink()
    return dest


def review(
    tmp_path: Path, state: Path, *, move: bool = True, allow_replace: bool = False, **kw: Any
) -> Review:
    name = f"m-{move}-{allow_replace}-{len(list(tmp_path.iterdir()))}"
    return plan_directory(
        manifests(tmp_path / name, move=move, drop=kw.pop("drop", None)),
        state,
        CONFIG,
        allow_replace=allow_replace,
        **kw,
    )


def eph0(r: Review) -> list[str]:
    """What the plan does with web-1's disk.eph0: its actions, then its error codes."""
    return [a.action.value for a in r.plan.actions if a.disk == "disk.eph0"] + [
        e.code.value for e in r.plan.errors if e.disk == "disk.eph0"
    ]


def write(tmp_path: Path, doc: dict[str, Any], name: str = "state.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_the_old_example_does_not_plan_a_move_from_what_it_lacks(tmp_path: Path) -> None:
    """The issue's case: the move is one error saying to re-export, with or without
    --allow-replace; nothing is planned for that disk, let alone destroyed."""
    assert json.loads(OLD.read_text())["format_version"] == 1
    for allow_replace in (False, True):
        r = review(tmp_path, OLD, allow_replace=allow_replace)
        assert eph0(r) == ["state-incomplete"]
        (err,) = [e for e in r.plan.errors if e.disk == "disk.eph0"]
        assert HINT in err.message and "layouts" in err.message and "of pool demo:" in err.message
        assert not any(a.destructive for a in r.plan.actions)
        assert "migrate-unsupported" not in r.json and '"replace"' not in r.json.split("summary")[0]
    # What does not depend on the missing facts still plans: the drift, unchanged.
    r = review(tmp_path, OLD, move=False)
    assert not r.has_errors
    assert [(a.action.value, a.disk) for a in r.plan.actions] == [("create", "disk.config")]


def test_the_old_example_plans_nothing_that_depends_on_holds_or_sharing(tmp_path: Path) -> None:
    """A new disk could be another host's (a held record) and an orphan could be handed
    over rather than deleted: an old state says neither, so neither is planned."""
    new = manifests(tmp_path / "m", move=False)
    web = (new / "web-1.yaml").read_text()
    (new / "web-2.yaml").write_text(web.replace(WEB, "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b02"))
    r = plan_directory(new, OLD, CONFIG)
    errs = [e for e in r.plan.errors if e.instance == "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b02"]
    assert len(errs) == 3 and all(e.code.value == "state-incomplete" for e in errs)
    assert all("another host holds" in e.message and HINT in e.message for e in errs)
    assert not any(a.instance.endswith("02") for a in r.plan.actions)
    # db-1's manifest gone, --prune: hand over or delete? The state cannot say.
    r = review(tmp_path, OLD, move=False, prune=True, force=True, drop="db-1.yaml")
    assert {e.code.value for e in r.plan.errors} == {"state-incomplete"}
    assert {e.instance for e in r.plan.errors} == {DB}
    assert "handed over or deleted" in r.plan.errors[0].message
    assert not any(a.action is ActionKind.DELETE for a in r.plan.actions)


def test_the_old_example_on_the_command_line_exits_1_with_the_hint(tmp_path: Path) -> None:
    m = manifests(tmp_path / "m", move=True)
    for extra in ((), ("--allow-replace",)):
        rc, out, err = Env.main(
            ["--config", str(CONFIG), "--dry-run", "--observed", str(OLD), *extra, str(m)]
        )
        assert rc == 1, out + err
        assert (
            HINT in out and "[state-incomplete]" in out and "replace" not in out.split("Plan:")[0]
        )


def test_the_example_is_a_real_current_export_and_plans_the_move(tmp_path: Path) -> None:
    doc = json.loads(NEW.read_text())
    assert doc["format_version"] == FORMAT_VERSION
    observed, _ = observed_state.load(str(NEW))
    assert all(not p.unknown and p.layouts for p in observed.pools.values())
    for allow_replace in (False, True):
        r = review(tmp_path, NEW, allow_replace=allow_replace)
        assert eph0(r) == ["migrate"], r.text
        assert not r.has_errors and not any(a.destructive for a in r.plan.actions)


@pytest.mark.parametrize(
    ("pool", "field", "refused"),
    [
        # The move copies out of demo (its layouts, what its volumes occupy) into
        # demo-fast (its layouts, free space, unit of thick copies).
        *(("demo", f, f in ("layouts", "allocated")) for f in LACKS[1]),
        *(("demo-fast", f, f in ("layouts", "available", "thick_unit")) for f in LACKS[1]),
    ],
)
def test_each_field_a_version_1_state_may_lack_is_unknown_not_a_default(
    tmp_path: Path, pool: str, field: str, refused: bool
) -> None:
    doc = json.loads(NEW.read_text())
    doc["format_version"] = 1
    del doc["pools"][pool][field]
    path = write(tmp_path, doc)
    observed, _ = observed_state.load(str(path))
    assert {n: dict(p.unknown) for n, p in observed.pools.items() if p.unknown} == {
        pool: {field: observed_state.OLDER}
    }
    r = review(tmp_path, path)
    if refused:
        assert eph0(r) == ["state-incomplete"]
        assert f"does not say {field} of pool {pool}:" in r.plan.errors[0].message
    else:
        assert eph0(r) == ["migrate"], r.text


def test_a_version_1_state_that_carries_everything_plans_as_the_current_one(
    tmp_path: Path,
) -> None:
    doc = json.loads(NEW.read_text())
    doc["format_version"] = 1
    path = write(tmp_path, doc)
    assert all(not p.unknown for p in observed_state.load(str(path))[0].pools.values())
    m = manifests(tmp_path / "m", move=True)
    assert plan_directory(m, path, CONFIG).json == plan_directory(m, NEW, CONFIG).json


def test_a_current_state_lacking_a_field_or_of_an_unknown_version_is_one_clear_error(
    tmp_path: Path,
) -> None:
    for field in ("layouts", "attached", "held"):
        doc = json.loads(NEW.read_text())
        del doc["pools"]["demo"][field]
        path = write(tmp_path, doc, f"{field}.json")
        with pytest.raises(StateError, match=rf"^{path}: pools\.demo\.{field}: Field required$"):
            observed_state.load(str(path))
    doc = json.loads(NEW.read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    path = write(tmp_path, doc, "future.json")
    rc, out, err = Env.main(["--config", str(CONFIG), "--dry-run", "--observed", str(path), "x"])
    assert rc == 1 and out == ""
    assert err == (
        f"reconcile: error: {path}: format_version: {FORMAT_VERSION + 1} is not a state "
        "format this reconciler knows (1, 2, 3); export it again with this version's "
        "'reconcile observe'\n"
    )


@pytest.mark.libvirtd
def test_the_review_example_plans_as_the_live_host(pools: Pools, tmp_path: Path) -> None:
    """The example made again on a live host the way scripts/review-example.sh made it
    (dir pools, the example manifests applied, db-1's config drive removed): its dry run,
    live, equals the dry run from its own export and from the committed example, for the
    manifests as they are and with a disk moved, with and without --allow-replace."""
    image = tmp_path / "images" / "tiny-linux.raw"
    image.parent.mkdir()
    image.write_bytes(bytes(1 << 20))
    demo, fast = pools.make(tmp_path / "demo"), pools.make(tmp_path / "demo-fast")
    env = Env(tmp_path / "env", pools.uri, {})
    env.extra_pools = {
        "demo": {"uri": pools.uri, "libvirtPool": demo.name, "backends": ["flat", "qcow2"]},
        "demo-fast": {"uri": pools.uri, "libvirtPool": fast.name, "backends": ["flat"]},
    }
    env.images = {
        "tiny-linux": {
            "location": image.as_uri(),
            "format": "raw",
            "sha256": "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58",
            "size": 1 << 20,
        }
    }
    env.write_config()
    env.manifests.rmdir()
    manifests(env.manifests)
    rc, out, err = env.run()
    assert rc == 0, out + err
    conn = libvirt.open(pools.uri)
    try:
        conn.storagePoolLookupByName(demo.name).storageVolLookupByName(f"{DB}_disk.config").delete(
            0
        )
    finally:
        conn.close()
    state = tmp_path / "state.json"
    rc, out, err = env.main(["observe", "--config", str(env.config_path), "--out", str(state)])
    assert rc == 0, out + err
    seen = []
    for move in (False, True):
        if move:
            web = env.manifests / "web-1.yaml"
            web.write_text(web.read_text().replace(EPH0_HERE, EPH0_MOVED))
        for flags in ((), ("--allow-replace",)):
            rc, live, err = env.run("--dry-run", "--output", "json", *flags)
            assert rc == 0, err
            for s in (state, NEW):
                rc2, offline, _ = env.run(
                    "--dry-run", "--output", "json", "--observed", str(s), *flags
                )
                assert (rc2, offline) == (rc, live), (s, move, flags)
            seen.append(sorted((a["action"], a["disk"]) for a in json.loads(live)["actions"]))
    assert seen[0] == seen[1] == [("create", "disk.config")]
    assert seen[2] == seen[3] == [("create", "disk.config"), ("migrate", "disk.eph0")]


def test_a_shared_pool_in_a_state_plans_no_new_disk_another_host_may_hold(
    tmp_path: Path,
) -> None:
    """An export reads no manifests, so it never says which disks of a pool many hosts
    share another host holds (the host reads that for the disks its manifests name): a new
    disk there is not planned as a create from a state, whatever its version."""
    doc = json.loads(NEW.read_text())
    doc["pools"]["demo"]["shared"] = True
    path = write(tmp_path, doc)
    m = manifests(tmp_path / "m")
    web = (m / "web-1.yaml").read_text()
    (m / "web-2.yaml").write_text(web.replace(WEB, "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b02"))
    r = plan_directory(m, path, CONFIG)
    new = [e for e in r.plan.errors if e.instance == "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b02"]
    assert len(new) == 3 and {e.code.value for e in new} == {"state-incomplete"}
    assert all("does not say held of pool demo:" in e.message for e in new)
    assert all("plan this on the host" in e.message for e in new)
    assert not any(a.instance.endswith("02") for a in r.plan.actions)
    # Disks with their records here plan as before (the drift), and so does a pool that
    # is not shared.
    assert [(a.action.value, a.disk) for a in r.plan.actions] == [("create", "disk.config")]
    assert len(r.plan.errors) == 3
