"""The host database's judged rows (drivers/host/checked.py): a row is judged again
whenever a byte of it changed, and a file others could write, or other code wrote, is
not used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.drivers.host import checked, store
from reconciler.drivers.host.store import SqliteRecordStore, open_store
from reconciler.model.naming import volume_name
from reconciler.model.record import DiskRecord
from tests.helpers import blank_raw_record

INSTANCE = "00000000-0000-0000-0000-000000000001"


def record(disk: str) -> DiskRecord:
    return blank_raw_record(INSTANCE, disk)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SqliteRecordStore:
    monkeypatch.setattr(store, "MIN_ROWS", 3)
    s = open_store(tmp_path / "state")
    for disk in ("a", "b", "c"):
        s.put(record(disk), None)
    return s


@pytest.fixture
def judged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rows load_all judges (rather than only parses)."""
    got: list[str] = []
    real = store._parse

    def counting(pool: str, volume: str, data: str) -> DiskRecord:
        got.append(volume)
        return real(pool, volume, data)

    monkeypatch.setattr(store, "_parse", counting)
    return got


def test_only_changed_rows_are_judged_again(db: SqliteRecordStore, judged: list[str]) -> None:
    path = db.path.parent / checked.NAME
    good, bad = db.load_all()
    assert len(good) == 3 and bad == [] and len(judged) == 3 and path.is_file()
    judged.clear()
    again, bad = db.load_all()
    assert again == good and bad == [] and judged == []
    # A row changed by hand: its record describes another volume. Judged, and refused.
    vol_a = volume_name(INSTANCE, "a")
    moved = record("b").model_dump_json()
    db.put_raw("local", vol_a, 1, moved, INSTANCE)
    good, bad = db.load_all()
    assert judged == [vol_a] and [b.volume for b in bad] == [vol_a] and len(good) == 2
    judged.clear()
    good, bad = db.load_all()  # a refused row is never taken for judged
    assert judged == [vol_a] and [b.volume for b in bad] == [vol_a]
    # One byte changed: a record that checks would refuse (a backing that is a path).
    rec = record("a").model_copy(update={"backing": "../etc/passwd"})
    db.put_raw("local", vol_a, 1, rec.model_dump_json(), INSTANCE)
    judged.clear()
    good, bad = db.load_all()
    assert judged == [vol_a] and [b.volume for b in bad] == [vol_a]


def test_a_file_others_can_write_or_other_code_wrote_is_not_used(
    db: SqliteRecordStore, judged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = db.path.parent / checked.NAME
    db.load_all()
    os.chmod(path, 0o620)
    judged.clear()
    db.load_all()
    assert len(judged) == 3
    os.chmod(path, 0o600)
    judged.clear()
    db.load_all()
    assert judged == []
    monkeypatch.setattr(checked, "_fingerprint", lambda: b"\0" * checked.DIGEST)
    db.load_all()
    assert len(judged) == 3  # judged by other code: again, and kept under the new code
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # damaged
    judged.clear()
    db.load_all()
    assert len(judged) == 3


def test_a_small_store_keeps_no_file(tmp_path: Path) -> None:
    s = open_store(tmp_path / "state")
    s.put(record("a"), None)
    assert len(s.load_all()[0]) == 1
    assert not (tmp_path / "state" / checked.NAME).exists()
