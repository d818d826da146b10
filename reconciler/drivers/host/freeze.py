"""Freezing a running guest's filesystems while its disks are snapshotted (fsFreeze).

A snapshot of a running guest is crash-consistent (as after a power cut) unless its
filesystems are frozen while it is taken. libvirt's `virDomainFSFreeze` asks the QEMU
guest agent inside the guest to flush and freeze them (`guest-fsfreeze-freeze`), and
`virDomainFSThaw` thaws them. Nothing here trusts the guest: an agent that does not
answer, or answers wrong, only makes the snapshot crash-consistent (recorded as `crash`),
never blocks it for longer than the agent's timeout.

- `agents_answering` is asked by the session only when a plan takes a snapshot of a disk a
  running domain uses (a guest-ping through the agent, bounded by PING_TIMEOUT_S), so the
  plan says beforehand whether the snapshot will be frozen or crash-consistent;
- `frozen` freezes the domains for the duration of a snapshot step and thaws them after,
  whatever happens; a freeze that fails at apply time is reported as `crash` (the record
  keeps what was, not what was planned).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import libvirt

from reconciler.drivers.host.libvirt import Connections
from reconciler.model.record import Consistency
from reconciler.util.logs import get_logger

log = get_logger(__name__)

PING_TIMEOUT_S = 2  # seconds an agent has to answer a ping


def _ping(conn: Any, domain: str) -> bool:
    import libvirt_qemu  # type: ignore[import-untyped]  # python3-libvirt's, loaded here only

    try:
        dom = conn.lookupByName(domain)
        if not dom.isActive():
            return False
        out = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', PING_TIMEOUT_S, 0)
        reply = json.loads(out) if isinstance(out, str) and len(out) < 4096 else None
        return isinstance(reply, dict) and "return" in reply
    except (libvirt.libvirtError, ValueError):
        return False


def agents_answering(conns: Connections, uri: str, domains: Iterable[str]) -> dict[str, bool]:
    """Each running domain's guest agent answered a ping (True) or not (False)."""
    out: dict[str, bool] = {}
    for dom in sorted(set(domains)):
        try:
            out[dom] = conns.call(
                uri, f"ping the guest agent of {dom}", functools.partial(_ping, domain=dom)
            )
        except libvirt.libvirtError:
            out[dom] = False
    return out


@contextlib.contextmanager
def frozen(
    conns: Connections, uri: str, domains: Sequence[str], planned: str
) -> Iterator[Consistency]:
    """Freeze `domains`' filesystems while the body runs, where the plan said `frozen`;
    yields the consistency the snapshot then has (frozen, idle as planned, or crash)."""
    if planned != Consistency.FROZEN.value or not domains:
        yield Consistency(planned) if planned else Consistency.CRASH
        return
    done: list[Any] = []
    ok = True
    conn = conns.get(uri)
    for name in domains:
        try:
            dom = conn.lookupByName(name)
            dom.fsFreeze(None, 0)
            done.append(dom)
        except libvirt.libvirtError as e:
            log.warning("snapshot.freeze_failed", domain=name, error=str(e))
            ok = False
            break
    try:
        yield Consistency.FROZEN if ok else Consistency.CRASH
    finally:
        for dom in done:
            try:
                dom.fsThaw(None, 0)
            except libvirt.libvirtError as e:  # the agent thaws itself after its timeout
                log.warning("snapshot.thaw_failed", domain=dom.name(), error=str(e))
