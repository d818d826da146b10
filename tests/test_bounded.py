"""reconciler/schema/bounded.py: every input read within bounds, refused in one line."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.drivers.file.copies import TRUSTED_XATTR
from reconciler.schema.bounded import (
    UnsafeInput,
    gunzip,
    inflate,
    json_depth,
    load_json,
    open_stream,
    read_regular,
)
from tests.env import Env, disk

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


def _depth(doc: object) -> int:
    if isinstance(doc, list):
        return 1 + max(map(_depth, doc), default=0)
    if isinstance(doc, dict):
        return 1 + max(map(_depth, doc.values()), default=0)
    return 0


@given(JSON)
def test_the_scan_measures_what_the_parser_nests(doc: object) -> None:
    """Brackets inside strings (escaped quotes, backslashes) never count."""
    for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False)):
        assert json_depth(text.encode()) == _depth(doc)
        assert load_json(text, what="x") == doc


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[" * 100_000, "x: JSON nested deeper than 64 levels"),
        (b'{"a":' * 100_000, "x: JSON nested deeper than 64 levels"),
        (b'["' + b'\\"' * 1_000_000, "x:1:2: not valid JSON: Unterminated string"),
        ('{"a": "é"}'.encode("latin-1"), "x: not UTF-8 text (byte 7 is 0xe9)"),
        ('{"a": 1}'.encode("utf-16"), "x: not UTF-8 text (byte 0 is 0xff)"),
        (b"{not json", "x:1:2: not valid JSON: Expecting property name enclosed in double"),
    ],
    ids=["deep-list", "deep-object", "unterminated", "latin-1", "utf-16", "malformed"],
)
def test_bad_json_is_one_line_and_never_recursion(data: bytes, message: str) -> None:
    with pytest.raises(UnsafeInput) as e:
        load_json(data, what="x")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # what callers of json.loads already catch


def test_json_over_its_byte_limit_is_refused() -> None:
    with pytest.raises(UnsafeInput, match="x: 9 bytes of JSON, more than the 8 allowed"):
        load_json(b"[1,2,3,4]", what="x", max_bytes=8)


def test_a_caller_may_bound_values_and_refuse_duplicate_keys_and_nan() -> None:
    """Off unless asked for (a record copy is read as json reads it); on, each one line."""
    strict = {"unique_keys": True, "finite": True}
    assert load_json(b'[1, 2, "3,4,[{"]', what="x", max_values=4) == [1, 2, "3,4,[{"]
    with pytest.raises(UnsafeInput, match=r"^x: JSON of more than 3 values$"):
        load_json(b'[1, 2, "3,4,[{"]', what="x", max_values=3)
    assert load_json(b'{"a": 1, "a": 2}', what="x") == {"a": 2}
    with pytest.raises(UnsafeInput, match=r'^x: not valid JSON: duplicate key "\\u001b\]0;"$'):
        load_json(b'{"\\u001b]0;": 1, "\\u001b]0;": 2}', what="x", **strict)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        assert load_json(b"[%s]" % constant, what="x") != []
        with pytest.raises(UnsafeInput, match=rf"^x: not valid JSON: {constant.decode()} is not"):
            load_json(b"[%s]" % constant, what="x", **strict)
    assert load_json(b'{"a": [1.5, {"b": null}]}', what="x", **strict) == {"a": [1.5, {"b": None}]}


def test_gzip_is_inflated_to_its_limit_and_no_further() -> None:
    bomb = gzip.compress(bytes(64 << 20), 9)  # 64 KiB that would be 64 MiB
    with pytest.raises(UnsafeInput, match="b: inflates to more than 1048576 bytes"):
        gunzip(bomb, what="b", max_bytes=1 << 20)
    two = gzip.compress(b"ab") + gzip.compress(b"cd")
    assert gunzip(two, what="m", max_bytes=4) == b"abcd"
    for bad in (b"\x1f\x8b\x08\x00truncated", gzip.compress(b"abc")[:-3], two + b"junk"):
        with pytest.raises(UnsafeInput, match="t: not a readable gzip file"):
            gunzip(bad, what="t", max_bytes=100)
    with pytest.raises(UnsafeInput, match="z: inflates to more than 1024 bytes"):
        inflate(zlib.compress(bytes(1 << 20)), what="z", max_bytes=1024)
    with pytest.raises(UnsafeInput, match="z: not readable zlib data"):
        inflate(zlib.compress(b"abc")[:-2], what="z", max_bytes=1024)


def _refusals(tmp_path: Path, call: str, names: tuple[str, ...]) -> list[str]:
    """The UnsafeInput of `call` (on `path`, `what` = `name`) for each name (under
    tmp_path unless absolute), one line each, from a child process: a hang is the
    timeout's error."""
    script = f"""
from reconciler.schema.bounded import UnsafeInput, open_stream, read_regular
for name in {names!r}:
    path = name if name.startswith("/") else {str(tmp_path)!r} + "/" + name
    try:
        {call}
    except UnsafeInput as e:
        print(e)
"""
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return res.stdout.splitlines()


def test_only_regular_files_are_read_and_nothing_blocks(tmp_path: Path) -> None:
    """A FIFO, a device, a directory and (unless followed) a symbolic link are refused at
    once; a file over the limit too. A child process, so a hang is the timeout's error."""
    good = tmp_path / "good"
    good.write_bytes(b"12345")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(good)
    (tmp_path / "fifolink").symlink_to(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 100)
    (tmp_path / "dir").mkdir()
    names = ("fifo", "link", "fifolink", "/dev/zero", "dir", "big")
    assert _refusals(tmp_path, "read_regular(path, what=name, max_bytes=10)", names) == [
        "fifo: is a FIFO, not a regular file; not read",
        "link: is a symbolic link, not a regular file; not read",
        "fifolink: is a symbolic link, not a regular file; not read",
        "/dev/zero: is a character device, not a regular file; not read",
        "dir: is a directory, not a regular file; not read",
        "big: 100 bytes, more than the 10 allowed",
    ]
    assert read_regular(str(good), what="g", max_bytes=5) == b"12345"
    assert read_regular(str(tmp_path / "link"), what="l", max_bytes=5, follow_symlinks=True)
    with pytest.raises(FileNotFoundError):
        read_regular(str(tmp_path / "missing"), what="m", max_bytes=5)


def test_a_stream_is_only_of_a_regular_file_and_has_no_limit(tmp_path: Path) -> None:
    """open_stream (a file:// image) refuses a FIFO, a device and a directory at once, as
    read_regular does, follows a link only if told to, and streams a regular file to its
    end whatever its size. A child process, so a hang is the timeout's error."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(big)
    names = ("fifo", "/dev/zero", "dir", "link")
    assert _refusals(tmp_path, "open_stream(path, what=name).close()", names) == [
        "fifo: is a FIFO, not a regular file; not read",
        "/dev/zero: is a character device, not a regular file; not read",
        "dir: is a directory, not a regular file; not read",
        "link: is a symbolic link, not a regular file; not read",
    ]
    with open_stream(str(big), what="big") as f:
        assert f.read() == big.read_bytes()
    with open_stream(str(tmp_path / "link"), what="l", follow_symlinks=True) as f:
        assert f.read() == big.read_bytes()


@pytest.mark.parametrize("swap", ["file", "link"])
def test_without_proc_a_name_swapped_after_the_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """Where /proc is missing the checked file is opened again by name; if another file
    or a symbolic link was put under the name in between, nothing is read."""
    good = tmp_path / "good"
    good.write_bytes(b"checked")
    other = tmp_path / "other"
    other.write_bytes(b"swapped")
    real_open = os.open

    def no_proc(path: str, flags: int, *args: int) -> int:
        if str(path).startswith("/proc/self/fd/"):
            if swap == "file":
                os.replace(other, good)
            else:
                good.unlink()
                good.symlink_to(other)
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_proc)
    why = {
        "file": "g: replaced by another file while it was opened; run again",
        "link": "g: replaced by a symbolic link while it was opened; not read",
    }[swap]
    with pytest.raises(UnsafeInput, match=f"^{why}$"):
        read_regular(str(good), what="g", max_bytes=100)


@pytest.mark.libvirtd
def test_records_nested_absurdly_are_one_line_not_recursion(env: Env) -> None:
    """A record copy on a volume and a row of the records database, each JSON nested
    thousands deep: the copy is reported and skipped by a rebuild, the row is that disk's
    plan error; neither ends in a RecursionError."""
    a = env.manifest("a", [disk("disk", size="16MiB")])
    b = env.manifest("b", [disk("disk", size="16MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    deep = "[" * 1500  # deeper than json's recursion limit; within an xattr's size
    os.setxattr(env.volume(a, "disk"), TRUSTED_XATTR, deep.encode(), follow_symlinks=False)
    db = sqlite3.connect(env.root / "state" / "records.sqlite")
    with db:
        db.execute("UPDATE records SET data=? WHERE volume=?", (deep, f"{b}_disk"))
    db.close()

    rc, out, err = env.run("--dry-run")
    assert "Traceback" not in err and "RecursionError" not in out + err
    assert f"record for local/{b}_disk is unreadable (its JSON: JSON nested deeper than 64" in (
        out + err
    )

    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()
    rc, out, err = env.main(
        ["records", "rebuild", "local", "--dry-run", "--config", str(env.config_path)]
    )
    assert "Traceback" not in err and "RecursionError" not in out + err
    assert f"{a}_disk" in out + err
    assert "the copy: JSON nested deeper than 64 levels" in out + err, out + err
