"""reconciler/control/writers.py: which files a process holds open for writing, on real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reconciler.control.writers import _scan, held_for_writing


def test_a_file_open_for_writing_is_held_by_the_lease_and_by_proc(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("x")
    assert held_for_writing([str(f)]) == set() == _scan([str(f)])
    with open(f) as _reader:  # readers are no writers
        assert held_for_writing([str(f)]) == set()
    with open(f, "a"):
        assert held_for_writing([str(f)], scan=False) == {str(f)}  # the kernel's answer
        assert _scan([str(f)]) == {str(f)}
    assert held_for_writing([str(f)]) == set()


def test_a_writer_in_another_process_is_seen(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("x")
    code = "import sys; w = open(sys.argv[1], 'a'); print('open', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(f)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        assert held_for_writing([str(f)], scan=False) == {str(f)}
        assert _scan([str(f)]) == {str(f)}
    finally:
        proc.communicate("")
    assert held_for_writing([str(f)]) == set()


def test_a_fifo_and_a_missing_file_are_not_held(tmp_path: Path) -> None:
    fifo = tmp_path / "b.yaml"
    os.mkfifo(fifo)
    # Only regular files are opened for the lease; /proc says no one holds the FIFO.
    assert held_for_writing([str(fifo), str(tmp_path / "gone.yaml")]) == set()
