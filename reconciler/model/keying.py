"""What happens to a disk's key when the disk is copied into a new layout (a migration that
changes its encryption, or moves an encrypted disk): ONE decision, made here, which the
planner shows and apply records in the migration before it copies anything.

- new: plain -> luks. A new key and secret, as a create makes them; no old key.
- keep: a LUKS volume over raw bytes (flat raw, lvm, rbd) moving to another such volume
  with the same libvirt daemon and key source. Its header and ciphertext are copied and
  compared as raw bytes; the same secret; no key is read.
- rekey: any other encrypted -> encrypted. Read with the old key (from the key source),
  written under a new key and secret.
- decrypt: encrypted -> plain. Read with the old key, written plain.

A private libvirt secret never gives its key back, so `rekey` and `decrypt` (and growing
an encrypted qcow2, which qemu-img opens only with its key) need the key from the key
source of the pool the disk is in (config `keys`); without one they are plan errors.

Nothing here does I/O: the inputs are specs (as records and actions hold them) and
whether the two pools share a libvirt daemon and a key source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Layouts whose encrypted disk is qemu's `luks` over the volume's raw bytes: its header
# and ciphertext are the volume's bytes, so a raw copy of them is the same disk.
RAW_LUKS_LAYOUTS = frozenset({("flat", "raw"), ("lvm", "raw"), ("rbd", "raw")})
# Room an encrypted copy takes besides its data: a LUKS header (2,068,480 bytes as qemu
# makes it here, drivers/host/keys.py), rounded up.
HEADER_ROOM = 4 << 20


class Keying(StrEnum):
    NEW = "new"
    KEEP = "keep"
    REKEY = "rekey"
    DECRYPT = "decrypt"


@dataclass(frozen=True, slots=True)
class PoolKeys:
    """Where a pool's keys live: its libvirt daemon (`uri`) and its key source (the
    config's `keys`, as canonical JSON; None: none)."""

    uri: str
    source: str | None


def _encrypted(spec: Mapping[str, Any]) -> bool:
    return spec.get("encryption") is not None


def raw_luks(spec: Mapping[str, Any]) -> bool:
    """Whether an encrypted disk of `spec` is a LUKS volume over the volume's raw bytes."""
    return (str(spec["backend"]), str(spec["format"])) in RAW_LUKS_LAYOUTS


def decide(old: Mapping[str, Any], new: Mapping[str, Any], same_keys: bool) -> Keying | None:
    """The keying of a copy of a disk made to `old` into one made to `new` (None: neither
    is encrypted); `same_keys`: both pools share a libvirt daemon and a key source."""
    was, will = _encrypted(old), _encrypted(new)
    if not was and not will:
        return None
    if not was:
        return Keying.NEW
    if not will:
        return Keying.DECRYPT
    if same_keys and raw_luks(old) and raw_luks(new):
        return Keying.KEEP
    return Keying.REKEY


def needs_old_key(keying: Keying | None) -> bool:
    """Whether the copy reads the disk with its key (from the key source)."""
    return keying in (Keying.REKEY, Keying.DECRYPT)


def makes_new_key(keying: Keying | None) -> bool:
    """Whether the copy is written under a new key and secret."""
    return keying in (Keying.NEW, Keying.REKEY)


def erases_old_key(keying: Keying | None) -> bool:
    """Whether the old secret (and stored key) is erased once the old volume is gone."""
    return keying in (Keying.REKEY, Keying.DECRYPT)


def key_source_needed(pool: str) -> str:
    """The words of the plan error where a key source is missing."""
    return f"give pool {pool} a key source (config `keys`) holding the disk's key"


def describe(keying: Keying) -> str:
    """What the plan says a migration does with the disk's key."""
    return {
        Keying.NEW: (
            "the copy is encrypted under a new random key, kept in a private libvirt "
            "secret (and the pool's key source, if any); the old plain volume is removed, "
            "not overwritten"
        ),
        Keying.KEEP: (
            "its LUKS header and ciphertext are copied as raw bytes: the same key and "
            "secret, no key read"
        ),
        Keying.REKEY: (
            "read with its key from the pool's key source and written under a new random "
            "key and secret; the old secret and stored key are erased once the old volume "
            "is gone"
        ),
        Keying.DECRYPT: (
            "read with its key from the pool's key source and written plain; the old "
            "secret and stored key are erased once the old volume is gone"
        ),
    }[keying]
