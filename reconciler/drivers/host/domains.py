"""Which volumes are attached to domains defined on a libvirt connection."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import libvirt


@dataclass(frozen=True)
class Attachments:
    """Volume name -> domains using it; `known` is False where domains cannot be listed."""

    known: bool
    defined: dict[str, tuple[str, ...]] = field(default_factory=dict)
    running: dict[str, tuple[str, ...]] = field(default_factory=dict)
    why_unknown: str = ""


NO_DOMAIN_DRIVER = Attachments(
    False,
    why_unknown=(
        "the pool's libvirt connection has no domain driver (a storage-only URI), so "
        "attached disks cannot be found; use a qemu:/// URI for this pool"
    ),
)


def all_domains(conn: Any) -> list[Any] | None:
    """Every domain defined on the connection, running or not; None where the connection
    has no domain driver (a storage-only URI), so which disks are used cannot be known."""
    try:
        domains: list[Any] = conn.listAllDomains(0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return None
        raise
    return domains


def domain_xmls(dom: Any) -> tuple[str, bool, list[str]] | None:
    """A listed domain's name, whether it runs, and its XML (the inactive definition, and
    the live one where it runs); None where it was undefined after the list was taken (a
    transient guest that stopped, another client's domain), which uses no disk now. Other
    clients define and undefine domains while a pool is observed (measured: tests running
    side by side on one libvirtd failed observing with "Domain not found")."""
    try:
        active = bool(dom.isActive())
        xmls = [dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
        if active:
            xmls.append(dom.XMLDesc(0))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    return dom.name(), active, xmls


def attachments(conn: Any, pool_name: str, pool_path: str) -> Attachments:
    """Match every disk of every defined domain (running or not) against this file pool.

    A disk matches by `<source pool= volume=>` or by a file path inside the pool directory
    (compared after resolving the directory, never by following the disk file itself).
    """
    domains = all_domains(conn)
    if domains is None:
        return NO_DOMAIN_DRIVER
    root = os.path.realpath(pool_path)
    defined: dict[str, list[str]] = defaultdict(list)
    running: dict[str, list[str]] = defaultdict(list)
    for dom in domains:
        seen = domain_xmls(dom)
        if seen is None:
            continue
        name, active, xmls = seen
        for vol in _volumes(xmls[0], pool_name, root):
            defined[vol].append(name)
            if active:
                running[vol].append(name)
        for xml in xmls[1:]:
            for vol in _volumes(xml, pool_name, root):
                if name not in running[vol]:
                    running[vol].append(name)
                if name not in defined[vol]:
                    defined[vol].append(name)
    return Attachments(
        True,
        {k: tuple(sorted(v)) for k, v in defined.items()},
        {k: tuple(sorted(v)) for k, v in running.items()},
    )


def _volumes(xml: str, pool_name: str, root: str) -> set[str]:
    out: set[str] = set()
    for disk in ET.fromstring(xml).iter("disk"):
        for src in disk.iter("source"):
            if src.get("pool") == pool_name and src.get("volume"):
                out.add(src.get("volume", ""))
            for attr in ("file", "dev"):
                path = src.get(attr)
                if path:
                    d, base = os.path.split(os.path.normpath(path))
                    if os.path.realpath(d) == root:
                        out.add(base)
    return out
