"""`reconcile schema` is held to a standard JSON Schema validator (jsonschema, Draft
2020-12, the dialect pydantic writes): the schemas are valid and identified, every field
has a description, every valid manifest and config passes, every mistake of the corpus
(tests/corpus) that needs no config is refused by the schema too (those that need it are
listed), and the schema never refuses what `validate` accepts (hypothesis)."""

from __future__ import annotations

import json
import re
import string
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from reconciler.commands.cli import main
from reconciler.model.errors import ConfigError, InputError
from reconciler.model.units import parse_size
from reconciler.schema.common import check_name
from reconciler.schema.config import Config
from reconciler.schema.jsonschema import CONFIG_ID, MANIFEST_ID, config_schema, manifest_schema
from reconciler.schema.load import FailedManifest, LoadedManifest, load_config, load_manifest
from reconciler.schema.manifest import Manifest, TemplateSource
from reconciler.schema.patterns import BYTE_STRING_MULTIPLE, WS, size_json_schema
from reconciler.schema.yamlload import load_bytes
from tests.test_validation_shortcuts import disk_data

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


# ---------------------------------------------------------------- the schema and validate

MANIFEST = Draft202012Validator(manifest_schema())
CONFIG = Draft202012Validator(config_schema())
CORPUS = ROOT / "tests" / "corpus"

# Mistakes only the config shows (a pool or image it does not have, a pool that does not
# serve the backend, a raw image larger than its disk): out of reach of a manifest's
# schema, which knows no config.
NEEDS_CONFIG = {
    "071-pool-unknown.yaml": "unknown pool",
    "072-pool-unknown-case.yaml": "unknown pool",
    "073-pool-serves-other-backend.yaml": "does not serve backend",
    "074-pool-fast-no-qcow2.yaml": "does not serve backend",
    "075-pool-local-no-rbd.yaml": "does not serve backend",
    "076-pool-ceph-no-lvm.yaml": "does not serve backend",
    "077-pool-no-ploop.yaml": "does not serve backend",
    "078-image-unknown.yaml": "unknown image",
    "079-image-unknown-case.yaml": "unknown image",
    "080-raw-image-larger-than-disk.yaml": "larger than the disk",
    "081-raw-image-larger-by-a-sector.yaml": "larger than the disk",
}
# Checked with the config's references though they need none: a disk name used twice. JSON
# Schema can say "at most once" only name by name; the schema does for COMMON_DISK_NAMES,
# which these use.
DUPLICATE_NAMES = {"069-disk-name-duplicate.yaml", "070-disk-name-duplicate-third.yaml"}


def _data(path: Path) -> Any:
    """What the models are given: the document as the reconciler's YAML loader reads it;
    None when that loader refuses the file (anchors, tags, duplicate keys, syntax, ...),
    which no schema sees."""
    try:
        return load_bytes(path.read_bytes(), str(path), track=False).data
    except InputError:
        return None


def _errors(v: Draft202012Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in v.iter_errors(doc)]


@pytest.fixture(scope="module")
def corpus_config() -> Config:
    return load_config(str(CORPUS / "config.yaml"))


def test_the_printed_schemas_are_identified(capsys: pytest.CaptureFixture[str]) -> None:
    for kind, built, schema_id in (
        ("manifest", manifest_schema(), MANIFEST_ID),
        ("config", config_schema(), CONFIG_ID),
    ):
        printed: Any = schema(kind, capsys).schema
        assert printed == json.loads(json.dumps(built))
        assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert printed["$id"] == schema_id
        assert schema_id.startswith("https://reconciler.invalid/schema/")


def _properties(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    models = {doc["title"]: doc, **doc["$defs"]}
    return [(m, p, s) for m, d in models.items() for p, s in d.get("properties", {}).items()]


@pytest.mark.parametrize("kind", ["manifest", "config"])
def test_every_field_has_a_description(kind: str) -> None:
    doc = manifest_schema() if kind == "manifest" else config_schema()
    props = _properties(doc)
    assert len(props) > 20
    assert [f"{m}.{p}" for m, p, s in props if not s.get("description")] == []
    assert [f"{m}.{p}" for m, p, s in props if "title" in s] == []


@pytest.mark.parametrize("path", sorted((CORPUS / "manifests").iterdir()), ids=lambda p: p.name)
def test_a_corpus_mistake_is_refused_by_the_schema_too(path: Path, corpus_config: Config) -> None:
    data = _data(path)
    alone = load_manifest(str(path), None)
    if data is None:  # refused by the YAML loader, before any schema
        assert isinstance(alone, FailedManifest)
    elif path.name in NEEDS_CONFIG:
        assert isinstance(alone, LoadedManifest)
        with_config = load_manifest(str(path), corpus_config)
        assert isinstance(with_config, FailedManifest)
        assert any(NEEDS_CONFIG[path.name] in e.message for e in with_config.errors)
        assert _errors(MANIFEST, data) == []  # the schema cannot see it
    elif path.name in DUPLICATE_NAMES:
        assert isinstance(alone, LoadedManifest)
        assert _errors(MANIFEST, data) != []
    else:
        assert isinstance(alone, FailedManifest), "validate accepts it without a config"
        assert not MANIFEST.is_valid(data), [str(e) for e in alone.errors]


def test_the_corpus_counts() -> None:
    """How much of the corpus the schema refuses: all but what the YAML loader refuses
    and what needs the config."""
    files = sorted((CORPUS / "manifests").iterdir())
    data = {p.name: _data(p) for p in files}
    yaml_layer = sorted(n for n, d in data.items() if d is None)
    refused = sorted(n for n, d in data.items() if d is not None and not MANIFEST.is_valid(d))
    assert sorted(set(data) - set(yaml_layer) - set(refused)) == sorted(NEEDS_CONFIG)
    assert len(refused) >= 140, (len(refused), len(yaml_layer))


@pytest.mark.parametrize("path", sorted((CORPUS / "configs").iterdir()), ids=lambda p: p.name)
def test_a_corpus_config_mistake_is_refused_by_the_schema_too(path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(str(path))
    data = _data(path)
    if data is not None:
        assert not CONFIG.is_valid(data)


def test_valid_manifests_and_configs_pass(tmp_path: Path) -> None:
    manifests = sorted((CORPUS / "valid").iterdir()) + sorted(ROOT.glob("examples/**/*.yaml"))
    checked = 0
    for path in manifests:
        data = _data(path)
        if data.get("kind") == "InstanceStorage":
            assert isinstance(load_manifest(str(path), None), LoadedManifest), path
            assert _errors(MANIFEST, data) == [], path
            checked += 1
    assert checked >= 10
    assert _errors(CONFIG, _data(CORPUS / "config.yaml")) == []
    text = (ROOT / "examples" / "config.yaml.in").read_text()
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("@LIBVIRT_URI@", "qemu:///system").replace("@RUN_DIR@", "/x"))
    load_config(str(config))
    assert _errors(CONFIG, _data(config)) == []


# ------------------------------------------- never stricter than validate (hypothesis)


def _accepted(check: Callable[[], object]) -> bool:
    try:
        check()
    except (ValueError, ValidationError):  # ValidationError is a ValueError; said for mypy
        return False
    return True


def _defs_validator(name: str) -> Draft202012Validator:
    doc = manifest_schema()
    return Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": doc["$defs"]})


SIZE = Draft202012Validator(size_json_schema())
TEMPLATE = _defs_validator("TemplateSource")
WHITE = ["", " ", "  ", "\t", "\u3000", "\x85", "\x1c", "\n"]
UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "GB", "gib", "", "k"]


@st.composite
def size_values(draw: st.DrawFn) -> object:
    if draw(st.booleans()):
        return draw(
            st.one_of(
                st.integers(-1024, 1 << 20),
                st.integers(0, 1 << 47).map(lambda n: n * 512),
                st.integers((64 << 40) - 4096, (64 << 40) + 4096),
            )
        )
    number = draw(
        st.one_of(
            st.integers(0, 100),
            st.integers(0, 1 << 47),
            st.sampled_from([64, 65, 65536, 65537, 67108864, 68719476736, 70368744177664]),
            st.integers(0, 1 << 40).map(lambda n: n * 32),
        )
    )
    zeros = "0" * draw(st.integers(0, 2))
    ws = [draw(st.sampled_from(WHITE)) for _ in range(3)]
    return f"{ws[0]}{zeros}{number}{ws[1]}{draw(st.sampled_from(UNITS))}{ws[2]}"


@settings(max_examples=1500, deadline=None)
@given(size_values())
def test_the_size_schema_is_parse_size(value: object) -> None:
    """Exactly what parse_size accepts, but for the gap patterns.py documents (a string in
    B whose bytes are a multiple of 32 and not of 512) and Python's `$` before a final
    newline (a Python validator's leniency, never an editor's)."""
    ok = _accepted(lambda: parse_size(value))
    if ok:
        assert SIZE.is_valid(value), value
    elif SIZE.is_valid(value):
        assert isinstance(value, str)
        text = value.strip()
        digits = text[:-1].strip()
        gap = text.endswith("B") and digits.isdigit()
        assert (gap and int(digits) % BYTE_STRING_MULTIPLE == 0) or value.endswith("\n"), value


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(["blank", "swap", "ext4", "xfs", "vfat"]),
    st.one_of(
        st.none(),
        st.text(st.characters(codec="ascii"), max_size=18),
        st.text(string.ascii_uppercase + string.digits + " _-!#$%&'()@^`{}~.aé", max_size=13),
    ),
)
def test_the_label_schema_is_the_label_check(template: str, label: str | None) -> None:
    source = {"template": template, "label": label}
    ok = _accepted(lambda: TemplateSource.model_validate(source))
    if ok:
        assert TEMPLATE.is_valid(source), source
    else:
        assert not TEMPLATE.is_valid(source) or (label or "").endswith("\n"), source


NAMES = st.one_of(
    st.sampled_from(["disk", "disk.eph0", "data_1", "cdata", "x_rimage", "rimagex", "x_tmeta_y"]),
    st.text("ab_.-", min_size=1, max_size=8),
    st.integers(85, 95).map(lambda n: "a" * n),
)
TARGETS = st.fixed_dictionaries(
    {"dev": st.sampled_from(["vda", "vdb", "sdc", "hdd"])},
    optional={"bus": st.sampled_from([None, "virtio", "scsi", "sata", "ide", "usb"])},
)
IOTUNE = st.dictionaries(
    st.sampled_from([f"{d}{k}Sec" for d in ("total", "read", "write") for k in ("Bytes", "Iops")]),
    st.one_of(st.none(), st.sampled_from([1, 100, "1MiB/s", "0B/s"])),
)


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """Manifests from test_validation_shortcuts' disks (valid), each field sometimes
    drawn from values near what validate refuses."""

    def sometimes() -> bool:
        return draw(st.integers(0, 5)) == 0

    disks = draw(st.lists(disk_data(), max_size=4))
    for i, d in enumerate(disks):
        d["name"] = draw(NAMES) if sometimes() else f"{d['name']}{i}"
        if sometimes():
            d["size"] = draw(size_values())
        if sometimes():
            d["backend"] = draw(st.sampled_from(["flat", "qcow2", "lvm", "rbd", "ploop"]))
        if sometimes():
            d["source"] = {
                "template": draw(st.sampled_from(["blank", "swap", "ext4", "xfs", "vfat"])),
                "label": draw(st.sampled_from([None, "SWAP", "data", "CONFIG-2", "a" * 13])),
            }
        if sometimes():
            attach = d.setdefault("attach", {})
            attach["target"] = draw(TARGETS)
            attach["iotune"] = draw(IOTUNE)
    doc: dict[str, Any] = {"apiVersion": "reconciler/v1", "kind": "InstanceStorage"}
    doc["instance"] = str(uuid.UUID(int=draw(st.integers(0, 1 << 128 - 1))))
    if sometimes():
        doc["instance"] = doc["instance"].upper()
    if sometimes():
        doc["deleted"] = draw(st.booleans())
    if disks or sometimes():
        doc["disks"] = disks
    return doc


@settings(max_examples=1000, deadline=None)
@given(manifests())
def test_the_schema_never_refuses_what_validate_accepts(doc: dict[str, Any]) -> None:
    """What the manifest's model accepts, with names used once (validate's one check
    beside the config's references that needs no config), the schema accepts."""
    names = [d["name"] for d in doc.get("disks", [])]
    ok = len(set(names)) == len(names) and _accepted(lambda: Manifest.model_validate(doc))
    event(f"validate {'accepts' if ok else 'refuses'}")
    if ok:
        assert _errors(MANIFEST, doc) == []
    else:
        event(f"the schema {'accepts' if MANIFEST.is_valid(doc) else 'refuses'} it too")


def test_a_name_ending_in_a_newline_is_refused() -> None:
    """check_name once matched with `$`, which in Python passes a final newline: a disk
    named "disk\\n" was valid, and its volume name held a newline."""
    with pytest.raises(ValueError, match="may only contain"):
        check_name("disk\n")
    assert check_name("disk") == "disk"


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return own + [p for v in node.values() for p in _patterns(v)]
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    return []


def test_the_patterns_mean_the_same_to_an_editor() -> None:
    """No class escape whose meaning differs between Python's re and ECMA-262 (an
    editor's engine), and the white space of sizes is str.isspace's, every code point."""
    patterns = _patterns(manifest_schema())
    assert len(patterns) > 20
    for p in patterns:
        re.compile(p)
        assert not re.search(r"\\[sSdDwWbBAZ]|\(\?P", p), p
    spaces = [c for c in range(0x110000) if chr(c).isspace()]
    assert [c for c in range(0x110000) if re.fullmatch(WS, chr(c))] == spaces
