"""Decoding a stored record: the one way both record stores turn what they stored into a
DiskRecord (the host's SQLite store, drivers/host/store.py; the RADOS store,
drivers/rbd/records.py).

Whatever else can write a store (anything with write access to the database file, any
client with the Ceph pool's caps) writes input (DESIGN invariant 8), so a decoded record
is 1. validated by pydantic, every failure one RecordError naming the field; 2. checked to
be stored where it belongs (the store says how: a row's key, an object's derived name), so
a copied or misplaced record is never taken for another disk; 3. checked as any record is
(schema/recordcheck.py). A record that fails any of them is an error, never guessed
around.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from reconciler.model.errors import RecordError
from reconciler.model.record import DiskRecord
from reconciler.schema.bounded import UnsafeInput, check_json
from reconciler.schema.recordcheck import check_record

# Given the decoded record: why it is not the one stored here (None: it is).
Misplaced = Callable[[DiskRecord], str | None]


def record_from_json(text: str, what: str, misplaced: Misplaced) -> DiskRecord:
    """The record in JSON text (bounded before pydantic parses it); RecordError
    "WHAT is unreadable (...)" if it is not one."""
    try:
        rec = DiskRecord.model_validate_json(check_json(text, what="its JSON"))
    except UnsafeInput as e:
        raise RecordError(f"{what} is unreadable ({e})") from None
    except ValidationError as e:
        raise _unreadable(what, e) from None
    return _placed(rec, misplaced)


def record_from_value(value: Any, what: str, misplaced: Misplaced) -> DiskRecord:
    """The record in an already parsed JSON value (a field of a larger stored document)."""
    try:
        rec = DiskRecord.model_validate(value)
    except ValidationError as e:
        raise _unreadable(what, e) from None
    return _placed(rec, misplaced)


def _unreadable(what: str, e: ValidationError) -> RecordError:
    first = e.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return RecordError(f"{what} is unreadable ({field}: {first['msg']})")


def _placed(rec: DiskRecord, misplaced: Misplaced) -> DiskRecord:
    why = misplaced(rec)
    if why is not None:
        raise RecordError(why)
    check_record(rec, rec.pool, rec.volume)
    return rec
