"""The monitors a domain's rbd disk connects to: the pool's `ceph.monitors`, else the v1
addresses of `mon_host` in the pool's ceph.conf.

qemu's librbd is given the monitors in the disk's `<host>` elements (libvirt passes them
as `mon_host`); an address without a protocol prefix is taken as v1 on any port other
than 3300, so a v2-only address is given with port 3300 and a v1 one with its own port.
Read from the conf the config names (the pool's config), never asked of the cluster: the
`<disk>` element is built without a connection, like a plan.
"""

from __future__ import annotations

import re

from reconciler.drivers.api import AttachError
from reconciler.model.errors import InputError
from reconciler.schema.readfile import read_regular

DEFAULT_V1_PORT = 6789
MAX_CONF_BYTES = 1 << 20

_ADDR = re.compile(
    r"^(?:(?P<proto>v[12]):)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?(?:/[0-9]+)?$"
)


def parse_mon_host(value: str) -> list[tuple[str, int]]:
    """(host, port) of each monitor in a `mon_host` value: address vectors
    `[v2:H:3300,v1:H:6789]` give their v1 address (else their v2 one), bare addresses
    their own; separators are commas, semicolons and spaces; IPv6 hosts come without
    brackets (libvirt adds them). ValueError on anything else."""
    out: list[tuple[str, int]] = []
    pos = 0
    tokens: list[list[str]] = []
    text = value.strip()
    while pos < len(text):
        c = text[pos]
        if c in " ,;\t":
            pos += 1
            continue
        if c == "[" and not re.match(r"\[[0-9A-Fa-f:.]+\](:|$|[ ,;])", text[pos:]):
            end, depth = pos, 0  # the vector's own ']' (an IPv6 host has its brackets too)
            for end in range(pos, len(text)):
                depth += {"[": 1, "]": -1}.get(text[end], 0)
                if depth == 0:
                    break
            if depth:
                raise ValueError(f"unclosed '[' in {value!r}")
            tokens.append([a for a in re.split(r"[ ,;]+", text[pos + 1 : end]) if a])
            pos = end + 1
            continue
        m = re.match(r"[^ ,;]+", text[pos:])
        assert m is not None
        tokens.append([m.group(0)])
        pos += m.end()
    for vec in tokens:
        parsed = []
        for a in vec:
            m = _ADDR.match(a)
            if m is None:
                raise ValueError(f"monitor address {a!r} in {value!r} is not [v1:|v2:]HOST[:PORT]")
            proto = m.group("proto")
            port = int(m.group("port")) if m.group("port") else None
            if proto is None:
                proto = "v2" if port == 3300 else "v1"
            parsed.append(
                (proto, m.group("host"), port or (3300 if proto == "v2" else DEFAULT_V1_PORT))
            )
        if not parsed:
            continue
        v1 = [p for p in parsed if p[0] == "v1"]
        chosen = v1[0] if v1 else parsed[0]
        out.append((chosen[1].strip("[]"), chosen[2]))  # libvirt brackets IPv6 itself
    if not out:
        raise ValueError(f"no monitor address in {value!r}")
    return out


def split_monitor(addr: str) -> tuple[str, int]:
    """HOST:PORT of the config's `monitors` (checked by its pattern) as (host, port)."""
    host, _, port = addr.rpartition(":")
    return (host.strip("[]"), int(port))


def monitors_of_conf(path: str) -> list[tuple[str, int]]:
    """The monitors `mon_host` (or `mon host`) of the conf's [global] section names;
    AttachError naming the file when it cannot be read or says none."""
    try:
        text = read_regular(path, limit=MAX_CONF_BYTES, follow=True).data.decode("utf-8", "replace")
    except InputError as e:
        raise AttachError(f"cannot read the monitors from {path}: {e.message}") from None
    section = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("[") and line.endswith("]") and "=" not in line:
            section = line[1:-1].strip().lower()
            continue
        key, sep, val = line.partition("=")
        if not sep or section != "global":
            continue
        if re.sub(r"[ _]+", "_", key.strip().lower()) == "mon_host":
            try:
                return parse_mon_host(val)
            except ValueError as e:
                raise AttachError(f"{path}:{number}: mon_host: {e}") from None
    raise AttachError(
        f"{path} names no mon_host in [global]: set `monitors` in the pool's ceph section"
    )
