"""The JSON Schema (Draft 2020-12) `reconcile schema` prints, for editors and manifest
writers: pydantic's schema of the models, with every rule of theirs JSON Schema can say
added to it.

The models stay the source of truth: each rule here is written from the same tables the
validators use (BACKEND_FORMATS, LABEL_LIMITS, LVM_RESERVED, DEV_BUSES, ...), and
tests/test_json_schema.py holds the schema to `validate`: every mistake of the corpus
that needs no config is refused by the schema too, and nothing `validate` accepts is
refused. What JSON Schema cannot say is left to `validate`, and the schema says so where
it applies:

- that disk names (and attach targets) are unique within a manifest: `uniqueItems`
  compares whole items, and no keyword of JSON Schema compares one property of items.
  What it can say is "at most one item has this name" (`contains` with `maxContains`),
  one name at a time: the schema says it for COMMON_DISK_NAMES, Nova's and the
  examples' names;
- the config's references (a disk's pool and image, and whether the pool serves the
  backend; a raw image no larger than its disk): the schema of a manifest knows no config;
- that a size written in bytes as a string ("1000 B") is a multiple of 512: the schema
  checks a multiple of 32 (reconciler/schema/patterns.py says why);
- what the YAML loader refuses (anchors, tags, merge keys, duplicate keys, YAML 1.1's
  octal and sexagesimal numbers): a schema sees the document after YAML has read it.

Rules are added by post-processing the generated schema (keyed by the models' names in
`$defs`), not by changing the models' fields.
"""

from __future__ import annotations

import re
from typing import Any

DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Identifiers, not locations: `.invalid` (RFC 2606) never resolves. An editor is given the
# schema by file (the yaml-language-server modeline, see docs/compute-service.md); `v1`
# follows apiVersion.
MANIFEST_ID = "https://reconciler.invalid/schema/manifest/v1.json"
CONFIG_ID = "https://reconciler.invalid/schema/config/v1.json"

_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

Schema = dict[str, Any]

# Disk names a manifest is held to use at most once by the schema itself (any name is,
# by `validate`): Nova's (reconcile import-nova) and the examples'.
COMMON_DISK_NAMES = (
    "disk", "disk.local", "disk.swap", "disk.config", "disk.eph0", "disk.eph1",
    "disk.eph2", "disk.eph3", "root", "data", "swap", "config", "scratch", "ephemeral",
)  # fmt: skip

# The description of each field the models leave without one, by model (`$defs` name,
# or the root model's title) and JSON property name.
MANIFEST_FIELDS: dict[str, dict[str, str]] = {
    "Manifest": {
        "apiVersion": "always reconciler/v1",
        "kind": "always InstanceStorage",
        "instance": "the instance's UUID, lower case with dashes (the volumes are named "
        "INSTANCE_DISK)",
        "deleted": "true: the instance is gone and its disks are deleted (those whose "
        "deletionPolicy is Delete); it then needs no disks",
        "disks": "the instance's disks, at least one unless deleted is true; each name "
        "used once (`reconcile validate` checks that: JSON Schema cannot)",
    },
    "DiskSpec": {
        "name": "the disk's name within the instance (its volume is INSTANCE_NAME); "
        "letters, digits, '.', '_', '-', no leading '.' or '-', no '..'; on lvm at most "
        "90 characters and none of LVM's reserved suffixes (_cdata, _rimage, ...)",
        "backend": "how the disk is stored: flat (raw or qcow2 file), qcow2 (qcow2 "
        "file), lvm (raw LV), rbd (raw Ceph image), ploop (ploop file)",
        "pool": "the config's pool to place the disk in; it must serve the backend",
        "format": "the disk's format; the backend decides which: flat raw or qcow2, "
        "qcow2 qcow2, lvm raw, rbd raw, ploop ploop",
        "source": "where the content comes from: {image: ID} from the config's catalog, "
        "or {template: KIND} (blank, swap, ext4, xfs, vfat; a filesystem may have a label)",
        "deletionPolicy": "Delete (the default): the disk is deleted with the instance "
        "or the manifest's entry; Retain: it is kept, and forgotten",
    },
    "ImageSource": {"image": "the image's id in the config's catalog"},
    "TemplateSource": {
        "template": "blank (zeros), swap, or an empty ext4, xfs or vfat filesystem",
        "label": "the filesystem's label: ext4 1 to 16, xfs 1 to 12 printable ASCII "
        "characters; vfat 1 to 11 of upper-case letters, digits, space and "
        "_-!#$%&'()@^`{}~; none for blank and swap",
    },
    "AttachSpec": {"iotune": "QoS limits of the guest's I/O (libvirt's <iotune>)"},
    "IoTune": {
        f"{d}{k}Sec": f"{what} limit{', not with ' + d2 if d2 else ''}"
        for k, unit in (("Bytes", "bytes per second"), ("Iops", "I/O operations per second"))
        for d, what, d2 in (
            ("total", f"{unit}, read and write together", f"read{k}Sec or write{k}Sec"),
            ("read", f"{unit} read", f"total{k}Sec"),
            ("write", f"{unit} written", f"total{k}Sec"),
        )
    },
}

CONFIG_FIELDS: dict[str, dict[str, str]] = {
    "Config": {
        "apiVersion": "always reconciler/v1",
        "kind": "always Config",
        "host": "this host's name among hosts sharing a pool (Ceph); default: the "
        "machine's hostname",
        "state": "where the records and locks live",
        "ownership": "how hosts sharing a pool hand instances to one another",
        "pools": "the storage pools disks may be placed in, by the name manifests use",
        "images": "the image catalog, by the id manifests use: everything about an "
        "image is declared here, nothing is probed",
        "safety": "the guard against plans that delete much",
        "libvirt": "how a lost libvirt connection is handled",
        "fetch": "how long fetching an image may take",
    },
    "PoolConfig": {
        "backends": "the backends this pool serves, each once: flat, qcow2 and ploop "
        "together in a directory pool; lvm alone; rbd alone",
    },
    "ImageConfig": {
        "location": "file://, http://, https:// URL, or rbd://FSID/POOL/IMAGE/SNAPSHOT",
        "format": "the image file's format: raw or qcow2",
        "sha256": "the image file's SHA-256, 64 lower-case hex digits",
        "cephClient": "for an rbd:// location: the cephx name to connect as",
    },
    "SafetyConfig": {
        "maxDeletePercent": "a plan deleting more than this percent of the managed disks "
        "needs --force (default 10)",
        "deleteGuardFloor": "`reconcile watch`: deletions of up to this many disks in a "
        "resync interval are never held by the guard (default 10)",
    },
}


def manifest_schema() -> Schema:
    """The manifest's JSON Schema."""
    from reconciler.schema.manifest import Manifest

    s = Manifest.model_json_schema(by_alias=True, mode="validation")
    _manifest_rules(s, s["$defs"])
    return _finish(s, MANIFEST_ID, MANIFEST_FIELDS)


def config_schema() -> Schema:
    """The config's JSON Schema."""
    from reconciler.schema.config import Config

    s = Config.model_json_schema(by_alias=True, mode="validation")
    _config_rules(s, s["$defs"])
    return _finish(s, CONFIG_ID, CONFIG_FIELDS)


def _when(prop: str, test: Schema, then: Schema, *, otherwise: Schema | None = None) -> Schema:
    """if PROP is present and passes TEST, then THEN (else OTHERWISE)."""
    rule: Schema = {"if": {"properties": {prop: test}, "required": [prop]}, "then": then}
    if otherwise is not None:
        rule["else"] = otherwise
    return rule


def _props(**props: Schema) -> Schema:
    return {"properties": props}


def _add(model: Schema, *rules: Schema) -> None:
    model.setdefault("allOf", []).extend(rules)


def _manifest_rules(root: Schema, defs: dict[str, Schema]) -> None:
    from reconciler.schema.common import BACKEND_FORMATS, LV_NAME_MAX, LVM_RESERVED, Backend
    from reconciler.schema.manifest import (
        _VFAT_LABEL_OK,
        DEV_BUSES,
        FILESYSTEMS,
        LABEL_LIMITS,
        TemplateKind,
    )

    root["properties"]["instance"]["pattern"] = _UUID
    # A live instance lists at least one disk.
    deleted: Schema = {"const": True}
    _add(root, _when("deleted", deleted, {}, otherwise={"required": ["disks"]}))
    _add(root, _when("deleted", deleted, {}, otherwise=_props(disks={"minItems": 1})))

    once = [
        {"contains": _props(name={"const": n}), "minContains": 0, "maxContains": 1}
        for n in COMMON_DISK_NAMES
    ]
    root["properties"]["disks"]["allOf"] = once

    disk = defs["DiskSpec"]
    for backend, formats in BACKEND_FORMATS.items():
        allowed = {"enum": sorted(f.value for f in formats)}
        _add(disk, _when("backend", {"const": backend.value}, _props(format=allowed)))
    # An LV is named INSTANCE_NAME: a UUID (36 characters, no '_') and '_' before the
    # disk's name, so a reserved suffix (each starts with '_') can only begin at that '_'
    # or within the name.
    reserved = "|".join(re.escape(r.removeprefix("_")) for r in LVM_RESERVED)
    lv_name = {"maxLength": LV_NAME_MAX - 37, "not": {"pattern": f"(?:^|_)(?:{reserved})"}}
    _add(disk, _when("backend", {"const": Backend.LVM.value}, _props(name=lv_name)))
    # qemu's parallels format has no encryption (manifest.DiskSpec refuses it too).
    _add(
        disk, _when("backend", {"const": Backend.PLOOP.value}, _props(encryption={"type": "null"}))
    )

    template = defs["TemplateSource"]
    for kind in TemplateKind:
        if kind not in FILESYSTEMS:
            label: Schema = {"type": "null"}
        else:
            limit = LABEL_LIMITS[kind]
            if kind is TemplateKind.VFAT:
                chars = "".join(sorted(_VFAT_LABEL_OK - {"-"})) + "-"
                chars = chars.replace("\\", "\\\\").replace("]", "\\]")
            else:
                chars = " -~"  # printable ASCII: one byte a character
            label = {"anyOf": [{"type": "string", "pattern": f"^[{chars}]{{1,{limit}}}$"},
                               {"type": "null"}]}  # fmt: skip
        _add(template, _when("template", {"const": kind.value}, _props(label=label)))

    target = defs["DiskTarget"]
    for prefix, buses in DEV_BUSES.items():
        fits = {"enum": [*sorted(b.value for b in buses), None]}
        _add(target, _when("dev", {"pattern": f"^{prefix}"}, _props(bus=fits)))

    iotune = defs["IoTune"]
    for per in ("Bytes", "Iops"):
        split = {f"{d}{per}Sec": {"type": "null"} for d in ("read", "write")}
        _add(iotune, _when(f"total{per}Sec", {"not": {"type": "null"}}, _props(**split)))


def _config_rules(root: Schema, defs: dict[str, Schema]) -> None:
    from reconciler.schema.common import Backend, Preallocation

    for mapping in ("pools", "images"):  # a key's pattern is its values' (common.Name)
        (name,) = root["properties"][mapping]["patternProperties"]
        root["properties"][mapping]["propertyNames"]["pattern"] = name

    pool = defs["PoolConfig"]
    pool["properties"]["backends"]["uniqueItems"] = True
    for backend, section in ((Backend.RBD, "ceph"), (Backend.LVM, "lvm")):
        # An rbd (lvm) pool holds nothing else, needs its section, and allocates as its
        # storage does; any other pool has no such section.
        only: Schema = {
            section: {"type": "object"},
            "backends": {"items": {"const": backend.value}},
            "preallocation": {"const": Preallocation.OFF.value},
        }
        _add(
            pool,
            _when(
                "backends",
                {"contains": {"const": backend.value}},
                {"required": [section], **_props(**only)},
                otherwise=_props(**{section: {"type": "null"}}),
            ),
        )

    disk = defs["DiskConfig"]
    direct = {"enum": ["none", "directsync"]}
    _add(disk, _when("io", {"const": "native"}, {"required": ["cache"], **_props(cache=direct)}))
    unmap = {"required": ["discard"], **_props(discard={"const": "unmap"})}
    _add(disk, _when("detectZeroes", {"const": "unmap"}, unmap))

    image = defs["ImageConfig"]
    image["properties"]["sha256"]["pattern"] = "^[0-9a-f]{64}$"
    image["properties"]["location"]["anyOf"] = [
        {"pattern": "^rbd://[0-9a-fA-F-]{36}/[^/@]+/[^/@]+/[^/@]+$"},
        {"pattern": "^(?:file|https?)://"},
    ]
    rbd = _props(location={"pattern": "^rbd://"})
    _add(image, _when("cephConf", {"not": {"type": "null"}}, rbd))


def _finish(s: Schema, schema_id: str, fields: dict[str, dict[str, str]]) -> Schema:
    """Identify the schema, and give every field a description."""
    models = {s["title"]: s, **s["$defs"]}
    for model, props in fields.items():
        for prop, text in props.items():
            models[model]["properties"][prop].setdefault("description", text)
    for model in models.values():
        for prop in model.get("properties", {}).values():
            prop.pop("title", None)  # pydantic's (Readbytessec), beside a description
    return {"$schema": DIALECT, "$id": schema_id, **s}
