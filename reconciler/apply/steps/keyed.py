"""An encrypted disk's key around the steps that make and remove its volume (the order is
drivers/host/keys.py's): made and defined as the recorded secret while the driver makes
the volume, undefined once the volume is gone (crypto-erase)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from reconciler.drivers.api import ManagingDriver, encrypts_of
from reconciler.drivers.host import keys
from reconciler.model.record import DiskRecord


def keyed(d: ManagingDriver, rec: DiskRecord) -> AbstractContextManager[None]:
    """The disk's key made and defined, and held while the driver makes the volume."""
    if rec.encryption is None:
        return contextlib.nullcontext()
    e = encrypts_of(d)
    return keys.made_with_key(e.secrets(), rec, e.key_usage(rec.volume))


def erase_key(d: ManagingDriver, rec: DiskRecord) -> None:
    """After `rec`'s volume is removed (or was never made): its key's secret undefined."""
    if rec.encryption is not None:
        keys.erase(encrypts_of(d).secrets(), rec)
