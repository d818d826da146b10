"""`reconcile observe --out STATE`: export what the pools hold (volumes, the domains using
them, every record) for planning elsewhere with `reconcile --dry-run --observed STATE`
(commands/plan.py). It only reads the pools; the file is written atomically, and no
secret is written (schema/exported.py redacts user info and secret-looking query
parameters of URLs)."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence

from reconciler.commands.common import EXIT_OK, parse, read_config
from reconciler.control.session import Session


def run(argv: Sequence[str]) -> int:
    from reconciler.schema import exported

    p = argparse.ArgumentParser(
        prog="reconcile observe",
        description="Export what the pools hold (volumes, the domains using them, every "
        "record) for planning elsewhere with 'reconcile --dry-run --observed STATE'. No "
        "secrets are written: user info and secret-looking query parameters of URLs are "
        "redacted.",
    )
    p.add_argument("--out", required=True, metavar="STATE", help="STATE.json or STATE.json.gz")
    args = parse(p, argv)
    config = read_config(args)
    with Session(config) as s:
        observed = s.observe()
    now = datetime.datetime.now(datetime.UTC)
    exported.write(args.out, exported.document(observed, config, now))
    n = sum(len(p.volumes or ()) for p in observed.pools.values())
    print(
        f"wrote {args.out}: {len(observed.pools)} pool(s), {n} volume(s), "
        f"{len(observed.records)} record(s)"
    )
    return EXIT_OK
