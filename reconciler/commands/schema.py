"""`reconcile schema [--kind manifest|config]`: print the JSON Schema of a manifest or of
the config, from the models that validate them (so it cannot drift from what is
accepted). It reads no config and takes no --config or -v."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from reconciler.commands.common import EXIT_OK


def run(argv: Sequence[str]) -> int:
    from reconciler.schema.config import Config as ConfigModel
    from reconciler.schema.manifest import Manifest

    p = argparse.ArgumentParser(
        prog="reconcile schema", description="Print the JSON Schema of the manifest or config."
    )
    p.add_argument("--kind", choices=("manifest", "config"), default="manifest")
    args = p.parse_args(argv)
    model = Manifest if args.kind == "manifest" else ConfigModel
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    print(json.dumps(schema, indent=2, sort_keys=True))
    return EXIT_OK
