"""An encrypted disk's key around the steps that make and remove its volume (the order is
drivers/host/keys.py's): made and defined as the recorded secret while the driver makes
the volume, undefined once the volume is gone (crypto-erase); and the `restore-key` step,
which defines a lost secret again from the pool's key source.

restore-key, under the volume's lock: the key read from the source by the UUID the record
names (a key that is not 64 lowercase hex is refused), the secret defined in three calls
(host/keys.py: Secrets.define). It changes no record and no volume: a crash leaves the
secret missing or marked unset, which the next plan restores again.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from reconciler.apply.steps.context import Held, StepContext, StepResult
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


def restore_key(ctx: StepContext, h: Held) -> StepResult:
    """A `restore-key`: the lost secret of `h.rec` defined again from the key source."""
    rec = h.rec
    assert rec is not None and rec.encryption is not None
    e = encrypts_of(h.driver)
    keys.restore(e.secrets(), rec, e.key_usage(rec.volume))
    source = e.secrets().source
    assert source is not None  # keys.restore refused otherwise
    return "done", f"libvirt secret {rec.encryption.secret} defined again from the {source.label}"
