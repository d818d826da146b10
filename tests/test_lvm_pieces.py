"""An LV's bytes as pieces (drivers/lvm/tools.py): reads and writes within one piece and
across pieces, runs of zeros, and raw_copy into a sink that is not zeroed. The pieces are
ranges of a regular file (BLKZEROOUT fails there, so zeros are written as bytes): no LVM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.drivers.flows.copy import CHUNK, raw_copy
from reconciler.drivers.lvm.tools import Piece, PiecesSink, PiecesSource, pieces_reader, read_all


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    n = os.open(tmp_path / "pv", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield n
    finally:
        os.close(n)


def _noise(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))  # no zero byte


def test_reads_within_and_across_pieces(fd: int) -> None:
    os.pwrite(fd, _noise(4096), 0)
    # The LV's bytes: file bytes 1000..1999, then 3000..3499, then 100..299.
    pieces = [Piece(fd, 1000, 1000), Piece(fd, 3000, 500), Piece(fd, 100, 200)]
    lv = read_all(pieces)
    assert len(lv) == 1700
    read = pieces_reader(pieces)
    for pos, n in [(0, 1000), (10, 20), (1000, 500), (990, 20), (900, 800), (1499, 2), (0, 1700)]:
        assert read(pos, n) == lv[pos : pos + n], (pos, n)


def test_writes_zeros_and_data_across_pieces(fd: int) -> None:
    os.pwrite(fd, b"\xff" * 4096, 0)  # an earlier tenant's bytes
    pieces = [Piece(fd, 2000, 700), Piece(fd, 100, 300)]
    sink = PiecesSink(pieces, "lv")
    data = _noise(250) + bytes(500) + _noise(250, 2)
    sink.write(data, 0)
    sink.finish()
    assert read_all(pieces) == data
    assert os.pread(fd, 100, 0) == b"\xff" * 100  # nothing outside the pieces
    sink.write(bytes(300), 700)  # a run of zeros that is one whole piece
    assert read_all(pieces) == data[:700] + bytes(300)


def test_raw_copy_into_pieces_writes_zeros_past_the_source(fd: int) -> None:
    size = CHUNK + 12345
    src_bytes = _noise(size)
    os.pwrite(fd, src_bytes, 0)
    room = 3 * CHUNK + 4096  # the copy's LV, in two pieces, holding old bytes
    at = 4 * CHUNK
    os.pwrite(fd, b"\xee" * room, at)
    dst = [Piece(fd, at + CHUNK + 4096, 2 * CHUNK), Piece(fd, at, CHUNK + 4096)]
    raw_copy(PiecesSource([Piece(fd, 0, size)], "entry", size), PiecesSink(dst, "disk"))
    assert read_all(dst) == src_bytes + bytes(room - size)
