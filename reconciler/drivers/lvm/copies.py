"""Each LV's copy of its record, as LVM tags, for `records rebuild`.

`reconciler.copy.I.N:CHUNK` is a copy of the LV's record (zlib-compressed JSON, base64,
split in N tags of at most COPY_CHUNK characters: tags allow only [A-Za-z0-9_+.-/=!:&#],
which base64 fits); written after the record is, in one `lvchange`. Who can write them:
only root on this host (the VG's metadata; a guest writes only an LV's bytes, and a VG here
is local to its host). So the copies are trusted by where they are, not sealed; each is
still checked as input (schema/recordcheck.py) before rebuild restores it, and rebuild
refuses any that would make the next plan destroy something. The store stays the truth: a
copy that cannot be written only costs `records rebuild` that LV (logged, never fatal).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence

from reconciler.drivers.api import NoCopy, RecordCopies
from reconciler.drivers.lvm.volumes import Lvs
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.bounded import check_json, inflate
from reconciler.util.logs import get_logger

log = get_logger(__name__)

COPY_PREFIX = "reconciler.copy."
COPY_CHUNK = 960  # characters of a record copy per tag (LVM tags: up to 1024)
MAX_COPY_BYTES = 1 << 20  # a record copy inflated (a record is about 1 KiB)


def encode_copy(rec: DiskRecord) -> list[str]:
    """A record as LV tags: compressed JSON in base64, in numbered chunks."""
    data = base64.b64encode(zlib.compress(rec.model_dump_json().encode(), 9)).decode()
    chunks = [data[i : i + COPY_CHUNK] for i in range(0, len(data), COPY_CHUNK)]
    return [f"{COPY_PREFIX}{i}.{len(chunks)}:{c}" for i, c in enumerate(chunks)]


def decode_copy(tags: Sequence[str]) -> DiskRecord | None:
    """The record the tags carry (None: no copy); ValueError if it is damaged."""
    parts: dict[int, str] = {}
    counts: set[int] = set()
    for t in tags:
        if not t.startswith(COPY_PREFIX):
            continue
        head, _, chunk = t[len(COPY_PREFIX) :].partition(":")
        i, _, n = head.partition(".")
        if not (i.isdigit() and n.isdigit()):
            raise ValueError(f"tag {t[:40]!r} is not a record copy chunk")
        parts[int(i)] = chunk
        counts.add(int(n))
    if not parts:
        return None
    if len(counts) != 1 or sorted(parts) != list(range(counts.pop())):
        raise ValueError("its chunks are incomplete or from two copies")
    packed = base64.b64decode("".join(parts[i] for i in sorted(parts)))
    raw = inflate(packed, what="the copy", max_bytes=MAX_COPY_BYTES)
    return DiskRecord.model_validate_json(check_json(raw, what="the copy"))


def _copy_in(tags: Sequence[str]) -> DiskRecord:
    """The record copy an LV's tags carry; NoCopy if none, or a damaged one."""
    try:
        rec = decode_copy(tags)
    except (ValueError, zlib.error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NoCopy(f"its record copy is unreadable ({why})") from None
    if rec is None:
        raise NoCopy("no record copy")
    return rec


def keep(lvs: Lvs, rec: DiskRecord) -> None:
    """Replace the LV's record copy (tags) in one `lvchange`. The store stays the
    truth: a copy that cannot be written only costs `records rebuild` that LV."""
    try:
        old = lvs.known_tags(rec.volume)
        if old is None:
            old = lvs.lvm.lv_tags(rec.volume).get(rec.volume, [])
        new = encode_copy(rec)
        args = [
            a for t in old if t.startswith(COPY_PREFIX) and t not in new for a in ("--deltag", t)
        ]
        args += [a for t in new if t not in old for a in ("--addtag", t)]
        if args:
            lvs.lvm.run("lvchange", *args, f"{lvs.vg}/{rec.volume}", lv=rec.volume)
        kept = [t for t in old if not t.startswith(COPY_PREFIX)]
        lvs.note(rec.volume, True, kept + new)
    except (OSError, ReconcileError) as e:
        log.warning("record_copy.failed", pool=lvs.name, volume=rec.volume, error=str(e))


def read_all(lvs: Lvs) -> RecordCopies:
    """The record copies every LV of the VG carries, each checked as input."""
    tags = lvs.lvm.lv_tags()
    return RecordCopies.read(lvs.name, sorted(tags), lambda lv: _copy_in(tags[lv]))
