"""Plans made far from the host, from a state `reconcile observe` exported on it."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.model.naming import volume_name
from reconciler.schema.exported import MAX_STATE_BYTES
from tests.conftest import own_daemon_pool
from tests.env import ROOT, Env, disk

pytestmark = pytest.mark.libvirtd

SCRIPT = str(ROOT / "scripts" / "libvirtd.sh")


@pytest.fixture
def own(tmp_path: Path) -> Iterator[tuple[Env, str]]:
    """An Env on a private daemon of its own (the tests stop it): (env, daemon dir)."""
    with own_daemon_pool(tmp_path, "obs") as (d, uri, path):
        env = Env(tmp_path / "env", uri, {"local": ("obs", path)})
        env.write_config()
        yield env, d


def _observe(env: Env, out: Path) -> None:
    rc, stdout, err = env.main(["observe", "--config", str(env.config_path), "--out", str(out)])
    assert rc == 0, stdout + err


def test_a_plan_from_the_exported_state_is_the_hosts_byte_for_byte(
    own: tuple[Env, str], tmp_path: Path
) -> None:
    env, d = own
    a = env.manifest("a", [disk("disk", size="32MiB"), disk("eph", size="16MiB", template="ext4")])
    b = env.manifest("b", [disk("disk", size="16MiB", template="swap")])

    def empty() -> None:
        pass

    def converged() -> None:
        rc, out, err = env.run()
        assert rc == 0, out + err

    def drifted() -> None:
        conn = libvirt.open(env.uri)
        try:
            pool = conn.storagePoolLookupByName("obs")
            pool.refresh(0)
            pool.storageVolLookupByName(volume_name(b, "disk")).delete(0)
        finally:
            conn.close()
        (env.pool_dir() / "stranger.img").write_bytes(b"x")
        env.manifest("a", [disk("disk", size="64MiB"), disk("eph", size="16MiB", template="ext4")])

    def refused() -> None:
        env.manifest("a", [disk("disk", size="16MiB"), disk("eph", size="16MiB", template="ext4")])

    for name, make in (
        ("empty", empty),
        ("converged", converged),
        ("drifted", drifted),
        ("refused", refused),
    ):
        make()
        state = tmp_path / f"{name}.json.gz"
        _observe(env, state)
        rc, live, err = env.run("--dry-run", "--output", "json")
        assert rc in (0, 1), err
        subprocess.run([SCRIPT, "stop", d], check=True)  # nothing can be reached now
        try:
            rc2, offline, err2 = env.run("--dry-run", "--output", "json", "--observed", str(state))
            assert rc2 == rc, err2
            assert offline == live, name
            assert f"observed state {state}" in err2
            rc3, md, _ = env.run("--dry-run", "--output", "markdown", "--observed", str(state))
            assert rc3 == rc and md.startswith("### reconcile plan")
        finally:
            subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
        if name == "refused":
            codes = [e["code"] for e in json.loads(offline)["errors"]]
            assert "shrink-refused" in codes
    assert a  # the instances exist in every state above


def test_planning_from_a_state_opens_no_connection(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.manifest("n", [disk("disk", size="16MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    state = tmp_path / "state.json"
    _observe(env, state)
    # The config now names sockets that do not exist, and libvirt may not be opened at all.
    env.uri = "qemu+unix:///system?socket=/nonexistent/reconciler/sock"
    env.write_config()

    def refuse(*_: Any) -> None:
        raise AssertionError("a connection was opened")

    monkeypatch.setattr(libvirt, "open", refuse)
    monkeypatch.setattr(libvirt, "openReadOnly", refuse)
    rc, out, err = env.run("--dry-run", "--detailed-exitcode", "--observed", str(state))
    assert rc == 0, out + err
    assert "No changes." in out and f"# Planned against the observed state {state}" in out
    assert not (env.root / "state2").exists()
    # Applying from an exported state is refused: a plan to apply is made on the host.
    for args in ((), ("--dry-run", "--plan-out", str(tmp_path / "p.json"))):
        rc, out, err = env.run(*args, "--observed", str(state))
        assert rc == 1 and "a plan to apply is made on the host" in err


def test_no_secret_from_the_config_reaches_a_state_file(env: Env, tmp_path: Path) -> None:
    env.uris["far"] = "qemu+unix://admin:hunter2@/system?socket=/nonexistent/s&password=pw1"
    env.pools["far"] = ("nope", tmp_path / "nope")
    env.libvirt = {"reconnectTimeout": 1}
    env.images = {
        "img": {
            "location": "https://user:s3cret@images.invalid/img.raw?token=tok9&v=1",
            "format": "raw",
            "sha256": "0" * 64,
            "size": 512,
        }
    }
    env.write_config()
    state = tmp_path / "state.json"
    _observe(env, state)
    text = state.read_text()
    for secret in ("hunter2", "s3cret", "tok9", "pw1", "admin", "user:"):
        assert secret not in text, secret
    doc = json.loads(text)
    assert doc["config"]["images"]["img"]["location"].startswith("https://<redacted>@images")
    assert doc["pools"]["far"]["volumes"] is None  # unreachable, and said so
    assert doc["pools"]["far"]["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"format_version": 7}', "format_version: 7 is not a state format"),
        (b"\x1f\x8b\x08\x00truncated", "not a readable gzip file"),
        (b"[1, 2]", "expected a JSON object"),
    ],
    ids=["malformed", "unknown-version", "truncated-gzip", "not-an-object"],
)
def test_a_bad_state_file_is_one_clear_error(
    env: Env, tmp_path: Path, content: bytes, message: str
) -> None:
    env.manifest("x", [disk("disk", size="16MiB")])
    state = tmp_path / "state.json"
    state.write_bytes(content)
    rc, out, err = env.run("--dry-run", "--observed", str(state))
    assert rc == 1 and out == ""
    assert err.startswith(f"reconcile: error: {state}") and message in err, err
    assert "Traceback" not in err


def test_a_state_whose_parts_disagree_names_the_field(env: Env, tmp_path: Path) -> None:
    env.manifest("x", [disk("disk", size="16MiB")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    good = tmp_path / "good.json"
    _observe(env, good)
    doc = json.loads(good.read_text())
    cases = []
    d1 = json.loads(json.dumps(doc))
    d1["pools"]["local"]["volumes"] = [7]
    cases.append((d1, "pools.local.volumes[0]"))
    d2 = json.loads(json.dumps(doc))
    d2["records"].append(d2["records"][0])
    cases.append((d2, "records[1]: a second record"))
    d3 = json.loads(json.dumps(doc))
    del d3["pools"]["local"]
    cases.append((d3, "records[0]: pool local is configured but was not observed"))
    d4 = json.loads(json.dumps(doc))
    d4["pools"]["local"]["attached"] = {"ghost": ["vm"]}
    cases.append((d4, "pools.local: ghost is described but is not among the volumes"))
    for i, (bad, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.json.gz"
        path.write_bytes(gzip.compress(json.dumps(bad).encode()))
        rc, out, err = env.run("--dry-run", "--observed", str(path))
        assert rc == 1, out
        assert f"{path}: {message}" in err, err


def test_a_state_over_any_bound_is_one_clear_error(env: Env, tmp_path: Path) -> None:
    """A small .gz inflating past the limit, JSON nested absurdly (plain and gzipped), a
    FIFO, a device and a file over the size limit: each one line, exit 1, in bounded time
    (a child process, so a hang is the timeout's error, never a stuck suite)."""
    env.manifest("x", [disk("disk", size="16MiB")])
    bomb = tmp_path / "bomb.json.gz"
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb.write_bytes(
        b"".join(z.compress(zeros) for _ in range((MAX_STATE_BYTES >> 20) + 1)) + z.flush()
    )
    assert bomb.stat().st_size < 1 << 20
    deep = tmp_path / "deep.json"
    deep.write_bytes(b'{"a":' * 200_000)
    deep_gz = tmp_path / "deep.json.gz"
    deep_gz.write_bytes(gzip.compress(b"[" * 200_000))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_STATE_BYTES + 1)  # sparse: no disk space spent
    cases = [
        (bomb, f"inflates to more than {MAX_STATE_BYTES} bytes"),
        (deep, "JSON nested deeper than 64 levels"),
        (deep_gz, "JSON nested deeper than 64 levels"),
        (fifo, "is a FIFO, not a regular file; not read"),
        (Path("/dev/zero"), "is a character device, not a regular file; not read"),
        (big, f"{MAX_STATE_BYTES + 1} bytes, more than the {MAX_STATE_BYTES} allowed"),
    ]
    for path, message in cases:
        res = env.subprocess("--dry-run", "--observed", str(path), timeout=120)
        assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
        assert res.stderr == f"reconcile: error: {path}: {message}\n", res.stderr
