"""`reconcile export INSTANCE/DISK[@SNAPSHOT] --format raw|qcow2 --out FILE`: a disk's
(or one of its snapshots') content as a standalone image file, with its sha256, sizes
and a catalog entry ready to paste into the config's `images:` (so the image can make
new disks).

The disk is found by its record on this host (the records database, or its pool's own
store), without a manifest, and read in its recorded format (drivers/flows/export.py);
the file is written whole or not at all (util/outfile.py). The disk's lock (a
snapshot's: its key's) is held shared while it is read, so no step changes it meanwhile
(a resize, a delete, a migration, a snapshot's delete); a running domain may still
write to the disk, which makes the export only crash-consistent, and a warning says so.
An encrypted disk is exported decrypted, with its key from its pool's key source
(config `keys`); without one it is refused. A snapshot is found by its record (kind
`snapshot`) and read through its driver's Snapshots.snapshot_image(), in its recorded
format; a pool whose driver takes no snapshots says so. Disks and snapshots not at rest
are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.commands.common import EXIT_OK, parse, read_config
from reconciler.drivers.flows.export import digest
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import snapshot_name, volume_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import check_name
from reconciler.schema.config import ImageConfig, ImageFormat
from reconciler.schema.recordcheck import is_snapshot_name

if TYPE_CHECKING:
    from reconciler.control.session import Session
    from reconciler.drivers.api import ManagingDriver


class ExportError(ReconcileError):
    """An export refused before anything is written."""


_TARGET = re.compile(r"^(?P<instance>[^/@]+)/(?P<disk>[^/@]+)(?:@(?P<snapshot>[^/@]+))?$")


@dataclass(frozen=True)
class Target:
    instance: str
    disk: str
    snapshot: str | None

    def __str__(self) -> str:
        at = f"@{self.snapshot}" if self.snapshot else ""
        return f"{self.instance}/{self.disk}{at}"


def target(text: str) -> Target:
    m = _TARGET.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected INSTANCE/DISK or INSTANCE/DISK@SNAPSHOT, not {text!r}"
        )
    try:
        check_name(m["instance"])
        check_name(m["disk"])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if m["snapshot"] is not None and not is_snapshot_name(m["snapshot"]):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {m['snapshot']!r} is not a snapshot name (1 to 63 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit)"
        )
    return Target(m["instance"], m["disk"], m["snapshot"])


def image_name(text: str) -> str:
    try:
        return check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile export",
        description="Write a disk's content, read in its recorded format, into FILE as a "
        "standalone raw or qcow2 image; print its sha256, sizes and a catalog entry for "
        "the config's `images:`.",
    )
    p.add_argument(
        "disk",
        type=target,
        metavar="INSTANCE/DISK[@SNAPSHOT]",
        help="the disk, or its snapshot, by its record",
    )
    p.add_argument("--format", required=True, choices=[f.value for f in ImageFormat])
    p.add_argument("--out", required=True, metavar="FILE", help="the image file to write")
    p.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (at once, by rename)"
    )
    p.add_argument(
        "--name",
        type=image_name,
        metavar="ID",
        help="the image's id in the printed catalog entry (default INSTANCE-DISK, or "
        "INSTANCE-DISK-SNAPSHOT)",
    )
    p.add_argument("--output", choices=("text", "json"), default="text")
    return p


def run(argv: Sequence[str]) -> int:
    from reconciler.control.session import Session
    from reconciler.util import outfile

    args = parse(parser(), argv)
    want: Target = args.disk
    fmt = ImageFormat(args.format)
    out = Path(args.out)
    outfile.check_target(out.absolute(), force=args.force)  # before anything is read
    name = args.name or default_name(want)
    config = read_config(args)
    with Session(config) as s:
        rec = find_record(s, want)
        refuse_pool_paths(s, out)
        d = s.drivers[rec.pool].as_managing()
        if d is None:
            raise ReconcileError(f"{want}: pool {rec.pool} cannot be read on this host")
        with ExitStack() as held:
            # The record's own key's lock (the disk's volume, or the snapshot's key),
            # shared: what changes the disk, or deletes the snapshot, holds it
            # exclusively; taken before a cache entry's, as apply takes them.
            held.enter_context(d.lock(rec.volume, shared=True))
            fresh = s.store.get(rec.pool, rec.volume)
            if fresh is None or fresh.generation != rec.generation:
                raise ReconcileError(
                    f"{want}: its record changed while waiting for its lock; run again"
                )
            check_exportable(want, fresh)
            if fresh.backing is not None:
                # An entry in use is never removed (cache gc takes its lock exclusively).
                held.enter_context(d.lock(fresh.backing, shared=True))
            if want.snapshot is None:
                warn_if_running(d, fresh)
            with outfile.written(out, force=args.force) as f:
                how = write(d, fresh, fmt, f.fd, f"export {want} to {f.target}")
                sha, size = digest(f.fd)
            final = f.target
    entry = catalog_entry(final, fmt, sha, size)
    report = {
        "disk": str(want),
        "pool": fresh.pool,
        "volume": fresh.volume,
        "recorded_format": fresh.format.value,
        "file": str(final),
        "format": fmt.value,
        "sha256": sha,
        "virtual_size": fresh.virtual_size,
        "file_size": size,
        "written_by": how,
        "catalog": {name: entry},
    }
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return EXIT_OK


def refuse_pool_paths(s: Session, out: Path) -> None:
    """FILE never lands where a pool keeps its volumes: there it would be an unmanaged
    volume, or (with --force) replace a disk."""
    where = str(Path(os.path.realpath(out.parent)) / out.name)
    for name, d in s.managing_drivers().items():
        inside = None
        with contextlib.suppress(ReconcileError):  # a pool not reachable holds no path here
            inside = d.volume_at(where)
        if inside is not None:
            raise ExportError(
                f"{out} is in pool {name}, where its volumes are kept; export outside a pool"
            )


def write(d: ManagingDriver, rec: DiskRecord, fmt: ImageFormat, fd: int, doing: str) -> str:
    """Write the disk or snapshot of `rec` into the file at `fd`; how it was written."""
    from reconciler.drivers.api import snapshots_of
    from reconciler.drivers.flows.export import write_decrypted, write_disk, write_image

    if rec.encryption is not None:
        return write_decrypted(d, rec, key_of(d, rec), fmt, fd, doing)
    if rec.kind is RecordKind.DISK:
        return write_disk(d, rec, fmt, fd, doing)
    image = snapshots_of(d).snapshot_image(rec)
    return write_image(image, rec.virtual_size, fmt, fd, doing)


def find_record(s: Session, want: Target) -> DiskRecord:
    """The record of the disk (or of its snapshot) on this host: exactly one, checked
    (recordcheck)."""
    found = s.instance_records(want.instance, ())
    if want.snapshot is None:
        kind, what = RecordKind.DISK, "this disk"
        volume = volume_name(want.instance, want.disk)
    else:
        kind, what = RecordKind.SNAPSHOT, f"snapshot {want.snapshot} of this disk"
        volume = snapshot_name(volume_name(want.instance, want.disk), want.snapshot)
    mine = [
        r
        for r in found.records
        if r.kind is kind
        and r.disk == want.disk
        and (r.snapshot.name if r.snapshot is not None else None) == want.snapshot
    ]
    if len(mine) == 1:
        return mine[0]
    if len(mine) > 1:
        where = ", ".join(f"{r.pool}/{r.volume}" for r in mine)
        raise ReconcileError(f"{want}: more than one record names {what} ({where}); not exported")
    for bad in found.refused:
        if bad.volume == volume:
            raise ReconcileError(f"{want}: {bad.error}; not exported")
    unreadable = "".join(
        f"; pool {p}'s records could not be read: {why}"
        for p, why in sorted(found.unreadable.items())
    )
    if want.snapshot is not None and any(
        r.kind is RecordKind.DISK and r.disk == want.disk for r in found.records
    ):
        raise ReconcileError(f"{want}: the disk has no snapshot {want.snapshot}{unreadable}")
    raise ReconcileError(f"{want}: no record of {what} on this host{unreadable}")


def default_name(want: Target) -> str:
    name = f"{want.instance}-{want.disk}" + (f"-{want.snapshot}" if want.snapshot else "")
    try:
        return check_name(name)
    except ValueError as e:
        raise ReconcileError(f"{want}: the default image id {e}; give one with --name") from None


def check_exportable(want: Target, rec: DiskRecord) -> None:
    """Refuse a disk (or snapshot) that is not at rest, and an encrypted one."""
    what = "disk" if want.snapshot is None else "snapshot"
    if rec.state is not RecordState.READY:
        raise ReconcileError(
            f"{want}: the {what} is {rec.state.value}, not ready; export it once apply has finished"
        )
    if rec.migration is not None:
        raise ReconcileError(
            f"{want}: the disk is being moved to {rec.migration.pool}/"
            f"{rec.migration.final_volume}; export it once the move has finished"
        )


def key_of(d: ManagingDriver, rec: DiskRecord) -> bytes:
    """An encrypted disk's key, from its pool's key source: its libvirt secret is private
    (libvirt never gives its value back), so without a source there is no key to have."""
    from reconciler.drivers.api import encrypts_of

    assert rec.encryption is not None
    source = encrypts_of(d).secrets().source
    if source is None:
        raise ReconcileError(
            f"{rec.pool}/{rec.volume} is encrypted and pool {rec.pool} has no key source "
            "(config `keys`): its key is only in a private libvirt secret, which libvirt "
            "never gives back, so it cannot be exported decrypted"
        )
    return source.get(rec.encryption.secret)


def warn_if_running(d: ManagingDriver, rec: DiskRecord) -> None:
    att = d.attachments()
    users = sorted(att.running.get(rec.volume, ())) if att.known else []
    if users:
        print(
            f"reconcile export: warning: domain(s) {', '.join(users)} are running with "
            f"{rec.pool}/{rec.volume}: the export is crash-consistent at best",
            file=sys.stderr,
        )


def catalog_entry(path: Path, fmt: ImageFormat, sha256: str, size: int) -> dict[str, Any]:
    """The config's `images:` entry for the file, as it validates (schema/config.py)."""
    entry: dict[str, Any] = {
        "location": "file://" + urllib.parse.quote(str(path)),
        "format": fmt.value,
        "sha256": sha256,
        "size": size,
    }
    ImageConfig.model_validate(entry)  # what the config loader will check, checked here first
    return entry


def render(report: dict[str, Any]) -> str:
    """The text output; its last lines are the catalog entry, YAML to paste under `images:`
    (every string JSON-quoted: a JSON string is a YAML double-quoted scalar)."""
    from reconciler.model.units import format_size

    lines = [
        f"exported {report['disk']} ({report['pool']}/{report['volume']}, recorded "
        f"{report['recorded_format']}) by {report['written_by']}",
        f"file:         {report['file']}",
        f"format:       {report['format']}",
        f"sha256:       {report['sha256']}",
        f"virtual size: {report['virtual_size']} ({format_size(report['virtual_size'])})",
        f"file size:    {report['file_size']} ({format_size(report['file_size'])})",
        "catalog entry (paste under `images:` in the config):",
    ]
    for name, entry in report["catalog"].items():
        lines.append(f"  {name}:")
        for key, value in entry.items():
            shown = json.dumps(value) if isinstance(value, str) else str(value)
            lines.append(f"    {key}: {shown}")
    return "\n".join(lines)
