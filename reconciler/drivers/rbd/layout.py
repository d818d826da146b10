"""The objects of the RADOS record store, their names and stored formats: the only code
that knows how a record and an index entry are laid out (drivers/rbd/records.py is the
store that reads and writes them; a heartbeat's value is drivers/rbd/hosts.py's).

Objects (all in namespace `reconciler` of the pool unless configured otherwise):

- `store`: omap `format`, `id` (a UUID: the store's identity) and `shards` (how many index
  shards each host has). Created exclusively by the first host that opens the namespace;
  every later host reads it, so all hosts agree on the shard count.
- `hosts`: omap, one key per host that has ever created a record (value: when it first
  did). Only `references()` reads it, to find every host's index (drivers/rbd/hosts.py).
- `heartbeats`: omap, one key per process (`<host> <client address>`), its last beat
  (drivers/rbd/hosts.py).
- `rec.<sha256 of [pool, volume], 32 hex>`: one per disk (or cache entry). Data: the
  stored format, `{"format": 1, "host": H, "record": {DiskRecord}}` (`encode`/`decode` are
  the only code that knows it). Omap: `generation`, `host` and `instance`, copies of the
  record's fields that the compare-and-swap compares, and a cache entry's references
  (`ref.<volume>`). The name is derived from the key, so a host reads its records by name
  and never lists the pool; a record whose contents name another key is a RecordError (a
  copied or misplaced object is never taken for this disk).
- `host.<host>.<shard>`: omap, the index of what one host owns; shard = sha256(instance)
  mod `shards` (16 by default: 200,000 keys, Ceph's large-omap warning, is then 3 million
  disks per host). Key: the record's object name; value: JSON with the instance, pool,
  volume, when the entry was written and a random nonce (IndexEntry). Cache entries, every
  host's, are in the one shard of host SHARED (drivers/rbd/index.py).
- `inst.<sha256 of instance, 32 hex>`: omap `host`, `instance`: which host owns all of an
  instance's disks (drivers/rbd/claims.py).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from reconciler.drivers.host.decode import record_from_value
from reconciler.model.errors import RecordError
from reconciler.model.record import DiskRecord
from reconciler.schema.bounded import load_json

FORMAT = 1
DEFAULT_SHARDS = 16
MAX_RECORD = 64 << 10  # bytes read per record; `put` refuses anything larger
STORE_OBJECT = "store"
HOSTS_OBJECT = "hosts"
HEARTBEATS_OBJECT = "heartbeats"
# An owner name no host identity can take (RELEASED, in store.py, is the other): cache
# entries are every host's, each clones from and references them (generation CAS only).
SHARED = "@shared"
REF_PREFIX = "ref."  # a cache entry's references: omap keys of its record object


# -- names ------------------------------------------------------------------------------


def record_object(pool: str, volume: str) -> str:
    """The record's object name, derived from its key (a JSON list: unambiguous)."""
    digest = hashlib.sha256(json.dumps([pool, volume]).encode()).hexdigest()
    return f"rec.{digest[:32]}"


def claim_object(instance: str) -> str:
    """The instance's claim: which host owns all of its disks."""
    return f"inst.{hashlib.sha256(instance.encode()).hexdigest()[:32]}"


def shard_of(instance: str, shards: int) -> int:
    """The index shard of an instance: stable across hosts, runs and Python versions."""
    return int.from_bytes(hashlib.sha256(instance.encode()).digest()[:8], "big") % shards


def index_object(host: str, shard: int) -> str:
    return f"host.{host}.{shard}"


# -- the stored format (the only code that knows it) ------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    host: str
    record: DiskRecord


def encode(record: DiskRecord, host: str) -> bytes:
    doc = {"format": FORMAT, "host": host, "record": record.model_dump(mode="json")}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(oid: str, data: bytes, where: str) -> Stored:
    """The record in object `oid`; RecordError if unreadable or if it names another key."""
    try:
        doc = load_json(data, what="its JSON")
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise RecordError(f"record object {oid} in {where} is not JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise RecordError(
            f"record object {oid} in {where} has stored format {doc.get('format')!r}, this "
            f"reconciler knows {FORMAT}: use a reconciler that knows it"
        )
    host = doc.get("host")
    if not isinstance(host, str) or not host:
        raise RecordError(f"record object {oid} in {where} names no owner host")

    def misplaced(rec: DiskRecord) -> str | None:
        if record_object(rec.pool, rec.volume) == oid:
            return None
        return (
            f"record object {oid} in {where} describes {rec.pool}/{rec.volume}, whose record "
            f"is {record_object(rec.pool, rec.volume)}: it was copied or misplaced"
        )

    # Any client with the pool's caps can write this object: it is input (decode.py).
    return Stored(
        host, record_from_value(doc.get("record"), f"record object {oid} in {where}", misplaced)
    )


@dataclass(frozen=True, slots=True)
class Beat:
    host: str
    at: float
    addr: str


@dataclass(frozen=True, slots=True)
class IndexEntry:
    instance: str
    pool: str
    volume: str
    at: float  # time.time() when written, for the stale-entry grace
    raw: str  # the stored value, for omap_cmp when removing it

    @classmethod
    def new(cls, record: DiskRecord) -> IndexEntry:
        at = time.time()
        doc = {
            "instance": record.instance,
            "pool": record.pool,
            "volume": record.volume,
            "at": at,
            "nonce": secrets.token_hex(8),  # a rewrite of the entry always changes it
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return cls(record.instance, record.pool, record.volume, at, raw)

    @classmethod
    def parse(cls, raw: bytes) -> IndexEntry | None:
        try:
            text = raw.decode()
            doc = load_json(text, what="the entry")
            return cls(
                str(doc["instance"]), str(doc["pool"]), str(doc["volume"]), float(doc["at"]), text
            )
        except (ValueError, KeyError, TypeError):
            return None
