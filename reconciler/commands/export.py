"""`reconcile export INSTANCE/DISK --format raw|qcow2 --out FILE`: a disk's content as a
standalone image file, with its sha256, sizes and a catalog entry ready to paste into
the config's `images:` (so the image can make new disks).

The disk is found by its record on this host (the records database, or its pool's own
store), without a manifest, and read in its recorded format (drivers/flows/export.py);
the file is written whole or not at all (util/outfile.py). The disk's lock is held shared
while it is read, so no step of this host changes it meanwhile (a resize, a delete, a
migration); a running domain may still write to it, which makes the export only
crash-consistent, and a warning says so. Encrypted disks are refused (an export would
have to be decrypted with the pool's key; not built yet), as are disks not at rest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.commands.common import EXIT_OK, parse, read_config
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import check_name
from reconciler.schema.config import ImageConfig, ImageFormat

if TYPE_CHECKING:
    from reconciler.control.session import Session
    from reconciler.drivers.api import ManagingDriver

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
        for part in m.group("instance", "disk", "snapshot"):
            if part is not None:
                check_name(part)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
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
    p.add_argument("disk", type=target, metavar="INSTANCE/DISK", help="the disk, by its record")
    p.add_argument("--format", required=True, choices=[f.value for f in ImageFormat])
    p.add_argument("--out", required=True, metavar="FILE", help="the image file to write")
    p.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (at once, by rename)"
    )
    p.add_argument(
        "--name",
        type=image_name,
        metavar="ID",
        help="the image's id in the printed catalog entry (default INSTANCE-DISK)",
    )
    p.add_argument("--output", choices=("text", "json"), default="text")
    return p


def run(argv: Sequence[str]) -> int:
    from reconciler.control.session import Session
    from reconciler.drivers.flows.export import digest, write_disk
    from reconciler.util import outfile

    args = parse(parser(), argv)
    want: Target = args.disk
    fmt = ImageFormat(args.format)
    out = Path(args.out)
    outfile.check_target(Path(out).absolute(), force=args.force)  # before anything is read
    if want.snapshot is not None:
        raise ReconcileError(f"{want}: exporting a snapshot is not supported yet")
    config = read_config(args)
    with Session(config) as s:
        rec = find_record(s, want)
        d = s.drivers[rec.pool].as_managing()
        if d is None:
            raise ReconcileError(f"{want}: pool {rec.pool} cannot be read on this host")
        with ExitStack() as held:
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
            warn_if_running(d, fresh)
            with outfile.written(out, force=args.force) as f:
                how = write_disk(d, fresh, fmt, f.fd, str(f.target))
                sha, size = digest(f.fd)
            final = f.target
    name = args.name or default_name(want)
    entry = catalog_entry(final, fmt, sha, size)
    report = {
        "disk": str(want),
        "pool": rec.pool,
        "volume": rec.volume,
        "recorded_format": rec.format.value,
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


def find_record(s: Session, want: Target) -> DiskRecord:
    """The disk's record on this host: exactly one, checked (recordcheck)."""
    found = s.instance_records(want.instance, ())
    mine = [r for r in found.records if r.kind is RecordKind.DISK and r.disk == want.disk]
    if len(mine) == 1:
        return mine[0]
    if len(mine) > 1:
        where = ", ".join(f"{r.pool}/{r.volume}" for r in mine)
        raise ReconcileError(
            f"{want}: more than one record names this disk ({where}); not exported"
        )
    volume = f"{want.instance}_{want.disk}"
    for bad in found.refused:
        if bad.volume == volume:
            raise ReconcileError(f"{want}: {bad.error}; not exported")
    unreadable = "".join(
        f"; pool {p}'s records could not be read: {why}"
        for p, why in sorted(found.unreadable.items())
    )
    raise ReconcileError(f"{want}: no record of this disk on this host{unreadable}")


def default_name(want: Target) -> str:
    name = f"{want.instance}-{want.disk}" + (f"-{want.snapshot}" if want.snapshot else "")
    try:
        return check_name(name)
    except ValueError as e:
        raise ReconcileError(f"{want}: the default image id {e}; give one with --name") from None


def check_exportable(want: Target, rec: DiskRecord) -> None:
    if rec.state is not RecordState.READY:
        raise ReconcileError(
            f"{want}: the disk is {rec.state.value}, not ready; export it once apply has finished"
        )
    if rec.migration is not None:
        raise ReconcileError(
            f"{want}: the disk is being moved to {rec.migration.pool}/"
            f"{rec.migration.final_volume}; export it once the move has finished"
        )
    if rec.encryption is not None:
        raise ReconcileError(
            f"{want}: the disk is encrypted; exporting an encrypted disk is not supported yet"
        )


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
