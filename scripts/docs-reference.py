#!/usr/bin/env python3
"""Write docs/reference.md from the JSON Schemas `reconcile schema` prints
(reconciler/schema/reference.py); with --check, only say whether it is current."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.schema.reference import render  # noqa: E402

TARGET = ROOT / "docs" / "reference.md"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.exists() and TARGET.read_text() == text:
            return 0
        print(f"{TARGET} is not current: run scripts/docs-reference.py", file=sys.stderr)
        return 1
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
