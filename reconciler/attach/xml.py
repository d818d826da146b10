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
from collections.abc import Sequence
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
    """The element as indented XML text, without a declaration. `in_place`: indent `el`
    itself (its whitespace changes) rather than a copy, for an element made only to be
    printed."""
    copy = el if in_place else deepcopy(el)  # apart from `el`: a third of a re-parse's time
    ET.indent(copy, space="  ")
    return ET.tostring(copy, encoding="unicode")


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
