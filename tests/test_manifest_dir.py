"""The manifest directory is someone else's (DESIGN invariant 8; docs/concepts.md: the manifest
directory): only regular files are read, never through a symbolic link, nothing blocks,
and nothing of a file that is not a manifest reaches an error, in validate, the dry run,
the loop (`watch`) and `status`.

The secrets are files outside the directory whose lines carry unique markers, shaped as
/etc/shadow is and as YAML that used to be quoted back (unknown keys, wrong values); they
reach the directory by a symbolic link and by a hard link (a regular file that is no
manifest). FIFOs and devices are run in a separate process with a timeout: a read that
blocks fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from reconciler.model.errors import InputError
from reconciler.schema.load import FailedManifest, LoadedManifest
from reconciler.schema.manifestdir import load_manifests
from reconciler.schema.readfile import read_regular
from reconciler.schema.speed import mcache
from reconciler.schema.speed.mcache import ManifestCache
from tests.env import Env, disk
from tests.helpers import EXAMPLES, example_config
from tests.test_loop import loop, status, wait_until

MARK = f"SECRET{uuid.uuid4().hex[:12]}"

# Shaped as /etc/shadow (YAML reads it as one string, or as keys) and as YAML a loader
# would quote back: unknown keys, a wrong apiVersion, a value in a required field.
SHADOW = (
    f"root:$6${MARK}a$hash:19000:0:99999:7:::\ndaemon:*:{MARK}b:0:99999:7:::\n{MARK}c: {MARK}d\n"
)
WRONG_KIND = f"apiVersion: {MARK}e\nkind: InstanceStorage\ninstance: {MARK}f\n"
UNREADABLE = f"{MARK}g: [unclosed\n  &{MARK}h x: *{MARK}i\n"


def secrets(outside: Path) -> list[Path]:
    outside.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("shadow", SHADOW), ("wrong", WRONG_KIND), ("broken", UNREADABLE)):
        p = outside / name
        p.write_text(text)
        p.chmod(0o600)
        files.append(p)
    return files


def plant_secrets(mdir: Path, outside: Path) -> None:
    """Each secret by a symbolic link and by a hard link (what a link in a directory the
    reconciler's user cannot see into, or a file written there by mistake, would be)."""
    for p in secrets(outside):
        (mdir / f"sym-{p.name}.yaml").symlink_to(p)
        os.link(p, mdir / f"hard-{p.name}.yaml")


def no_secret(*texts: str) -> None:
    for t in texts:
        assert MARK not in t, t


def error_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def test_validate_reads_no_link_and_quotes_no_other_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "good.yaml").write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    plant_secrets(mdir, tmp_path / "outside")
    from reconciler.commands.cli import main

    rc = main(["validate", "--config", str(tmp_path / "config.yaml"), str(mdir)])
    out = capsys.readouterr()
    assert rc == 1
    no_secret(out.out, out.err)
    assert "1 valid, 6 invalid manifest(s), 6 error(s)" in out.out  # one error per file
    for name in ("shadow", "wrong", "broken"):
        (sym,) = error_lines(out.err, f"sym-{name}.yaml")
        assert "a symbolic link, not a regular file" in sym
        (hard,) = error_lines(out.err, f"hard-{name}.yaml")
        assert "not a manifest" in hard and "nothing of the file is quoted" in hard


def test_a_link_within_the_directory_is_refused_too(tmp_path: Path) -> None:
    """The rule is simple: no link is followed, not even to a manifest beside it."""
    config = example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "web-1.yaml").write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    (mdir / "alias.yaml").symlink_to("web-1.yaml")
    loaded, failed = load_manifests([str(mdir)], config)
    assert [Path(x.file).name for x in loaded] == ["web-1.yaml"]
    (f,) = failed
    assert Path(f.file).name == "alias.yaml" and f.instance is None
    assert "symbolic link" in f.errors[0].message


def test_what_is_no_regular_file_is_refused_without_reading(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "dir.yaml").mkdir()
    (mdir / "zero.yaml").symlink_to("/dev/zero")
    huge = mdir / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(8 << 30)  # sparse: reading it whole would take 8 GiB of memory
    os.mkfifo(mdir / "fifo.yaml")
    loaded, failed = load_manifests([str(mdir)], config)
    assert not loaded
    why = {Path(f.file).name: (f.errors[0].message, len(f.errors)) for f in failed}
    assert why == {
        "dir.yaml": ("is a directory, not a regular file; not read", 1),
        "fifo.yaml": ("is a FIFO, not a regular file; not read", 1),
        "huge.yaml": (f"{8 << 30} bytes, more than the 1048576 allowed", 1),
        "zero.yaml": ("is a symbolic link, not a regular file; not read", 1),
    }


def test_a_device_node_is_refused(tmp_path: Path) -> None:
    node = tmp_path / "zero.yaml"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("making a device node needs root")
    with pytest.raises(InputError, match="a character device, not a regular file"):
        read_regular(str(node))


@pytest.mark.libvirtd
@pytest.mark.parametrize("command", [("validate",), ("--dry-run",)])
@pytest.mark.parametrize("target", ["fifo", "link-to-fifo"])
def test_a_fifo_ends_in_one_line_naming_it(env: Env, command: tuple[str, ...], target: str) -> None:
    env.manifest("vm", [disk("d", size="1MiB")])
    fifo = env.root / "fifo"
    os.mkfifo(fifo)
    name = f"{target}.yaml"
    if target == "fifo":
        os.rename(fifo, env.manifests / name)
    else:
        (env.manifests / name).symlink_to(fifo)
    # A read that blocks would hang here: the timeout fails the test instead.
    res = env.subprocess(*command, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = error_lines(res.stdout + res.stderr, name)
    assert len(lines) == 1, lines
    kind = "a FIFO" if target == "fifo" else "a symbolic link"
    assert f"{kind}, not a regular file" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.libvirtd
def test_the_dry_run_quotes_no_other_file(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    plant_secrets(env.manifests, env.root / "outside")
    for output in ("text", "json"):
        rc, out, err = env.run("--dry-run", "--output", output)
        assert rc == 1, out + err
        no_secret(out, err)
    doc = env.plan_json()
    files = sorted(Path(e["file"]).name for e in doc["errors"] if e.get("file"))
    assert files == sorted(
        f"{k}-{n}.yaml" for k in ("sym", "hard") for n in ("shadow", "wrong", "broken")
    )
    # The valid manifest is planned beside them.
    assert [a["instance"] for a in doc["actions"]] == [inst]


@pytest.mark.libvirtd
def test_watch_and_status_quote_no_other_file(env: Env, capfd: pytest.CaptureFixture[str]) -> None:
    plant_secrets(env.manifests, env.root / "outside")

    def reconciled(generation: int, size: int) -> bool:
        # The files that are no manifest name no instance, so they could be this one's:
        # its status carries their errors (and its plan makes what it can).
        s = status(env, inst)
        vol = env.volume(inst, "d")
        return (
            s is not None
            and s.generation == generation
            and "not a manifest" in s.lastError
            and vol.exists()
            and vol.stat().st_size == size
        )

    with loop(env):
        inst = env.manifest("vm", [disk("d", size="1MiB")])
        wait_until("the instance to be reconciled", lambda: reconciled(1, 1 << 20))
        # Written while the loop runs: read through the watcher, not the first full read.
        (env.manifests / "late.yaml").symlink_to(env.root / "outside" / "shadow")
        os.link(env.root / "outside" / "shadow", env.manifests / "late-hard.yaml")
        # A reader that blocked on this would never see the manifest's change below.
        os.mkfifo(env.manifests / "late-fifo.yaml")
        env.manifest("vm", [disk("d", size="2MiB")], instance=inst)
        wait_until("the instance to be reconciled again", lambda: reconciled(2, 2 << 20))
    logs = capfd.readouterr()
    no_secret(logs.out, logs.err)
    for output in ("text", "json"):
        rc, out, err = env.main(["status", "--config", str(env.config_path), "--output", output])
        assert rc == 0, err
        no_secret(out, err)
    rc, out, _ = env.main(["status", "--config", str(env.config_path), "--output", "json"])
    (row,) = json.loads(out)
    assert row["instance"] == inst


def test_the_cache_never_answers_for_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached manifest's name swapped for a link (to the very same file): the link is
    read, and refused, as any other; the cache is keyed on what was read."""
    monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))
    config = example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    web = mdir / "web-1.yaml"
    web.write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    cache_path = tmp_path / "state" / "manifest-cache.json"
    loaded, _ = load_manifests([str(mdir)], config, ManifestCache(cache_path))
    assert len(loaded) == 1 and loaded[0].key == mcache.stat_key(web.stat())
    assert ManifestCache(cache_path).entries  # cached
    kept = tmp_path / "kept.yaml"
    os.rename(web, kept)
    web.symlink_to(kept)
    loaded, failed = load_manifests([str(mdir)], config, ManifestCache(cache_path))
    assert not loaded
    (f,) = failed
    assert isinstance(f, FailedManifest) and "symbolic link" in f.errors[0].message


@pytest.mark.parametrize("how", ["link", "fifo", "group-writable", "world-writable", "other-owner"])
def test_a_cache_file_others_could_write_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The cache's entries are not validated again, so its file must be this user's alone."""
    monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))
    config = example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "web-1.yaml").write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    cache_path = tmp_path / "state" / "manifest-cache.json"
    load_manifests([str(mdir)], config, ManifestCache(cache_path))
    assert ManifestCache(cache_path).entries
    if how == "link":
        real = tmp_path / "elsewhere.json"
        os.rename(cache_path, real)
        cache_path.symlink_to(real)
    elif how == "fifo":
        cache_path.unlink()
        os.mkfifo(cache_path)
    elif how == "group-writable":
        cache_path.chmod(0o620)
    elif how == "world-writable":
        cache_path.chmod(0o602)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(cache_path, 65534, 65534)
    assert ManifestCache(cache_path).entries == {}
    loaded, failed = load_manifests([str(mdir)], config, ManifestCache(cache_path))
    assert len(loaded) == 1 and not failed  # parsed from the file, as without a cache
    assert isinstance(loaded[0], LoadedManifest)


def test_without_proc_the_name_is_opened_again_and_must_be_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc is missing, the checked file is opened again by name (O_NOFOLLOW,
    O_NONBLOCK): still the same regular file is read, and a link is still refused."""
    real_open = os.open

    def no_proc(path: str, flags: int, *args: int) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_proc)
    f = tmp_path / "web-1.yaml"
    f.write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    read = read_regular(str(f))
    assert read.data == f.read_bytes() and read.stat.st_ino == f.stat().st_ino
    (tmp_path / "link.yaml").symlink_to(f)
    with pytest.raises(InputError, match="a symbolic link"):
        read_regular(str(tmp_path / "link.yaml"))
