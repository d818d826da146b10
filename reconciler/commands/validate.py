"""`reconcile validate PATH...`: check manifests against the schema and the config's pools
and images, as a plan would load them; it opens no connection and writes nothing. Exit 1
when any manifest is invalid, each error on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reconciler.commands.common import EXIT_ERROR, EXIT_OK, parse, read_config


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="reconcile validate",
        description="Check manifests against the schema and the "
        "config's pools and images; no libvirt.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    args = parse(p, argv)
    from reconciler.schema.manifestdir import load_manifests  # after parsing: --help is fast

    config = read_config(args)
    loaded, failed = load_manifests(args.paths, config)
    for f in failed:
        for e in f.errors:
            print(f"error: {e}", file=sys.stderr)
    n_err = sum(len(f.errors) for f in failed)
    print(f"{len(loaded)} valid, {len(failed)} invalid manifest(s), {n_err} error(s)")
    return EXIT_ERROR if failed else EXIT_OK
