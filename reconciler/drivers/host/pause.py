"""A short window in which running domains issue no disk writes: paused with libvirt's
`suspend` (qemu's `stop`, which drains and flushes every disk's in-flight requests before
it answers), then resumed. Snapshots of several disks taken inside it hold one moment, so
a multi-disk instance's snapshot is crash-consistent however its disks are stored.

Order and crash window: a marker (live domain metadata, element `<paused/>` in this
module's namespace) is set BEFORE the domain is suspended and removed AFTER it is
resumed. A kill inside the window leaves a paused domain carrying the marker;
`resume_left` (called before every window) resumes exactly those, so a domain an operator
paused, which carries no marker, is never resumed here, and one already paused when the
window opens is neither paused nor resumed by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from reconciler.drivers.host.libvirt import Connections
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)

NS_URI = "https://reconcile.invalid/snapshot-pause"
NS_KEY = "reconcile"
MARKER = "<paused/>"


def _marked(dom: Any) -> bool:
    import libvirt

    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return False
        raise
    return True


def _set_marker(dom: Any, on: bool) -> None:
    import libvirt

    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        MARKER if on else None,
        NS_KEY if on else None,
        NS_URI,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )


def resume_left(conns: Connections, uri: str) -> list[str]:
    """Resume the domains a killed window left paused (those carrying the marker)."""

    def fn(conn: Any) -> list[str]:
        import libvirt

        done = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if not _marked(dom):
                continue
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            _set_marker(dom, False)
            done.append(str(dom.name()))
        return done

    names: list[str] = conns.call(uri, "resuming domains a snapshot left paused", fn)
    for name in names:
        log.warning("domain.resumed", domain=name, why="a snapshot window was killed")
    return names


@contextmanager
def paused(conns: Connections, uri: str, domains: Iterable[str]) -> Iterator[list[str]]:
    """Pause each named running domain for the body; yields the names it paused."""
    wanted = sorted(set(domains))
    resume_left(conns, uri)
    mine: list[str] = []

    def pause(conn: Any) -> None:
        import libvirt

        for name in wanted:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # gone meanwhile: it writes nothing
                raise
            if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                continue  # paused by someone else, or shut off: no writes, not ours
            _set_marker(dom, True)
            mine.append(name)
            dom.suspend()

    def resume(conn: Any) -> None:
        import libvirt

        for name in mine:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            _set_marker(dom, False)

    try:
        if wanted:
            conns.call(uri, f"pausing {', '.join(wanted)} for a snapshot", pause)
            faults.point("snapshot.paused")
        yield list(mine)
    finally:
        if mine:
            conns.call(uri, f"resuming {', '.join(mine)} after a snapshot", resume)
