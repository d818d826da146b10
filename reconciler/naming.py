"""Deterministic volume names, derived from instance and disk, never chosen at random."""

from __future__ import annotations

import re

# Temporary files carry this prefix so the next run can recognise and remove them.
TEMP_PREFIX = ".reconciler-tmp-"
CACHE_PREFIX = "_cache_"

_VOLUME_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}_(.+)$")


def volume_name(instance: str, disk: str) -> str:
    """The volume holding `disk` of `instance`: `<uuid>_<disk>` (names are validated)."""
    return f"{instance}_{disk}"


def is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)
