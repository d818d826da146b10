"""`reconcile disks [-m PATH]... INSTANCE... [--output xml|json]`: each disk of an
instance as a domain attaches it, its libvirt `<disk>` element built from its record and
its pool's config (reconciler/attach, reconciler/client). An instance any of whose disks
is not ready (not made, being made, resized or moved, a change still to apply, failed)
gets an error naming each such disk's state and no element, so nobody attaches half of
it; exit 1 if any instance did.

xml: one `<devices instance="UUID">` document per instance holding its `<disk>`
elements, blank-line separated; json: a list with each instance's readiness and disks."""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from reconciler.commands.common import EXIT_ERROR, EXIT_OK, fast_exit, parse, read_config


def add_manifests(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--manifests",
        action="append",
        required=True,
        metavar="PATH",
        help="a manifest file or directory (repeatable)",
    )
    p.add_argument("instances", nargs="+", metavar="INSTANCE", help="instance UUID")


def run(argv: Sequence[str]) -> int:
    from reconciler.attach.xml import to_text
    from reconciler.client import Client, NotReady
    from reconciler.model.errors import ReconcileError

    fast_exit()

    p = argparse.ArgumentParser(
        prog="reconcile disks",
        description="Each disk of the instances' manifests as a domain attaches it: the "
        "libvirt <disk> element from its record and its pool's config. Only for instances "
        "whose disks are all ready.",
    )
    add_manifests(p)
    p.add_argument("--output", choices=("xml", "json"), default="xml")
    args = parse(p, argv)
    config = read_config(args)
    rc = EXIT_OK
    docs: list[str] = []
    rows: list[dict[str, object]] = []
    with Client(config, args.manifests) as client:
        for instance, disks in client.disks_each(args.instances):  # one load of the manifests
            if isinstance(disks, NotReady):
                rc = EXIT_ERROR
                print(f"reconcile disks: {disks}", file=sys.stderr)
                rows.append(disks.readiness.to_json())
                continue
            if isinstance(disks, ReconcileError):
                # Ready, but its pool's config lacks what a domain needs.
                rc = EXIT_ERROR
                print(f"reconcile disks: instance {instance}: {disks}", file=sys.stderr)
                rows.append({"instance": instance, "ready": True, "error": str(disks)})
                continue
            if args.output == "json":  # each disk's XML text is made for json only
                rows.append(
                    {"instance": instance, "ready": True, "disks": [d.to_json() for d in disks]}
                )
                continue
            devices = ET.Element("devices", instance=instance)
            devices.extend(d.element for d in disks)
            docs.append(to_text(devices, in_place=True))  # the disks are not used again
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    elif docs:
        print("\n\n".join(docs))
    return rc
