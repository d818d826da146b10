"""The CLI's edge: every command ends an unexpected exception in one line naming a private
file with its traceback (or prints the traceback with -v), exit 1; Ctrl-C is 130, usage
errors 2, and a reader of stdout that went away ends the run quietly."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands import cli
from reconciler.schema.manifest import Manifest
from tests.env import ROOT, Env, disk

INTERNAL = re.compile(
    r"^reconcile: internal error: (?P<what>[\w.]+: .*|[\w.]+); traceback in (?P<file>\S+)$"
)
FORCED = "forced by the test"


def boom(*_a: object, **_k: object) -> Any:
    raise ValueError(FORCED)


def _traceback_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def _check_one_line(rc: int, err: str, tb_dir: Path, where: str) -> Path:
    """The run ended in the one line (exit 1), naming a 0600 file in tb_dir that holds the
    traceback down to the function that raised."""
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "internal error" in line]
    assert len(lines) == 1, err
    m = INTERNAL.match(lines[0])
    assert m is not None, err
    assert m["what"] == f"ValueError: {FORCED}"
    path = Path(m["file"])
    assert path.parent == tb_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "Traceback (most recent call last)" in text
    assert f"ValueError: {FORCED}" in text
    assert where in text  # the frames reach down to where it was raised
    return path


Setup = Callable[[Env, Path], list[str]]


def _plan_argv(env: Env, *more: str) -> list[str]:
    env.manifest("vm", [disk("d", size="1MiB")])
    return ["--config", str(env.config_path), *more, str(env.manifests)]


def apply_argv(env: Env, plan: Path, *flags: str) -> list[str]:
    """`reconcile apply` of a plan made from env's config and manifests with `flags`
    (apply plans again from them). The one place that knows apply's command line:
    test_fuzz uses it too."""
    return ["apply", "--config", str(env.config_path), *flags, str(plan), str(env.manifests)]


def _saved_plan(env: Env, tmp: Path) -> list[str]:
    argv = _plan_argv(env, "--dry-run", "--plan-out", str(tmp / "plan.json"))
    rc, _, err = env.main(argv)
    assert rc == 0, err
    return apply_argv(env, tmp / "plan.json")


def _with_config(*words: str) -> Setup:
    def setup(env: Env, _tmp: Path) -> list[str]:
        return [*words, "--config", str(env.config_path)]

    return setup


def _adopt(env: Env, _tmp: Path) -> list[str]:
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    env.volume(inst, "d").write_bytes(b"\0" * (1 << 20))
    return [
        "adopt",
        "--config",
        str(env.config_path),
        "--instance",
        inst,
        "--disk",
        "d",
        "--volume",
        f"local/{inst}_d",
        "--format",
        "raw",
        "--dry-run",
        str(env.manifests),
    ]


def _import_nova(env: Env, tmp: Path) -> list[str]:
    (tmp / "nova").mkdir()
    return [
        "import-nova",
        "--config",
        str(env.config_path),
        "--instances-path",
        str(tmp / "nova"),
        "--images-type",
        "raw",
        "--pool",
        "local",
        "--out",
        str(tmp / "out"),
        "--dry-run",
    ]


def _watch(env: Env, _tmp: Path) -> list[str]:
    env.manifest("vm", [disk("d", size="1MiB")])
    return ["watch", "--config", str(env.config_path), str(env.manifests)]


# command -> (argv maker, what to break, the name the traceback must reach)
CASES: dict[str, tuple[Setup, str, str]] = {
    "plan --dry-run": (
        lambda env, _t: _plan_argv(env, "--dry-run"),
        "reconciler.control.session.Session.plan",
        "boom",
    ),
    "plan and apply": (
        lambda env, _t: _plan_argv(env),
        "reconciler.apply.executor.Executor.apply",
        "boom",
    ),
    "apply PLAN": (_saved_plan, "reconciler.schema.load._validate", "load_config"),
    "validate": (
        lambda env, _t: ["validate", *_plan_argv(env)],
        "reconciler.schema.load.check_references",
        "load_manifest",
    ),
    "cache ls": (_with_config("cache", "ls"), "reconciler.commands.cache.entries", "boom"),
    "cache gc": (_with_config("cache", "gc"), "reconciler.commands.cache.gc", "boom"),
    "records rebuild": (
        lambda env, _t: ["records", "rebuild", "--config", str(env.config_path), "local"],
        "reconciler.control.session.Session.managing_drivers",
        "boom",
    ),
    "adopt": (_adopt, "reconciler.commands.adopt.adopt", "boom"),
    "import-nova": (_import_nova, "reconciler.commands.nova.import_nova", "boom"),
    "observe": (
        lambda env, t: ["observe", "--config", str(env.config_path), "--out", str(t / "s.json")],
        "reconciler.control.session.Session.observe",
        "boom",
    ),
    "status": (_with_config("status"), "reconciler.schema.config.Config.state_dir", "boom"),
    "watch (its main thread)": (_watch, "reconciler.control.loop.Loop.resync", "_run"),
    "watch (a thread of the loop)": (
        _watch,
        "reconciler.control.loop.Loop._beater",
        "in the loop's",
    ),
}


@pytest.mark.libvirtd
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unexpected_exception_is_one_line_and_a_traceback_file(
    case: str, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, target, where = CASES[case]
    tb_dir = _traceback_dir(monkeypatch, tmp_path)
    argv = setup(env, tmp_path)
    monkeypatch.setattr(target, boom)

    rc, out, err = env.main(argv)
    path = _check_one_line(rc, err, tb_dir, where)
    assert "Traceback" not in out

    # -v: the traceback is printed, the one line still ends it, and no file is written.
    path.unlink()
    rc, _, err = env.main([*argv, "-v"])
    assert rc == 1
    assert "Traceback (most recent call last)" in err and where in err
    assert err.splitlines()[-1] == f"reconcile: internal error: ValueError: {FORCED}"
    assert list(tb_dir.iterdir()) == []


def test_schema_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`schema` reads no config; its edge is the same."""
    tb_dir = _traceback_dir(monkeypatch, tmp_path)
    monkeypatch.setattr(Manifest, "model_json_schema", boom)
    rc, _, err = Env.main(["schema"])
    _check_one_line(rc, err, tb_dir, "commands/schema.py")


def _run_broken(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException | Callable[[], Any]
) -> tuple[int, str, str]:
    def raiser(*_a: object, **_k: object) -> Any:
        if isinstance(exc, BaseException):
            raise exc
        return exc()

    monkeypatch.setattr(Manifest, "model_json_schema", raiser)
    return Env.main(["schema"])


def _recurse() -> Any:
    return _recurse()


@pytest.mark.parametrize(
    ("exc", "what"),
    [
        (MemoryError(), "MemoryError"),
        (_recurse, "RecursionError: maximum recursion depth exceeded"),
        # Not stdout's: a child's pipe or a socket that broke is a failure to report.
        (BrokenPipeError(32, "Broken pipe"), "BrokenPipeError: [Errno 32] Broken pipe"),
        (KeyError("multi\nline\x1b[2J"), r"KeyError: 'multi\nline\x1b[2J'"),
    ],
    ids=["memory", "recursion", "broken-pipe-not-stdout", "control-characters"],
)
def test_memory_recursion_and_others_are_one_line(
    exc: BaseException | Callable[[], Any],
    what: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tb_dir = _traceback_dir(monkeypatch, tmp_path)
    rc, _, err = _run_broken(monkeypatch, exc)
    assert rc == 1
    assert "Traceback" not in err
    m = INTERNAL.match(err.strip())
    assert m is not None, err
    assert m["what"] == what
    assert Path(m["file"]).parent == tb_dir


def test_ctrl_c_is_130_and_usage_errors_stay_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tb_dir = _traceback_dir(monkeypatch, tmp_path)
    rc, _, err = _run_broken(monkeypatch, KeyboardInterrupt())
    assert (rc, err) == (130, "reconcile: interrupted\n")
    with pytest.raises(SystemExit) as e:
        Env.main(["validate", "--no-such-option"])
    assert e.value.code == 2
    assert list(tb_dir.iterdir()) == []


def _python(code: str, tmp_path: Path, **kw: Any) -> subprocess.Popen[str]:
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE, **kw
    )


def test_a_real_process_prints_exactly_one_line(tmp_path: Path) -> None:
    """As a separate process: nothing else reaches stderr (no "Exception ignored" at exit)."""
    code = (
        "import sys\n"
        "from reconciler.commands import cli\n"
        "from reconciler.schema.manifest import Manifest\n"
        "def boom(*a, **k): raise ValueError('deep')\n"
        "Manifest.model_json_schema = boom\n"
        "sys.exit(cli.main(['schema']))\n"
    )
    p = _python(code, tmp_path, stdout=subprocess.DEVNULL)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert len(err.splitlines()) == 1, err
    m = INTERNAL.match(err.strip())
    assert m is not None and m["what"] == "ValueError: deep", err
    text = Path(m["file"]).read_text()
    assert ", in boom\n" in text and "ValueError: deep" in text  # down to the raising frame


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """`reconcile schema | head -c1`: the reader goes away; no traceback, no message, and
    the exit status of a Unix tool killed by SIGPIPE (128 + 13)."""
    code = "import sys\nfrom reconciler.commands import cli\nsys.exit(cli.main(['schema']))\n"
    p = _python(code, tmp_path, stdout=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.close()  # the only reader: every write of the child now fails with EPIPE
    _, err = p.communicate(timeout=60)
    assert err == ""
    assert p.returncode == cli.EXIT_BROKEN_PIPE
    assert list(tmp_path.iterdir()) == []


def test_the_verbose_flag_is_seen_before_parsing() -> None:
    seen = cli._verbose
    assert seen(["validate", "-v", "x"]) and seen(["-vv", "x"]) and seen(["--verb", "x"])
    assert not seen(["--version"]) and not seen(["--", "-v"]) and not seen(["--ver"])
    assert not seen(["x.yaml"]) and not seen([])


def test_output_that_cannot_be_encoded_is_escaped(tmp_path: Path) -> None:
    """A lone surrogate (JSON input can hold one: a host name in an exported state) in
    what a command prints is shown escaped; strict UTF-8 would fail the run halfway."""
    code = (
        "import sys\n"
        "from reconciler.commands import cli, schema\n"
        "schema.run = lambda argv: print('host \\ud800 here') or 0\n"
        "sys.exit(cli.main(['schema']))\n"
    )
    p = _python(code, tmp_path, stdout=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (0, "")
    assert out == "host \\ud800 here\n"


@pytest.mark.libvirtd
def test_a_crash_of_one_instance_in_watch_is_one_log_line(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker of `watch` survives an instance's unexpected exception (the loop goes on)
    and logs it in one line naming the traceback's file, even on a terminal's readable
    log lines, which printed the traceback itself."""
    from reconciler.control.loop import Loop
    from reconciler.util import logs
    from tests.test_loop import loop, wait_until

    tb_dir = _traceback_dir(monkeypatch, tmp_path)
    monkeypatch.setattr(Loop, "reconcile", boom)
    logs.configure(logs.INFO, json_lines=False)
    env.manifest("vm", [disk("d", size="1MiB")])
    with loop(env):
        kept = wait_until("a traceback file", lambda: list(tb_dir.iterdir()))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    crashed = [line for line in err.splitlines() if "reconcile.crashed" in line]
    assert crashed and f"ValueError: {FORCED}" in crashed[0], err
    assert str(kept[0]) in crashed[0]
    assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    assert "Traceback (most recent call last)" in kept[0].read_text()


def test_a_type_not_builtin_is_named_with_its_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    _traceback_dir(monkeypatch, tmp_path)
    rc, _, err = _run_broken(monkeypatch, sqlite3.OperationalError("database is locked"))
    m = INTERNAL.match(err.strip())
    assert rc == 1 and m is not None, err
    assert m["what"] == "sqlite3.OperationalError: database is locked"
