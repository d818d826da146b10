"""A disk's libvirt `<disk>` element, from its record and its pool's config.

Invariants (DESIGN: never guess a format): the element always names the format
(`<driver type=>`) the record says, and always closes the backing chain: a qcow2 overlay
lists its cache entry (format from the entry's record) in `<backingStore>`, and every
chain ends in an empty `<backingStore/>`, so libvirt never probes a format or follows a
backing file a guest may have written into a header. An encrypted disk's `<source>` holds
`<encryption format='luks'>` naming its libvirt secret (type passphrase) from its record:
libvirt gives qemu the key, a raw disk opens as qemu's `luks` over the volume, a qcow2
with its own LUKS; an overlay's plain backing store has none. Values are set as
attributes and text by ElementTree, which escapes them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass

from reconciler.drivers.api import DiskSource
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import DiskConfig
from reconciler.schema.manifest import DEFAULT_BUS, Bus, IoTune

# libvirt's names of the formats (its virStorageFileFormat); qemu opens ploop as parallels.
LIBVIRT_FORMAT = {DiskFormat.RAW: "raw", DiskFormat.QCOW2: "qcow2", DiskFormat.PLOOP: "ploop"}


@dataclass(frozen=True)
class Layer:
    """One image of a disk's chain: where it is and its recorded format."""

    source: DiskSource
    format: DiskFormat
    secret: str | None = None  # encrypted (LUKS): the libvirt secret holding its key


def _source(parent: ET.Element, src: DiskSource, secret: str | None = None) -> None:
    el = ET.SubElement(parent, "source")
    if src.type == "file":
        el.set("file", src.path)
    elif src.type == "block":
        el.set("dev", src.path)
    else:
        el.set("protocol", src.protocol or "")
        el.set("name", src.path)
        for host, port in src.hosts:
            ET.SubElement(el, "host", name=host, port=str(port))
        if src.auth is not None:
            user, ceph_secret = src.auth
            auth = ET.SubElement(el, "auth", username=user)
            ET.SubElement(auth, "secret", type="ceph", uuid=ceph_secret)
    if secret is not None:
        enc = ET.SubElement(el, "encryption", format="luks")
        ET.SubElement(enc, "secret", type="passphrase", uuid=secret)


def disk_element(
    top: Layer,
    backing: Sequence[Layer],
    config: DiskConfig,
    *,
    dev: str,
    bus: Bus,
    serial: str | None = None,
    iotune: IoTune | None = None,
) -> ET.Element:
    """The `<disk device='disk'>` of a disk whose image is `top`, backed by `backing`
    (nearest first)."""
    disk = ET.Element("disk", type=top.source.type, device="disk")
    driver = ET.SubElement(disk, "driver", name="qemu", type=LIBVIRT_FORMAT[top.format])
    for attr, value in (
        ("cache", config.cache.value if config.cache else None),
        ("io", config.io),
        ("discard", config.discard),
        ("detect_zeroes", config.detect_zeroes),
    ):
        if value is not None:
            driver.set(attr, value)
    _source(disk, top.source, top.secret)
    parent = disk
    for layer in backing:
        store = ET.SubElement(parent, "backingStore", type=layer.source.type)
        ET.SubElement(store, "format", type=LIBVIRT_FORMAT[layer.format])
        _source(store, layer.source, layer.secret)
        parent = store
    ET.SubElement(parent, "backingStore")  # the chain ends here: nothing to probe
    ET.SubElement(disk, "target", dev=dev, bus=bus.value)
    if iotune is not None and iotune.limits():
        tune = ET.SubElement(disk, "iotune")
        for name, limit in iotune.limits():
            ET.SubElement(tune, name).text = str(limit)
    if serial is not None:
        ET.SubElement(disk, "serial").text = serial
    return disk


def to_text(el: ET.Element, *, in_place: bool = False) -> str:
    """The element as indented XML text, without a declaration: exactly what
    ET.indent(space="  ") and ET.tostring(encoding="unicode") make of it. `in_place`:
    indent `el` itself (its whitespace changes) where ElementTree has to write it, rather
    than a copy, for an element made only to be printed; the elements built here are
    written without indenting them (`el` is left as it is)."""
    out: list[str] = []
    if _plain(el):
        _write(out, el, 0)
        if el.tail:
            out.append(_escape_cdata(el.tail))
        return "".join(out)
    copy = el if in_place else deepcopy(el)  # apart from `el`: a third of a re-parse's time
    ET.indent(copy, space="  ")
    return ET.tostring(copy, encoding="unicode")


# ElementTree's own escaping, so the text is the same to the byte.
_escape_cdata: Callable[[str], str] = ET._escape_cdata  # type: ignore[attr-defined]
_escape_attrib: Callable[[str], str] = ET._escape_attrib  # type: ignore[attr-defined]
_INDENT = "  "


def _plain(el: ET.Element) -> bool:
    """Whether the tree has only what _write writes as ElementTree would: string tags and
    attributes outside any namespace, string text and tails (no comment, processing
    instruction or QName, which ElementTree writes its own way)."""
    for e in el.iter():
        tag = e.tag
        if type(tag) is not str or tag[:1] == "{":
            return False
        if not (e.text is None or type(e.text) is str):
            return False
        if not (e.tail is None or type(e.tail) is str):
            return False
        for k, v in e.attrib.items():
            if type(k) is not str or k[:1] == "{" or type(v) is not str:
                return False
    return True


def _write(out: list[str], el: ET.Element, level: int) -> None:
    """`el` as ET.indent(space="  ") at `level` and then ElementTree's serializer write it
    (short empty elements), its tail excepted."""
    out.append("<" + el.tag)
    for k, v in el.attrib.items():
        out.append(f' {k}="{_escape_attrib(v)}"')
    children = list(el)
    text = el.text
    if not children:
        if text:
            out.append(">" + _escape_cdata(text) + "</" + el.tag + ">")
        else:
            out.append(" />")
        return
    inner = "\n" + _INDENT * (level + 1)
    out.append(">" + (_escape_cdata(text) if text and text.strip() else inner))
    last = len(children) - 1
    for i, child in enumerate(children):
        _write(out, child, level + 1)
        tail = child.tail
        if tail and tail.strip():
            out.append(_escape_cdata(tail))
        else:
            out.append(inner if i < last else "\n" + _INDENT * level)
    out.append("</" + el.tag + ">")


def dev_name(prefix: str, index: int) -> str:
    """The `index`th device name of `prefix` as Linux and libvirt count them: vda ... vdz,
    vdaa, vdab, ..."""
    letters = ""
    n = index + 1
    while n > 0:
        n -= 1
        letters = chr(ord("a") + n % 26) + letters
        n //= 26
    return prefix + letters


def assign_targets(
    wanted: Sequence[tuple[str, str | None, Bus | None]],
) -> dict[str, tuple[str, Bus]]:
    """Each disk's (dev, bus), from (disk, dev or None, bus or None) in the manifest's
    order: a given dev is kept, the others take the next vdX no disk has, on virtio."""
    taken = {dev for _, dev, _ in wanted if dev is not None}
    out: dict[str, tuple[str, Bus]] = {}
    index = 0
    for name, dev, bus in wanted:
        if dev is None:
            while dev_name("vd", index) in taken:
                index += 1
            dev = dev_name("vd", index)
            taken.add(dev)
            bus = Bus.VIRTIO
        out[name] = (dev, bus or DEFAULT_BUS[dev[:2]])
    return out
