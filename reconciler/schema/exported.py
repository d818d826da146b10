"""The observed state as a file: exported on the host, planned against anywhere else.

`reconcile observe --out STATE.json` writes what a dry run observes (every pool's
volumes, the domains that use them, every record in full) with the config's pools and
images it was observed with, minus anything secret; `reconcile --dry-run --observed
STATE.json` plans against it without opening a single connection, so a change review's
CI job far from the host makes the very plan the host would make from that state.

The file is versioned (`format_version`), deterministic JSON (pools, volumes and
records sorted; each record as stored; `.json.gz` is gzip with no timestamp inside),
written atomically. The version grows whenever the content does, and LACKS says, per
older version, what a file of it may not carry: a pool's fact that is absent is marked
unknown (ObservedPool.unknown), never read as a default, and the planner refuses what
depends on it with a plan error that says to re-export. A file of the current version
carries every field. Reading it checks everything
with pydantic: a malformed, truncated or unknown-version file, or records that disagree
with the volumes beside them, is an error naming the file and the field. It is read within
bounds (reconciler/schema/bounded.py): a regular file, opened without blocking, at most
MAX_STATE_BYTES as stored and as inflated, JSON nested no deeper than its limit.
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
import socket
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from reconciler.model.errors import ReconcileError
from reconciler.model.observed import Holder, Observed, ObservedPool
from reconciler.model.record import BadRecord, DiskRecord
from reconciler.schema.bounded import UnsafeInput, gunzip, load_json, read_regular
from reconciler.schema.config import Config
from reconciler.schema.recordcheck import validate
from reconciler.schema.write import write_atomic_bytes

FORMAT_VERSION = 2
# Per older version, the pool fields its files may lack: version 1 grew them without its
# number growing (shared, held: take-over and hand-over; available, allocated, layouts:
# migrations; thick_unit: LVM targets), so a version 1 file may have any of them or none.
LACKS: dict[int, tuple[str, ...]] = {
    1: ("shared", "held", "available", "allocated", "layouts", "thick_unit"),
}
# Pool fields a file of the current version may lack, having been written before they
# existed (the version did not grow for them): read as unknown, as LACKS are.
GREW: tuple[str, ...] = ("snapshots",)
OLDER = "its format predates them; re-export it with `reconcile observe`"
# An export is made without manifests, and the holds a host reads are those of the disks
# its manifests name (Session.observe): a state never says which of a shared pool's disks
# another host holds, so what depends on that is planned on the host.
NO_HOLDS = (
    "an export does not read other hosts' holds on the disks the manifests name (it reads "
    "no manifests); plan this on the host"
)
# What an absent field is read as, only so the file validates: it is marked unknown.
_PLACEHOLDER: dict[str, Any] = {
    "shared": False,
    "held": {},
    "available": None,
    "allocated": {},
    "layouts": [],
    "thick_unit": 0,
    "snapshots": False,
}
# The most a state file may be, as read and as inflated: far above a host's (a record is
# about 1 KiB), far below what would exhaust the memory of the machine planning from it.
MAX_STATE_BYTES = 128 << 20
_SECRET_QUERY = re.compile(r"(pass|secret|key|token|auth|cred)", re.I)


class StateError(ReconcileError):
    """An observed-state file that cannot be planned against."""


def redact_url(url: str) -> str:
    """A URL without its user info and without query parameters that look secret."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = u.hostname or ""
    if u.port:
        netloc += f":{u.port}"
    if u.username or u.password:
        netloc = "<redacted>@" + netloc
    query = "&".join(
        p if not _SECRET_QUERY.search(p.split("=", 1)[0]) else p.split("=", 1)[0] + "=<redacted>"
        for p in u.query.split("&")
        if p
    )
    if not url.startswith(f"{u.scheme}://"):
        return urlunsplit((u.scheme, netloc, u.path, query, ""))
    # urlunsplit drops the '//' of an empty host (qemu+unix:///system): keep it.
    return f"{u.scheme}://{netloc}{u.path}" + (f"?{query}" if query else "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StateHolder(_Strict):
    host: str
    generation: int
    free: bool
    why: str


class StatePool(_Strict):
    # Every field required: a default would plan something the host did not see.
    volumes: list[str] | None
    error: str | None
    managed_elsewhere: bool
    header_formats: dict[str, str]
    attached: dict[str, list[str]]
    running: dict[str, list[str]]
    attachments_known: bool
    attachments_why: str
    shared: bool
    held: dict[str, StateHolder]
    # What migrations are judged by (ObservedPool).
    available: int | None
    allocated: dict[str, int]
    layouts: list[str]
    thick_unit: int
    # Whether the pool's driver takes snapshots (diff/snapshots.py).
    snapshots: bool
    # Snapshot key -> the volumes depending on it (ObservedPool.snapshot_users): written
    # only where a snapshot has any (an rbd clone), so states without any are unchanged.
    snapshot_users: dict[str, list[str]] = {}


class StateBadRecord(_Strict):
    pool: str
    volume: str
    error: str


class StateConfigPool(_Strict):
    libvirtPool: str  # as the config spells it
    backends: list[str]
    uri: str


class StateConfigImage(_Strict):
    format: str
    sha256: str
    size: int
    location: str


class StateConfig(_Strict):
    pools: dict[str, StateConfigPool]
    images: dict[str, StateConfigImage]


class StateFile(_Strict):
    format_version: Literal[1, 2]
    kind: Literal["ObservedState"]
    observed_at: str
    host: str
    config: StateConfig
    pools: dict[str, StatePool]
    records: list[DiskRecord]
    bad_records: list[StateBadRecord]


@dataclass(frozen=True)
class StateInfo:
    file: str
    observed_at: datetime.datetime
    host: str

    def age(self, now: datetime.datetime) -> float:
        return (now - self.observed_at).total_seconds()


def _scrubber(config: Config) -> Any:
    """Replace every configured URL, where a message quotes it, by its redacted form."""
    urls = {pc.uri for pc in config.pools.values()} | {i.location for i in config.images.values()}
    pairs = sorted(
        ((u, redact_url(u)) for u in urls if redact_url(u) != u), key=lambda x: -len(x[0])
    )

    def scrub(text: str | None) -> str | None:
        if text is None:
            return None
        for raw, safe in pairs:
            text = text.replace(raw, safe)
        return text

    return scrub


def document(observed: Observed, config: Config, now: datetime.datetime) -> dict[str, Any]:
    scrub = _scrubber(config)
    pools = {}
    for name, p in sorted(observed.pools.items()):
        pools[name] = {
            "volumes": None if p.volumes is None else sorted(p.volumes),
            "error": scrub(p.error),
            "managed_elsewhere": p.managed_elsewhere,
            "header_formats": dict(sorted(p.header_formats.items())),
            "attached": {k: list(v) for k, v in sorted(p.attached.items())},
            "running": {k: list(v) for k, v in sorted(p.running.items())},
            "attachments_known": p.attachments_known,
            "attachments_why": scrub(p.attachments_why),
            "shared": p.shared,
            "held": {
                v: {"host": h.host, "generation": h.generation, "free": h.free, "why": h.why}
                for v, h in sorted(p.held.items())
            },
            "available": p.available,
            "allocated": dict(sorted(p.allocated.items())),
            "layouts": sorted(p.layouts),
            "thick_unit": p.thick_unit,
            "snapshots": p.snapshots,
        } | (
            {"snapshot_users": {k: list(v) for k, v in sorted(p.snapshot_users.items())}}
            if p.snapshot_users
            else {}
        )
    return {
        "format_version": FORMAT_VERSION,
        "kind": "ObservedState",
        "observed_at": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "config": {
            "pools": {
                n: {
                    "libvirtPool": pc.libvirt_pool,
                    "backends": [b.value for b in pc.backends],
                    "uri": redact_url(pc.uri),
                }
                for n, pc in sorted(config.pools.items())
            },
            "images": {
                n: {
                    "format": ic.format.value,
                    "sha256": ic.sha256,
                    "size": ic.size,
                    "location": redact_url(ic.location),
                }
                for n, ic in sorted(config.images.items())
            },
        },
        "pools": pools,
        "records": [
            r.model_dump(mode="json")
            for r in sorted(observed.records, key=lambda r: (r.pool, r.volume))
        ],
        "bad_records": [
            {"pool": b.pool, "volume": b.volume, "error": scrub(b.error)}
            for b in sorted(observed.bad_records, key=lambda b: (b.pool, b.volume))
        ],
    }


def write(path: str, doc: dict[str, Any]) -> None:
    # Keys in the order document() built them (sorted where it sorts): a record's `spec`
    # keeps the order it was stored in, which the JSON patches of a plan follow.
    data = (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # no timestamp: the same state, the same bytes
    write_atomic_bytes(path, data)


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _fill_lacking(doc: dict[str, Any], lacking: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """In a file of an older version, the fields `lacking` that each pool does not carry:
    filled with a placeholder so the file validates, and returned per pool as unknown."""
    pools = doc.get("pools")
    if not lacking or not isinstance(pools, dict):
        return {}
    unknown = {}
    for name, p in pools.items():
        if isinstance(p, dict) and (absent := [f for f in lacking if f not in p]):
            p.update({f: _PLACEHOLDER[f] for f in absent})
            unknown[name] = dict.fromkeys(absent, OLDER)
    return unknown


def load(path: str) -> tuple[Observed, StateInfo]:
    """Read and check a state file; StateError names the file and the field."""
    doc = _read(path)
    version = doc.get("format_version")
    if version != FORMAT_VERSION and (type(version) is not int or version not in LACKS):
        known = ", ".join(str(v) for v in (*sorted(LACKS), FORMAT_VERSION))
        raise StateError(
            f"{path}: format_version: {version!r} is not a state format this reconciler "
            f"knows ({known}); export it again with this version's 'reconcile observe'"
        )
    unknown = _fill_lacking(doc, LACKS.get(version, ()) + GREW)
    try:
        state = StateFile.model_validate(doc)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise StateError(f"{path}: {_field(first['loc'])}: {first['msg']}{more}") from None
    observed_at = _observed_at(path, state)
    _check_consistent(path, state)
    # Whoever wrote the file wrote its records: each is checked as the host's are (a
    # record that fails is its volume's plan error, as it would be on the host).
    records, refused = validate(
        state.records, {n: p.backends for n, p in state.config.pools.items()}
    )
    bad = tuple(BadRecord(b.pool, b.volume, b.error) for b in state.bad_records)
    return (
        Observed(_pools(state, unknown), tuple(records), bad + tuple(refused)),
        StateInfo(path, observed_at, state.host),
    )


def _read(path: str) -> dict[str, Any]:
    """The file's JSON object, read within bounds (gzip inflated)."""
    try:
        raw = read_regular(path, what=path, max_bytes=MAX_STATE_BYTES, follow_symlinks=True)
        if path.endswith(".gz") or raw[:2] == b"\x1f\x8b":
            raw = gunzip(raw, what=path, max_bytes=MAX_STATE_BYTES)
        doc = load_json(raw, what=path, max_bytes=MAX_STATE_BYTES)
    except FileNotFoundError:
        raise StateError(f"{path}: cannot read the observed state: no such file") from None
    except UnsafeInput as e:
        raise StateError(str(e)) from None
    if not isinstance(doc, dict):
        raise StateError(f"{path}: not an observed state (expected a JSON object)")
    return doc


def _observed_at(path: str, state: StateFile) -> datetime.datetime:
    try:
        observed_at = datetime.datetime.fromisoformat(state.observed_at)
    except ValueError:
        raise StateError(f"{path}: observed_at: {state.observed_at!r} is not a time") from None
    if observed_at.tzinfo is None:
        raise StateError(f"{path}: observed_at: {state.observed_at!r} has no time zone")
    return observed_at


def _check_consistent(path: str, state: StateFile) -> None:
    """Records and pools that disagree with each other: one record per volume, every
    configured pool that has records observed, every described volume among the volumes."""
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(state.records):
        where = f"{path}: records[{i}]"
        if r.key() in seen:
            raise StateError(f"{where}: a second record for {r.pool}/{r.volume}")
        seen.add(r.key())
        # A record without its volume is drift, which the plan shows; a record of a pool
        # the config lacks the planner reports. A configured pool must have been observed.
        if r.pool not in state.pools and r.pool in state.config.pools:
            raise StateError(f"{where}: pool {r.pool} is configured but was not observed")
    for name, p in state.pools.items():
        for vol in (*p.header_formats, *p.attached, *p.running, *p.allocated, *p.snapshot_users):
            if p.volumes is not None and vol not in p.volumes:
                raise StateError(
                    f"{path}: pools.{name}: {vol} is described but is not among the volumes"
                )


def _pools(state: StateFile, unknown: dict[str, dict[str, str]]) -> dict[str, ObservedPool]:
    """The observed pools of a checked file; `unknown`: per pool, what its version lacks."""
    return {
        name: ObservedPool(
            name,
            None if p.volumes is None else frozenset(p.volumes),
            p.error,
            dict(p.header_formats),
            {k: tuple(v) for k, v in p.attached.items()},
            {k: tuple(v) for k, v in p.running.items()},
            p.attachments_known,
            p.attachments_why,
            p.managed_elsewhere,
            p.shared,
            {v: Holder(h.host, h.generation, h.free, h.why) for v, h in p.held.items()},
            p.available,
            dict(p.allocated),
            frozenset(p.layouts),
            p.thick_unit,
            {**unknown.get(name, {}), **({"held": NO_HOLDS} if p.shared else {})},
            p.snapshots,
            {k: tuple(v) for k, v in p.snapshot_users.items()},
        )
        for name, p in state.pools.items()
    }
