"""`reconcile schema [--kind manifest|config]`: print the JSON Schema of a manifest or of
the config, from the models that validate them (so it cannot drift from what is
accepted), with every rule of theirs JSON Schema can say (reconciler/schema/jsonschema.py).
It reads no config and takes no --config or -v."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from reconciler.commands.common import EXIT_OK


def run(argv: Sequence[str]) -> int:
    from reconciler.schema.jsonschema import config_schema, manifest_schema

    p = argparse.ArgumentParser(
        prog="reconcile schema", description="Print the JSON Schema of the manifest or config."
    )
    p.add_argument("--kind", choices=("manifest", "config"), default="manifest")
    args = p.parse_args(argv)
    schema = manifest_schema() if args.kind == "manifest" else config_schema()
    print(json.dumps(schema, indent=2, sort_keys=True))
    return EXIT_OK
