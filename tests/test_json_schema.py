"""`reconcile schema` is held to a standard JSON Schema validator (jsonschema, Draft
2020-12, the dialect pydantic writes): the schemas are valid, every example manifest and
the demo's config pass, and what the reconciler refuses in an attach section the schema
refuses too where JSON Schema can say it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from reconciler.commands.cli import main

ROOT = Path(__file__).resolve().parent.parent


def schema(kind: str, capsys: pytest.CaptureFixture[str]) -> Draft202012Validator:
    assert main(["schema", "--kind", kind]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


def test_every_example_manifest_passes(capsys: pytest.CaptureFixture[str]) -> None:
    v = schema("manifest", capsys)
    docs = {f: yaml.safe_load(f.read_text()) for f in sorted(ROOT.glob("examples/**/*.yaml"))}
    manifests = {f: d for f, d in docs.items() if d.get("kind") == "InstanceStorage"}
    assert len(manifests) >= 6 and any(f.parent.name == "boot" for f in manifests)
    for f, doc in manifests.items():
        errors = [e.message for e in v.iter_errors(doc)]
        assert errors == [], f


def test_the_schema_refuses_bad_attach_sections(capsys: pytest.CaptureFixture[str]) -> None:
    v = schema("manifest", capsys)
    doc = yaml.safe_load((ROOT / "examples" / "boot" / "vm-1.yaml").read_text())
    assert v.is_valid(doc)
    for attach in (
        {"serial": "has space"},
        {"target": {"dev": "xvda"}},
        {"target": {"dev": "vda", "bus": "floppy"}},
        {"iotune": {"totalBytesSec": "1MB/s"}},
        {"iotune": {"readIopsSec": 0}},
        {"cache": "none"},
    ):
        doc["disks"][0]["attach"] = attach
        assert not v.is_valid(doc), attach
    doc["disks"][0]["attach"] = {"iotune": {"totalBytesSec": "100MiB/s", "readIopsSec": 5}}
    assert v.is_valid(doc)


def test_a_config_with_disk_and_ceph_sections_passes(capsys: pytest.CaptureFixture[str]) -> None:
    v = schema("config", capsys)
    text = (ROOT / "examples" / "config.yaml.in").read_text()
    cfg = yaml.safe_load(
        text.replace("@LIBVIRT_URI@", "qemu:///system").replace("@RUN_DIR@", "/run/x")
    )
    cfg["pools"]["demo"]["disk"] = {"cache": "none", "io": "native", "discard": "unmap"}
    cfg["pools"]["ceph"] = {
        "uri": "qemu:///system",
        "libvirtPool": "vms",
        "backends": ["rbd"],
        "ceph": {
            "conf": "/etc/ceph/ceph.conf",
            "pool": "vms",
            "secretUuid": "dbf939fd-7cd6-405b-a506-90a6d88494be",
            "monitors": ["10.0.0.1:6789", "[fd00::1]:6789"],
        },
    }
    errors = [e.message for e in v.iter_errors(cfg)]
    assert errors == []
    for pool, section, key, bad in (
        ("ceph", "ceph", "secretUuid", "not-a-uuid"),
        ("demo", "disk", "cache", "nocache"),
    ):
        good = cfg["pools"][pool][section][key]
        cfg["pools"][pool][section][key] = bad
        assert not v.is_valid(cfg), (pool, key)
        cfg["pools"][pool][section][key] = good
    assert v.is_valid(cfg)
