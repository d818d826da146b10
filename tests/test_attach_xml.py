"""The `<disk>` element's shape, built from values alone (reconciler/attach/xml.py), the
manifest's attach section and the pools' disk and ceph sections, and the monitors read
from a ceph.conf. The elements are also held to a real libvirt in tests/test_attach.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from copy import deepcopy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.attach.xml import Layer, assign_targets, dev_name, disk_element, to_text
from reconciler.drivers.api import AttachError, DiskSource
from reconciler.drivers.rbd.monitors import monitors_of_conf, parse_mon_host
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import CephConfig, DiskConfig
from reconciler.schema.manifest import AttachSpec, Bus, DiskSpec, IoTune, Manifest

FILE = DiskSource("file", "/pool/i_disk")
ENTRY = DiskSource("file", "/pool/_cache_image-x")


def element(top: Layer, backing: list[Layer] | None = None, **kw: object) -> ET.Element:
    args: dict[str, object] = {"dev": "vda", "bus": Bus.VIRTIO, **kw}
    config = args.pop("config", DiskConfig())
    return disk_element(top, backing or [], config, **args)  # type: ignore[arg-type]


def test_a_qcow2_overlay_names_its_entry_and_ends_its_chain() -> None:
    el = element(Layer(FILE, DiskFormat.QCOW2), [Layer(ENTRY, DiskFormat.RAW)])
    assert (el.get("type"), el.get("device")) == ("file", "disk")
    driver = el.find("driver")
    assert driver is not None and driver.attrib == {"name": "qemu", "type": "qcow2"}
    assert el.find("source").attrib == {"file": "/pool/i_disk"}  # type: ignore[union-attr]
    store = el.find("backingStore")
    assert store is not None and store.get("type") == "file"
    assert store.find("format").attrib == {"type": "raw"}  # type: ignore[union-attr]
    assert store.find("source").attrib == {"file": "/pool/_cache_image-x"}  # type: ignore[union-attr]
    end = store.find("backingStore")
    assert end is not None and len(end) == 0 and not end.attrib  # nothing left to probe
    assert el.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fmt", "name"),
    [(DiskFormat.RAW, "raw"), (DiskFormat.QCOW2, "qcow2"), (DiskFormat.PLOOP, "ploop")],
)
def test_every_disk_names_its_format_and_has_no_chain(fmt: DiskFormat, name: str) -> None:
    el = element(Layer(FILE, fmt))
    assert el.find("driver").get("type") == name  # type: ignore[union-attr]
    chain = el.findall("backingStore")
    assert len(chain) == 1 and len(chain[0]) == 0 and not chain[0].attrib


def test_block_and_network_sources() -> None:
    lv = element(Layer(DiskSource("block", "/dev/vg0/i_disk"), DiskFormat.RAW))
    assert lv.get("type") == "block"
    assert lv.find("source").attrib == {"dev": "/dev/vg0/i_disk"}  # type: ignore[union-attr]
    uuid = "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01"
    rbd = element(
        Layer(
            DiskSource(
                "network",
                "vms/i_disk",
                protocol="rbd",
                hosts=(("10.0.0.1", 6789), ("fd00::2", 6789)),
                auth=("nova", uuid),
            ),
            DiskFormat.RAW,
        )
    )
    assert rbd.get("type") == "network"
    src = rbd.find("source")
    assert src is not None and src.attrib == {"protocol": "rbd", "name": "vms/i_disk"}
    assert [h.attrib for h in src.findall("host")] == [
        {"name": "10.0.0.1", "port": "6789"},
        {"name": "fd00::2", "port": "6789"},
    ]
    auth = src.find("auth")
    assert auth is not None and auth.attrib == {"username": "nova"}
    assert auth.find("secret").attrib == {"type": "ceph", "uuid": uuid}  # type: ignore[union-attr]


def test_driver_options_iotune_and_serial() -> None:
    config = DiskConfig.model_validate(
        {"cache": "none", "io": "native", "discard": "unmap", "detectZeroes": "unmap"}
    )
    tune = IoTune.model_validate({"totalBytesSec": "100MiB/s", "readIopsSec": 500})
    el = element(Layer(FILE, DiskFormat.RAW), config=config, serial="root-1", iotune=tune)
    assert el.find("driver").attrib == {  # type: ignore[union-attr]
        "name": "qemu",
        "type": "raw",
        "cache": "none",
        "io": "native",
        "discard": "unmap",
        "detect_zeroes": "unmap",
    }
    limits = {c.tag: c.text for c in el.find("iotune")}  # type: ignore[union-attr]
    assert limits == {"total_bytes_sec": str(100 << 20), "read_iops_sec": "500"}
    assert el.findtext("serial") == "root-1"


def test_values_are_escaped_not_spliced() -> None:
    weird = DiskSource("file", "/pool/a'b\"c&<d>")
    text = to_text(element(Layer(weird, DiskFormat.RAW)))
    again = ET.fromstring(text)
    assert again.find("source").get("file") == "/pool/a'b\"c&<d>"  # type: ignore[union-attr]
    assert len(again) == 4  # driver, source, backingStore, target: nothing injected


def test_targets_keep_given_names_and_fill_in_the_rest() -> None:
    assert [dev_name("vd", i) for i in (0, 25, 26, 27, 51, 52)] == [
        "vda", "vdz", "vdaa", "vdab", "vdaz", "vdba",
    ]  # fmt: skip
    got = assign_targets(
        [
            ("root", None, None),
            ("eph", "vda", Bus.VIRTIO),
            ("cfg", "sdb", Bus.SATA),
            ("s", None, None),
        ]
    )
    assert got == {
        "root": ("vdb", Bus.VIRTIO),
        "eph": ("vda", Bus.VIRTIO),
        "cfg": ("sdb", Bus.SATA),
        "s": ("vdc", Bus.VIRTIO),
    }


def _disk(**attach: object) -> dict[str, object]:
    return {
        "name": "d",
        "backend": "flat",
        "pool": "p",
        "format": "raw",
        "size": "1GiB",
        "source": {"template": "blank"},
        "attach": attach,
    }


@pytest.mark.parametrize(
    ("attach", "message"),
    [
        ({"target": {"dev": "vda", "bus": "scsi"}}, "target vda is on bus virtio, not scsi"),
        ({"target": {"dev": "xvda"}}, "String should match pattern"),
        ({"serial": "has space"}, "String should match pattern"),
        ({"serial": "x" * 21}, "String should match pattern"),
        ({"iotune": {"totalBytesSec": 1, "readBytesSec": 2}}, "cannot be set with readBytesSec"),
        ({"iotune": {"totalIopsSec": 0}}, "greater than 0"),
        ({"iotune": {"writeBytesSec": "1MB/s"}}, "is not bytes per second"),
        ({"cache": "none"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_attach_sections_are_refused(attach: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DiskSpec.model_validate(_disk(**attach))


def test_an_attach_section_is_not_part_of_the_recorded_spec() -> None:
    plain = DiskSpec.model_validate({k: v for k, v in _disk().items() if k != "attach"})
    attached = DiskSpec.model_validate(_disk(serial="a", target={"dev": "sdc"}))
    assert attached.spec_dict() == plain.spec_dict()
    assert attached.attach is not None and attached.attach.target is not None
    assert attached.attach.target.resolved_bus() is Bus.SCSI


def test_two_disks_with_one_target_are_refused() -> None:
    first, second = _disk(target={"dev": "vdb"}), _disk(target={"dev": "vdb"})
    second["name"] = "e"
    with pytest.raises(ValidationError, match="disks d and e both have target vdb"):
        Manifest.model_validate(
            {
                "apiVersion": "reconciler/v1",
                "kind": "InstanceStorage",
                "instance": "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01",
                "disks": [first, second],
            }
        )


def test_override_fields_replace_the_manifests() -> None:
    from reconciler.client import merged

    base = AttachSpec.model_validate({"serial": "a", "target": {"dev": "vdb"}})
    over = AttachSpec.model_validate({"serial": "b"})
    got = merged(base, over)
    assert got.serial == "b" and got.target == base.target
    assert merged(None, None) == AttachSpec()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"io": "native"}, "io native needs cache none or directsync"),
        ({"cache": "writeback", "io": "native"}, "io native needs cache none or directsync"),
        ({"detectZeroes": "unmap"}, "detectZeroes unmap needs discard unmap"),
        ({"cache": "nocache"}, "Input should be"),
    ],
)
def test_disk_sections_qemu_would_refuse_are_config_errors(
    config: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        DiskConfig.model_validate(config)


def test_ceph_section_names_the_secret_and_the_user_without_its_type() -> None:
    c = CephConfig.model_validate(
        {"conf": "/etc/ceph/ceph.conf", "pool": "vms", "client": "client.nova"}
    )
    assert c.client_id() == "nova" and c.secret_uuid is None and c.monitors == []
    with pytest.raises(ValidationError, match="String should match pattern"):
        CephConfig.model_validate({"conf": "c", "pool": "p", "secretUuid": "not-a-uuid"})


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("[v2:127.0.0.1:3300,v1:127.0.0.1:6789]", [("127.0.0.1", 6789)]),
        (
            "[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0] [v2:10.0.0.2:3300,v1:10.0.0.2:6790]",
            [("10.0.0.1", 6789), ("10.0.0.2", 6790)],
        ),
        (
            "10.0.0.1, 10.0.0.2:6790;mon3.example",
            [
                ("10.0.0.1", 6789),
                ("10.0.0.2", 6790),
                ("mon3.example", 6789),
            ],
        ),
        ("[v2:[fd00::1]:3300,v1:[fd00::1]:6789]", [("fd00::1", 6789)]),
        ("[fd00::1]:6789", [("fd00::1", 6789)]),
        ("v2:10.0.0.1", [("10.0.0.1", 3300)]),  # v2 only: given as v2's port
    ],
)
def test_mon_host_values(value: str, want: list[tuple[str, int]]) -> None:
    assert parse_mon_host(value) == want


@pytest.mark.parametrize("value", ["", "[v2:10.0.0.1:3300", "mon!1", "v3:10.0.0.1"])
def test_bad_mon_host_values(value: str) -> None:
    with pytest.raises(ValueError):
        parse_mon_host(value)


def test_monitors_come_from_the_global_section_of_the_conf(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        "# a comment\n[client]\nmon_host = 10.9.9.9\n[global]\nfsid = x\n"
        "mon host = [v2:10.0.0.1:3300,v1:10.0.0.1:6789]  # inline\n"
    )
    assert monitors_of_conf(str(conf)) == [("10.0.0.1", 6789)]
    conf.write_text("[global]\nfsid = x\n")
    with pytest.raises(AttachError, match="names no mon_host in \\[global\\]"):
        monitors_of_conf(str(conf))
    conf.write_text("[global]\nmon_host = [v2:1\n")
    with pytest.raises(AttachError, match=f"{conf}:2: mon_host: unclosed"):
        monitors_of_conf(str(conf))
    with pytest.raises(AttachError, match="cannot read the monitors from"):
        monitors_of_conf(str(tmp_path / "missing.conf"))


_XML_TEXT = st.one_of(
    st.none(),
    st.just(""),
    st.sampled_from([" ", "\n  ", "\t", "\r\n"]),
    st.text(alphabet="ab &<>\"'\n\r\t\x85é", min_size=1, max_size=5),
)


@st.composite
def _trees(draw: st.DrawFn, depth: int = 0) -> ET.Element:
    el = ET.Element(draw(st.sampled_from(["disk", "source", "b-c"])))
    for key in draw(st.lists(st.sampled_from(["type", "file", "x"]), max_size=3, unique=True)):
        el.set(key, draw(_XML_TEXT) or "")
    el.text, el.tail = draw(_XML_TEXT), draw(_XML_TEXT)
    if depth < 3:
        for _ in range(draw(st.integers(0, 3))):
            el.append(draw(_trees(depth + 1)))
    return el


@settings(max_examples=400, deadline=None)
@given(_trees())
def test_to_text_writes_what_elementtree_writes(el: ET.Element) -> None:
    """to_text's own writer (issue 27: ElementTree's took a tenth of `reconcile disks`)
    gives ET.indent + ET.tostring's text to the byte, whatever the whitespace, escapes and
    tails, and leaves the element as it was."""
    before = ET.tostring(el, encoding="unicode")
    copy = deepcopy(el)
    ET.indent(copy, space="  ")
    assert to_text(el) == ET.tostring(copy, encoding="unicode")
    assert ET.tostring(el, encoding="unicode") == before
    assert to_text(el, in_place=True) == ET.tostring(copy, encoding="unicode")


def test_to_text_hands_namespaces_and_comments_to_elementtree() -> None:
    el = ET.Element("{urn:x}disk", type="file")
    el.append(ET.Comment("a comment"))
    ET.SubElement(el, "target", dev="vda")
    copy = deepcopy(el)
    ET.indent(copy, space="  ")
    assert to_text(el) == ET.tostring(copy, encoding="unicode")
