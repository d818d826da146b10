"""The manifest's snapshot fields: a disk's `snapshots` and a `source: {snapshot: ...}`.

Pure (no daemon). Each refusal names file, line and field, and the JSON Schema agrees with
the model on each case; neither field changes a disk's recorded spec (spec_dict)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from reconciler.schema.jsonschema import manifest_schema
from reconciler.schema.load import FailedManifest, LoadedManifest, load_manifest
from reconciler.schema.manifest import MAX_SNAPSHOTS, SnapshotSource

INST = str(uuid.UUID(int=0x25))
OTHER = str(uuid.UUID(int=0x26))
SCHEMA = Draft202012Validator(manifest_schema())


def manifest(**disk: Any) -> dict[str, Any]:
    d = {
        "name": "root",
        "backend": "qcow2",
        "pool": "local",
        "format": "qcow2",
        "size": "1GiB",
        "source": {"template": "blank"},
    } | disk
    return {
        "apiVersion": "reconciler/v1",
        "kind": "InstanceStorage",
        "instance": INST,
        "disks": [d],
    }


def load(tmp_path: Path, doc: dict[str, Any]) -> LoadedManifest | FailedManifest:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_manifest(str(path), None)


def test_snapshots_and_a_snapshot_source_load(tmp_path: Path) -> None:
    ref = f"{OTHER}/data@before-upgrade.1"
    got = load(tmp_path, manifest(snapshots=["daily", "weekly.2"], source={"snapshot": ref}))
    assert isinstance(got, LoadedManifest), got
    d = got.manifest.disks[0]
    assert d.snapshots == ["daily", "weekly.2"]
    assert isinstance(d.source, SnapshotSource)
    assert d.source.parts() == (OTHER, "data", "before-upgrade.1")
    # The list is not part of the recorded spec; the source is (what the disk was made from).
    assert "snapshots" not in d.spec_dict() and d.spec_dict()["source"] == {"snapshot": ref}
    assert SCHEMA.is_valid(manifest(snapshots=["daily"], source={"snapshot": ref}))


@pytest.mark.parametrize(
    ("disk", "field", "says"),
    [
        ({"snapshots": ["a", "b", "a"]}, "disks[0].snapshots", "listed twice"),
        (
            {"snapshots": [f"s{i}" for i in range(MAX_SNAPSHOTS + 1)]},
            "disks[0].snapshots",
            f"at most {MAX_SNAPSHOTS}",
        ),
        ({"snapshots": ["../etc"]}, "disks[0].snapshots[0]", "snapshot name"),
        ({"snapshots": ["a+b"]}, "disks[0].snapshots[0]", "snapshot name"),
        ({"snapshots": ["x" * 64]}, "disks[0].snapshots[0]", "snapshot name"),
        ({"snapshots": "daily"}, "disks[0].snapshots", "list"),
        ({"source": {"snapshot": f"{INST}/root"}}, "disks[0].source.snapshot", "INSTANCE/DISK@"),
        ({"source": {"snapshot": f"{INST}/../x@a"}}, "disks[0].source.snapshot", "INSTANCE/"),
        ({"source": {"snapshot": "vm/root@a"}}, "disks[0].source.snapshot", "INSTANCE/"),
        (
            {"source": {"snapshot": f"{INST}/root@a", "image": "cirros"}},
            "disks[0].source",
            "exactly one",
        ),
    ],
)
def test_a_bad_snapshot_field_says_file_line_and_field(
    tmp_path: Path, disk: dict[str, Any], field: str, says: str
) -> None:
    got = load(tmp_path, manifest(**disk))
    assert isinstance(got, FailedManifest)
    text = "\n".join(str(e) for e in got.errors)
    assert f"{tmp_path / 'm.yaml'}:" in text and f"{field}:" in text and says in text, text
    assert all(e.location.line is not None for e in got.errors), text
    assert not SCHEMA.is_valid(manifest(**disk)) or "twice" in says  # uniqueness: ours only


def test_an_lvm_snapshot_volume_name_is_checked_as_lvm_would(tmp_path: Path) -> None:
    # INSTANCE_DISK+snap-NAME is an LV's name: at most 127 characters, no reserved suffix.
    long_disk = "d" * 80
    got = load(
        tmp_path,
        manifest(name=long_disk, backend="lvm", pool="vg", format="raw", snapshots=["s" * 20]),
    )
    assert isinstance(got, FailedManifest)
    assert "snapshot " + "s" * 20 in str(got.errors[0]) and "127" in str(got.errors[0])
    got = load(tmp_path, manifest(backend="lvm", pool="vg", format="raw", snapshots=["x_rimage"]))
    assert isinstance(got, FailedManifest) and "_rimage" in str(got.errors[0])
    ok = load(tmp_path, manifest(backend="lvm", pool="vg", format="raw", snapshots=["s" * 20]))
    assert isinstance(ok, LoadedManifest)


def test_saved_plan_digests_see_snapshots_only_where_listed(tmp_path: Path) -> None:
    from reconciler.commands.saved_plan import _spec

    without = load(tmp_path, manifest())
    listed = load(tmp_path, manifest(snapshots=["a"]))
    assert isinstance(without, LoadedManifest) and isinstance(listed, LoadedManifest)
    plain = _spec(without.manifest.disks[0])
    assert "snapshots" not in plain  # as before the field existed: old digests hold
    assert _spec(listed.manifest.disks[0]) == plain | {"snapshots": ["a"]}
