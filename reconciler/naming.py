"""Deterministic volume names, derived from instance and disk, never chosen at random."""

from __future__ import annotations

# Temporary files carry this prefix so the next run can recognise and remove them.
TEMP_PREFIX = ".reconciler-tmp-"
CACHE_PREFIX = "_cache_"


def volume_name(instance: str, disk: str) -> str:
    """The volume holding `disk` of `instance`: `<uuid>_<disk>` (names are validated)."""
    return f"{instance}_{disk}"
