"""The schema's shortcuts give what the long ways give: names and sizes remembered,
canonical UUIDs matched by pattern (however often and in whatever order they are asked),
and DiskSpec.spec_dict written out instead of asked of pydantic's serializer."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.model.units import parse_size
from reconciler.schema.common import BACKEND_FORMATS, check_name
from reconciler.schema.manifest import DiskSpec, Manifest
from reconciler.schema.speed.mcache import construct, dump

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


# -- DiskSpec.spec_dict, written out, is the disk's JSON dump --------------------------

FILESYSTEM_LABELS = {"ext4": "ephemeral0", "xfs": "dbdata", "vfat": "CONFIG-2"}


@st.composite
def disk_data(draw: st.DrawFn) -> dict[str, Any]:
    backend = draw(st.sampled_from(sorted(BACKEND_FORMATS)))
    data: dict[str, Any] = {
        "name": draw(st.sampled_from(["disk", "disk.eph0", "data_1"])),
        "backend": backend.value,
        "pool": draw(st.sampled_from(["local", "fast"])),
        "format": draw(st.sampled_from(sorted(BACKEND_FORMATS[backend]))).value,
        "size": draw(st.sampled_from([512, 1 << 30, "1GiB", "512 B", "64TiB"])),
    }
    pick = draw(st.integers(0, 4))
    if pick < 2:
        data["source"] = {"image": draw(st.sampled_from(["cirros", "ubuntu"]))}
    elif pick == 2:  # a restore: recorded as the disk's source
        data["source"] = {"snapshot": f"{uuid.UUID(int=3)}/{data['name']}@daily.1"}
    else:
        kind = draw(st.sampled_from(["blank", "swap", "ext4", "xfs", "vfat"]))
        data["source"] = {"template": kind}
        if kind in FILESYSTEM_LABELS and draw(st.booleans()):
            data["source"]["label"] = FILESYSTEM_LABELS[kind]
    if draw(st.booleans()):
        data["deletionPolicy"] = draw(st.sampled_from(["Delete", "Retain"]))
    if data["format"] != "ploop" and draw(st.integers(0, 3)) == 0:
        data["encryption"] = {"format": "luks"}
    if draw(st.integers(0, 3)) == 0:  # its snapshots: kept, never in spec_dict
        data["snapshots"] = draw(st.sampled_from([[], ["daily"], ["a", "b-2", "c.3"]]))
    if draw(st.integers(0, 3)) == 0:  # how a domain attaches it: kept, never in spec_dict
        data["attach"] = draw(
            st.sampled_from(
                [
                    {"serial": "root"},
                    {"target": {"dev": "sdb", "bus": "sata"}},
                    {"target": {"dev": "vdc"}, "iotune": {"totalBytesSec": "10MiB/s"}},
                    {"iotune": {"readIopsSec": 100, "writeBytesSec": 1 << 20}},
                ]
            )
        )
    return data


@settings(max_examples=300, deadline=None)
@given(disk_data())
def test_spec_dict_is_the_json_dump_without_nulls(data: dict[str, Any]) -> None:
    spec = DiskSpec.model_validate(data)
    want = spec.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"attach", "snapshots"}
    )
    for s in (spec, construct(_manifest_dump(spec)).disks[0]):
        got = s.spec_dict()
        assert list(got.items()) == list(want.items())
        assert list(got["source"].items()) == list(want["source"].items())
        assert all(type(got[k]) is type(want[k]) for k in want)


def _manifest_dump(spec: DiskSpec) -> dict[str, Any]:
    m = Manifest.model_validate(
        {"apiVersion": "reconciler/v1", "kind": "InstanceStorage",
         "instance": str(uuid.UUID(int=1)), "disks": [spec.model_dump(by_alias=True)]}
    )  # fmt: skip
    return m.model_dump(mode="json", by_alias=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(disk_data(), max_size=4), st.booleans())
def test_the_cache_dump_rebuilds_the_manifest(disks: list[dict[str, Any]], deleted: bool) -> None:
    for i, d in enumerate(disks):
        d["name"] = f"d{i}"
        if "target" in d.get("attach", {}):  # one disk a target
            d["attach"] = {**d["attach"], "target": {"dev": f"vd{chr(ord('a') + i)}"}}
    m = Manifest.model_validate(
        {"apiVersion": "reconciler/v1", "kind": "InstanceStorage",
         "instance": str(uuid.UUID(int=7)), "deleted": deleted or not disks, "disks": disks}
    )  # fmt: skip
    data = dump(m)
    assert data == m.model_dump(mode="json", by_alias=True, exclude_none=True)
    rebuilt = construct(data)
    assert rebuilt == m
    assert [d.spec_dict() for d in rebuilt.disks] == [d.spec_dict() for d in m.disks]
    assert [d.attach for d in rebuilt.disks] == [d.attach for d in m.disks]
    assert [d.snapshots for d in rebuilt.disks] == [d.snapshots for d in m.disks]
