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

from reconciler.commands.common import EXIT_ERROR, EXIT_OK, parse, read_config


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
        for instance in args.instances:
            try:
                disks = client.disks(instance)
            except NotReady as e:
                rc = EXIT_ERROR
                print(f"reconcile disks: {e}", file=sys.stderr)
                rows.append(e.readiness.to_json())
                continue
            except ReconcileError as e:  # ready, but its pool's config lacks what a domain needs
                rc = EXIT_ERROR
                print(f"reconcile disks: instance {instance}: {e}", file=sys.stderr)
                rows.append({"instance": instance, "ready": True, "error": str(e)})
                continue
            devices = ET.Element("devices", instance=instance)
            devices.extend(d.element for d in disks)
            docs.append(to_text(devices))
            rows.append(
                {"instance": instance, "ready": True, "disks": [d.to_json() for d in disks]}
            )
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    elif docs:
        print("\n\n".join(docs))
    return rc
