"""Deterministic volume names, derived from instance and disk, never chosen at random."""

from __future__ import annotations

import hashlib

# Temporary files carry this prefix so the next run can recognise and remove them.
TEMP_PREFIX = ".reconciler-tmp-"
CACHE_PREFIX = "_cache_"


def volume_name(instance: str, disk: str) -> str:
    """The volume holding `disk` of `instance`: `<uuid>_<disk>` (names are validated)."""
    return f"{instance}_{disk}"


# '+' is in no manifest name (check_name) yet valid in file, RBD and LVM names, so these
# never collide with another disk's volume.
def migration_name(volume: str) -> str:
    """Where a disk moving within its pool is copied before it takes the disk's name."""
    return f"{volume}+migrating"


def retained_name(volume: str, generation: int) -> str:
    """The name a disk's old volume keeps (deletionPolicy Retain) when its copy takes the
    disk's name in the same pool: unique per record generation, so never reused."""
    return f"{volume}+retained-g{generation}"


SNAPSHOT_INFIX = "+snap-"


def snapshot_name(volume: str, name: str) -> str:
    """The key (and, where the backend keeps a volume per snapshot, the volume) of disk
    `volume`'s snapshot `name`: `VOLUME+snap-NAME`."""
    return f"{volume}{SNAPSHOT_INFIX}{name}"


def image_entry_name(image_id: str, sha256: str) -> str:
    """The cache entry holding an image (as raw) in a pool: named by id and content."""
    return f"{CACHE_PREFIX}image-{image_id}-{sha256[:16]}"


def template_entry_name(kind: str, size: int, label: str | None) -> str:
    """The cache entry a template of this kind, size and label is kept in (deterministic)."""
    tag = hashlib.sha256(f"{kind}\0{size}\0{label or ''}".encode()).hexdigest()[:12]
    return f"{CACHE_PREFIX}template-{kind}-{size}-{tag}"
