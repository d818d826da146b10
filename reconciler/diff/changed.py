"""A recorded disk the manifest still names: resized, replaced, migrated, updated, or redone.

`disk` compares a disk's record with its manifest entry. A record a run left unfinished
comes first: an interrupted create is redone (the partial volume holds no user data), an
interrupted delete is made again from its source. Then a change of backend, pool, format
or source, which cannot be made in place: a migration where a driver can copy the data
(migration.py), else a replace, which destroys the data and needs --allow-replace. Then a
volume gone from its pool (drift: made again). Then the size: grown (a resize, also one a
run left unfinished), never shrunk, and refused for formats that cannot grow. Any other
difference is a record-only update.

Invariants (DESIGN 4, 7): a disk is only changed in place while no running domain uses
it, and only replaced while no domain names it; shrinking is refused; where a disk moves,
the volume at its new location must be the old record's to replace, never a volume
without a record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reconciler.diff import guards, migration, new
from reconciler.diff.draft import Draft, Recorded, retained
from reconciler.diff.render import show_value
from reconciler.model import keying
from reconciler.model.plan import ActionKind
from reconciler.model.record import RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import NOT_RESIZABLE

# Fields whose change cannot be applied to an existing volume in place.
REPLACE_FIELDS = ("backend", "pool", "format", "source")


def disk(draft: Draft, r: Recorded) -> None:
    """A disk recorded in `r.rpool` that the manifest wants in `r.pool`."""
    d, rec = r.d, r.rec
    assert r.pool.volumes is not None
    # Where the disk goes is the old record's to replace, never another owner's volume.
    if r.moved and d.volume in r.pool.volumes:
        guards.unmanaged(
            draft,
            (d.spec.pool, d.volume),
            f"the disk moves to pool {d.spec.pool}, where volume {d.volume} exists but "
            "the reconciler has no record of making it; it is left untouched",
            pool=d.spec.pool,
            volume=d.volume,
            **r.where,
        )
        return
    if rec.state in (RecordState.CREATING, RecordState.DELETING):
        _redo(draft, r)
        return
    if _secret_lost(draft, r):
        return
    fields = [f for f in REPLACE_FIELDS if rec.spec.get(f) != r.spec.get(f)]
    keyed = None
    if rec.spec.get("encryption") is not None or r.spec.get("encryption") is not None:
        # keying.decide is None where neither is encrypted: most disks, not asked.
        keyed = keying.decide(rec.spec, r.spec, _same_keys(r))
    if keyed is not None and (fields or rec.spec.get("encryption") != r.spec.get("encryption")):
        _rekeyed(draft, r, fields, keyed)
        return
    if fields:
        _relayout(draft, r, fields)
        return
    if not r.exists:
        new.drifted(
            draft, r, reason="the volume is missing from the pool (drift); it is made again"
        )
        return
    _resize(draft, r)


def _secret_lost(draft: Draft, r: Recorded) -> bool:
    """A made encrypted disk whose libvirt secret the pool's daemon no longer holds (a
    rebuilt daemon, a secret undefined by hand, a kill between its define and its value):
    no domain could open it. With a key source its secret is defined again (`restore-key`,
    the volume untouched); else it is an error: only that secret held the key. Anything
    else the disk needs waits for the next pass, when its key is back."""
    rec = r.rec
    # Only where the disk stays: `key_source` is of the pool the manifest names (a move's
    # key is the migration's to judge, diff/migration.py).
    if rec.encryption is None or not r.exists or rec.state is not RecordState.READY or r.moved:
        return False
    needs = "whether the disk's key secret is defined"
    if guards.incomplete(draft, r.rpool, frozenset({"secrets"}), needs, **r.at):
        return True
    held = r.rpool.secrets
    if held is None or rec.encryption.secret in held:
        return False
    uuid = rec.encryption.secret
    if not r.d.key_source:
        draft.error(
            "key-lost",
            f"libvirt secret {uuid}, the disk's key, is not defined on the pool's daemon and "
            f"pool {rec.pool} has no key source (config `keys`) to define it again from: only "
            "that secret held the key, so no domain can open the disk",
            **r.at,
        )
        return True
    reason = (
        f"libvirt secret {uuid}, the disk's key, is not defined on the pool's daemon; it is "
        f"defined again from pool {rec.pool}'s key source (the disk is not touched)"
    )
    # The record's spec and no patch: the action changes no record and no volume.
    action = r.action(ActionKind.RESTORE_KEY, reason)
    draft.actions.append(dataclasses.replace(action, patch=(), spec=dict(rec.spec)))
    return True


def _same_keys(r: Recorded) -> bool:
    """Whether the disk's pool and the one it goes to share a libvirt daemon and a key
    source (the config's, as apply's drivers see it)."""
    have = r.d.pool_keys
    old, new_ = have.get(r.rec.pool), have.get(r.d.spec.pool)
    return old is not None and old == new_


def _rekeyed(draft: Draft, r: Recorded, fields: list[str], keyed: keying.Keying) -> None:
    """A change of encryption, or a move of an encrypted disk: a migration (keying.py says
    what happens to the key), never a replace, whatever --allow-replace says."""
    rec = r.rec
    what = "; ".join(
        [f"{f} {show_value(f, rec.spec.get(f))} -> {show_value(f, r.spec.get(f))}" for f in fields]
        + (
            [f"encryption {_encryption(rec.spec)} -> {_encryption(r.spec)}"]
            if rec.spec.get("encryption") != r.spec.get("encryption")
            else []
        )
    )
    refusal = None
    if not set(fields) <= migration.MIGRATE_FIELDS:
        refusal = (
            "a new source for an encrypted disk (or one to be encrypted) is a replace, "
            "which is not built for encryption; change the source and the encryption apart"
        )
    elif rec.state is not RecordState.READY:
        refusal = f"the disk's record is {rec.state.value}; it is migrated once it is ready"
    elif rec.encryption is not None and retained(r.spec):
        refusal = (
            "deletionPolicy Retain would keep the old encrypted volume, whose key no "
            "record would name once the disk moves; set deletionPolicy Delete to migrate it"
        )
    elif keying.needs_old_key(keyed) and not _sourced(r, rec.pool):
        refusal = (
            f"the copy reads the disk with its key, which its private libvirt secret never "
            f"gives back; {keying.key_source_needed(rec.pool)}"
        )
    if refusal is not None:
        draft.error(
            "encryption-unsupported",
            f"{what}: {refusal}; the disk is left as it is",
            **r.at,
        )
        return
    migration.migrate(draft, r, what, keyed)


def _sourced(r: Recorded, pool: str) -> bool:
    got = r.d.pool_keys.get(pool)
    return got is not None and got.source is not None


def _encryption(spec: dict[str, Any]) -> str:
    enc = spec.get("encryption")
    return "none" if not isinstance(enc, dict) else str(enc.get("format"))


def _redo(draft: Draft, r: Recorded) -> None:
    """A create or a delete a run left unfinished: the disk is made (again)."""
    rec = r.rec
    # The precondition describes the old location, so a moved action names it.
    old = (rec.pool, rec.volume) if r.moved or r.exists else None
    if rec.state is RecordState.CREATING:
        reason = "an interrupted create is redone (the partial volume holds no user data)"
        new.make(draft, r.d, r.action(ActionKind.CREATE, reason, replaces=old))
        return
    if r.exists and guards.attached(draft, r.rpool, rec.volume, "made again", **r.where):
        return
    draft.warn(
        "interrupted-delete",
        f"volume {rec.volume} was being deleted when a run stopped; it is made "
        "again from its source",
        **r.at,
    )
    reason = "an interrupted delete left the disk unusable; it is made again"
    made = r.action(ActionKind.CREATE, reason, destructive=r.exists, replaces=old)
    new.make(draft, r.d, made)


def _relayout(draft: Draft, r: Recorded, fields: list[str]) -> None:
    """A change of `fields` (of REPLACE_FIELDS): migrated where that keeps the data, else
    replaced where --allow-replace says so."""
    rec = r.rec
    what = "; ".join(
        f"{f} {show_value(f, rec.spec.get(f))} -> {show_value(f, r.spec.get(f))}" for f in fields
    )
    migratable = set(fields) <= migration.MIGRATE_FIELDS and rec.state is RecordState.READY
    if migratable and migration.migrate(draft, r, what):
        return
    if not draft.options.allow_replace:
        draft.error(
            "replace-required",
            f"{what}: this needs the disk deleted and made again, which destroys "
            "its data; re-run with --allow-replace to do that",
            **r.at,
        )
        return
    if r.exists and guards.attached(draft, r.rpool, rec.volume, "replaced", **r.where):
        return
    reason = f"{what}: the disk is deleted and made again"
    replace = r.action(
        ActionKind.REPLACE, reason, destructive=r.exists, replaces=(rec.pool, rec.volume)
    )
    new.make(draft, r.d, replace)


def _resize(draft: Draft, r: Recorded) -> None:
    """Same layout, volume present: grown, refused, or a record-only update."""
    rec = r.rec
    target = r.d.spec.size
    current = rec.virtual_size
    interrupted = rec.state is RecordState.RESIZING
    if interrupted and rec.pending_size is not None:
        # The volume may already have grown before the run stopped.
        current = max(current, rec.pending_size)
    if target < current:
        draft.error(
            "shrink-refused",
            f"size {format_size(target)} is smaller than the disk's {format_size(current)}; "
            "shrinking would cut off data and is refused",
            **r.at,
        )
        return
    if (
        target > current
        and rec.encryption is not None
        and rec.encryption.header is None
        and not _sourced(r, rec.pool)
    ):
        draft.error(
            "resize-unsupported",
            f"size {format_size(current)} -> {format_size(target)}: an encrypted "
            f"{rec.format.value} disk is opened only with its key, which its private libvirt "
            f"secret never gives back; {keying.key_source_needed(rec.pool)}, or keep the "
            f"size at {format_size(current)}",
            **r.at,
        )
        return
    if target > current and rec.format in NOT_RESIZABLE:
        draft.error(
            "resize-unsupported",
            f"size {format_size(current)} -> {format_size(target)}: "
            f"{NOT_RESIZABLE[rec.format]}; make a new disk of the new size (a new disk "
            f"name) and copy the data into it, or keep the size at {format_size(current)}",
            **r.at,
        )
        return
    if target > current or interrupted:
        if guards.attached(draft, r.pool, rec.volume, "resized", running_only=True, **r.where):
            return
        note = " (completing an interrupted resize)" if interrupted else ""
        reason = f"grow {format_size(rec.virtual_size)} -> {format_size(target)}{note}"
        # It grows as it was made (the record's preallocation), whatever the pool says now.
        grow = r.action(ActionKind.RESIZE, reason)
        draft.actions.append(dataclasses.replace(grow, preallocation=rec.preallocation))
        return
    if rec.spec != r.spec:
        reason = "record-only change (no change to the volume)"
        draft.actions.append(r.action(ActionKind.UPDATE, reason))
