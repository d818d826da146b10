"""flows/copy.py's files_equal, which compares a raw file and its raw copy in this process
(a migration between file pools), judges every pair as `qemu-img compare -f raw -F raw`
(without -s) does: data, holes, data in one file's hole, sizes that differ, a file shorter
than it says; and a migration whose copy differs is rolled back, nothing switched."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from reconciler.drivers.flows import copy as flows_copy
from reconciler.drivers.flows.copy import FileSource, files_equal

MiB = 1 << 20


def sparse(path: Path, size: int, runs: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for at, data in runs:
            f.seek(at)
            f.write(data)
    return path


def qemu_equal(a: Path, b: Path) -> bool:
    res = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], check=False
    )
    assert res.returncode in (0, 1), res
    return res.returncode == 0


def ours(a: Path, b: Path, size_a: int | None = None) -> bool:
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_RDONLY)
    try:
        return files_equal(FileSource(fa, "a", size_a), FileSource(fb, "b"))
    finally:
        os.close(fa)
        os.close(fb)


DATA = random.Random(7).randbytes(3 * MiB)
Runs = list[tuple[int, bytes]]
# case: (size of a, its runs), (size of b, its runs)
CASES: dict[str, tuple[tuple[int, Runs], tuple[int, Runs]]] = {
    "same data, same holes": (
        (64 * MiB, [(0, DATA[:MiB]), (40 * MiB + 4096, DATA[MiB:])]),
        (64 * MiB, [(0, DATA[:MiB]), (40 * MiB + 4096, DATA[MiB:])]),
    ),
    "a byte differs": (
        (64 * MiB, [(5 * MiB, DATA)]),
        (64 * MiB, [(5 * MiB, DATA[:-1] + bytes([DATA[-1] ^ 1]))]),
    ),
    "data in the other's hole": (
        (64 * MiB, [(0, DATA)]),
        (64 * MiB, [(0, DATA), (50 * MiB, b"x")]),
    ),
    "zeros written where the other has a hole": (
        (64 * MiB, [(0, DATA)]),
        (64 * MiB, [(0, DATA), (20 * MiB, bytes(2 * MiB))]),
    ),
    "larger copy, zeros past the end": ((16 * MiB, [(MiB, DATA)]), (48 * MiB, [(MiB, DATA)])),
    "larger copy, data past the end": (
        (16 * MiB, [(MiB, DATA)]),
        (48 * MiB, [(MiB, DATA), (40 * MiB, b"y")]),
    ),
    "data not at chunk boundaries": (
        (32 * MiB, [(4096 * 3, DATA), (13 * MiB + 512, DATA[:777])]),
        (32 * MiB, [(4096 * 3, DATA), (13 * MiB + 512, DATA[:777])]),
    ),
    "differs in the last byte": (
        (8 * MiB, [(8 * MiB - 1, b"a")]),
        (8 * MiB, [(8 * MiB - 1, b"b")]),
    ),
    "empty": ((8 * MiB, []), (8 * MiB, [])),
}


@pytest.mark.parametrize("chunk", [flows_copy.CHUNK, 64 * 1024])
@pytest.mark.parametrize("case", list(CASES))
def test_judges_as_qemu_img_compare(
    tmp_path: Path, case: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flows_copy, "CHUNK", chunk)  # many reads per extent, or one
    (size_a, runs_a), (size_b, runs_b) = CASES[case]
    a = sparse(tmp_path / "a", size_a, runs_a)
    b = sparse(tmp_path / "b", size_b, runs_b)
    want = qemu_equal(a, b)
    assert ours(a, b) is want
    assert ours(b, a) is want  # either way round


def test_a_file_shorter_than_its_size_reads_zeros_past_its_end(tmp_path: Path) -> None:
    """As a raw image past its end: a source whose reader says more bytes than the file
    holds compares equal to a copy with zeros there, unequal to one with data there."""
    a = sparse(tmp_path / "a", 8 * MiB, [(0, DATA[:MiB])])
    b = sparse(tmp_path / "b", 16 * MiB, [(0, DATA[:MiB])])
    assert ours(a, b, size_a=16 * MiB)
    sparse(b, 16 * MiB, [(0, DATA[:MiB]), (12 * MiB, b"z")])
    assert not ours(a, b, size_a=16 * MiB)
