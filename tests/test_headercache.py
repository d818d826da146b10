"""The header cache (drivers/file/headercache.py): a header is read again whenever the file
may have changed, a cache another user could write is not read, and damaged entries are
never used; the migration facts reuse check_headers' lstats."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from reconciler.drivers.file import headercache
from reconciler.drivers.file import pool as file_pool
from reconciler.drivers.file.headercache import HeaderCache
from reconciler.drivers.file.pool import FilePoolDriver
from reconciler.drivers.file.volumes import PoolInfo
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.ingest.headers import file_header
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord
from reconciler.schema.config import PoolConfig
from tests.helpers import blank_raw_record

INSTANCE = "00000000-0000-0000-0000-000000000001"
QCOW2_HEADER = b"QFI\xfb\x00\x00\x00\x03" + b"\x00" * 96


def raw_record(disk: str) -> DiskRecord:
    return blank_raw_record(INSTANCE, disk)


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file made by the test counts as old enough to be cached (SAFE_AGE_NS)."""
    now = time.time_ns() + 10 * headercache.SAFE_AGE_NS
    monkeypatch.setattr(time, "time_ns", lambda: now)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The volumes whose header check_headers reads."""
    got: list[str] = []
    real = file_header

    def counting(path: str) -> tuple[str, os.stat_result | None]:
        got.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(file_pool, "file_header", counting)
    return got


def driver(tmp_path: Path) -> FilePoolDriver:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir(exist_ok=True)
    state = tmp_path / "state"
    config = PoolConfig.model_validate(
        {"uri": "test:///default", "libvirtPool": "local", "backends": ["flat"]}
    )
    drv = FilePoolDriver(
        "local", config, Connections(), header_cache=headercache.cache_path(state, "local")
    )
    drv.vols._info = PoolInfo("dir", str(pool_dir))
    return drv


def check(drv: FilePoolDriver, records: list[DiskRecord]) -> dict[str, str]:
    seen = frozenset(os.listdir(drv.vols._info.path))  # type: ignore[union-attr]
    observed = drv.check_headers(ObservedPool("local", seen), records)
    return dict(observed.header_formats)


def test_a_header_is_read_again_once_the_file_changed(
    tmp_path: Path, later: None, reads: list[str]
) -> None:
    drv = driver(tmp_path)
    recs = [raw_record("a"), raw_record("b")]
    for r in recs:
        with open(tmp_path / "pool" / r.volume, "wb") as f:
            f.truncate(1 << 20)
    assert check(drv, recs) == {} and len(reads) == 2
    reads.clear()
    assert check(drv, recs) == {} and reads == []  # unchanged: nothing read
    # A guest writes a qcow2 header into the raw disk: its times change, so it is read.
    with open(tmp_path / "pool" / recs[0].volume, "r+b") as f:
        f.write(QCOW2_HEADER)
    assert check(drv, recs) == {recs[0].volume: "qcow2"} and reads == [recs[0].volume]
    reads.clear()
    assert check(drv, recs) == {recs[0].volume: "qcow2"} and reads == []
    # Even a write that puts the mtime back changes the ctime.
    path = tmp_path / "pool" / recs[1].volume
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(QCOW2_HEADER)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check(drv, recs)[recs[1].volume] == "qcow2" and reads == [recs[1].volume]


def test_a_file_swapped_for_a_link_is_read_again(
    tmp_path: Path, later: None, reads: list[str]
) -> None:
    drv = driver(tmp_path)
    rec = raw_record("a")
    vol = tmp_path / "pool" / rec.volume
    vol.write_bytes(b"\0" * 4096)
    assert check(drv, [rec]) == {}
    other = tmp_path / "elsewhere"
    os.rename(vol, other)
    vol.symlink_to(other)  # the same file (inode, times) behind a link
    reads.clear()
    assert check(drv, [rec]) == {rec.volume: "symlink"} and reads == [rec.volume]


def test_a_new_file_is_not_kept(tmp_path: Path, reads: list[str]) -> None:
    """A file changed within SAFE_AGE_NS of its read could change again unseen."""
    drv = driver(tmp_path)
    rec = raw_record("a")
    (tmp_path / "pool" / rec.volume).write_bytes(b"\0" * 4096)
    check(drv, [rec])
    check(drv, [rec])
    assert reads == [rec.volume, rec.volume]


def test_a_cache_others_can_write_or_a_damaged_one_is_not_used(
    tmp_path: Path, later: None, reads: list[str]
) -> None:
    drv = driver(tmp_path)
    rec = raw_record("a")
    (tmp_path / "pool" / rec.volume).write_bytes(QCOW2_HEADER)
    assert check(drv, [rec]) == {rec.volume: "qcow2"}
    assert drv.header_cache is not None
    path = drv.header_cache
    doc = json.loads(path.read_text())
    assert doc["entries"][rec.volume][5] == "qcow2"
    # Someone else could have written it: not read (the header is read again).
    doc["entries"][rec.volume][5] = "raw"
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o666)
    reads.clear()
    assert check(drv, [rec]) == {rec.volume: "qcow2"} and reads == [rec.volume]
    # Entries that are not what the cache writes are not used.
    for bad in ([1, 2, 3], [*doc["entries"][rec.volume][:5], "no-such-format"], "x", None):
        doc["entries"][rec.volume] = bad
        path.unlink()
        path.write_text(json.dumps(doc))
        os.chmod(path, 0o600)
        reads.clear()
        assert check(drv, [rec]) == {rec.volume: "qcow2"} and reads == [rec.volume]
    path.write_text("{not json")
    os.chmod(path, 0o600)
    assert HeaderCache(path).entries == {}


def test_migration_facts_use_the_lstats_of_check_headers_once(
    tmp_path: Path, later: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = driver(tmp_path)
    rec = raw_record("a")
    vol = tmp_path / "pool" / rec.volume
    with open(vol, "wb") as f:
        f.write(b"\1" * 8192)
    want = os.lstat(vol).st_blocks * 512
    check(drv, [rec])
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((0,) * 11))
    lstats: list[str] = []
    real = os.lstat

    def counting(p: str) -> os.stat_result:
        lstats.append(str(p))
        return real(p)

    monkeypatch.setattr(os, "lstat", counting)
    assert drv.migration_facts([rec.volume]).allocated == {rec.volume: want}
    assert lstats == []  # check_headers' own
    assert drv.migration_facts([rec.volume]).allocated == {rec.volume: want}
    assert lstats == [str(vol)]  # a later call looks again
