"""The command line: exit codes, validate, schema, and writing manifests atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconciler.commands.cli import main
from reconciler.schema.load import load_manifest
from reconciler.schema.manifest import Manifest
from reconciler.schema.write import manifest_yaml, write_manifest
from tests.env import Env, disk
from tests.helpers import EXAMPLES, example_config


@pytest.mark.libvirtd
def test_exit_codes(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", size="1MiB")])
    rc, out, _ = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 2 and "+ create" in out  # changes planned
    rc, _, _ = env.run("--dry-run")
    assert rc == 0  # changes, but no --detailed-exitcode
    assert env.run()[0] == 0
    rc, out, _ = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 0 and "No changes." in out
    env.manifest("vm", [disk("d", size="512KiB")], instance=inst)  # a shrink: an error
    rc, out, _ = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 1 and "shrink-refused" in out
    doc = env.plan_json()
    assert set(doc) == {"format_version", "actions", "errors", "warnings", "summary"}
    assert doc["summary"]["errors"] == 1


def test_validate_reports_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "good.yaml").write_text((EXAMPLES / "manifests" / "web-1.yaml").read_text())
    bad = (
        (EXAMPLES / "manifests" / "batch-7.yaml").read_text().replace("size: 256MiB", "size: 256MB")
    )
    (mdir / "bad.yaml").write_text(bad)
    rc = main(["validate", "--config", str(tmp_path / "config.yaml"), str(mdir)])
    out = capsys.readouterr()
    assert rc == 1
    line = bad.splitlines().index("    size: 256MB") + 1
    assert f"{mdir / 'bad.yaml'}:{line}:5: disks[1].size: size '256MB' has unknown unit" in out.err
    assert "1 valid, 1 invalid manifest(s), 1 error(s)" in out.out


def test_schema_is_json_schema_of_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Manifest"
    assert set(schema["required"]) >= {"apiVersion", "kind", "instance"}
    assert schema["additionalProperties"] is False
    assert main(["schema", "--kind", "config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["title"] == "Config"
    reconnect = config["$defs"]["LibvirtConfig"]["properties"]["reconnectTimeout"]
    assert (reconnect["type"], reconnect["default"], reconnect["minimum"]) == ("number", 30, 0)
    assert config["$defs"]["StateConfig"]["properties"]["lockTimeout"]["default"] == 30


def test_write_manifest_is_atomic_and_round_trips(tmp_path: Path) -> None:
    src = EXAMPLES / "manifests" / "db-1.yaml"
    config = example_config(tmp_path)
    loaded = load_manifest(str(src), config)
    assert not hasattr(loaded, "errors")
    manifest: Manifest = loaded.manifest
    target = tmp_path / "out.yaml"
    target.write_text("old content\n")
    before = os.stat(target).st_ino
    write_manifest(str(target), manifest)
    # Replaced by a rename (a new inode), never rewritten in place; no temp file left.
    assert os.stat(target).st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out.yaml"]
    again = load_manifest(str(target), config)
    assert again.manifest == manifest  # type: ignore[union-attr]
    assert target.read_text() == manifest_yaml(manifest)


@pytest.mark.parametrize("argv", [["--version"], ["validate", "--help"]])
def test_version_and_validates_help_import_no_schema_and_no_other_command(
    argv: list[str],
) -> None:
    """Start-up (issue 27): cli.py imports a subcommand's module only when it runs, and
    validate imports the schema (pydantic's models, most of a second) only once its
    arguments are parsed; in a fresh interpreter, nothing else is loaded."""
    import subprocess
    import sys

    from reconciler.commands.cli import SUBCOMMANDS

    code = (
        "import sys\n"
        "from reconciler.commands import cli\n"
        "try:\n"
        f"    rc = cli.main({argv!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(rc, ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    rc, modules = res.stderr.strip().splitlines()[-1].split(" ", 1)
    loaded = set(modules.split())
    assert rc == "0", res.stderr
    assert res.stdout.startswith("reconcile 0" if argv == ["--version"] else "usage: reconcile")
    assert not {"pydantic", "reconciler.schema.config", "reconciler.control.session"} & loaded
    ran = {SUBCOMMANDS[argv[0]]} if argv[0] in SUBCOMMANDS else set()
    assert set(SUBCOMMANDS.values()) & loaded == ran


@pytest.mark.parametrize("setting", [None, "__all__", "some-plugin"])
def test_no_pydantic_plugins_unless_asked_for(setting: str | None) -> None:
    """Start-up (issue 27): the CLI has pydantic find no plugins, without importing
    importlib.metadata to look for them; PYDANTIC_DISABLE_PLUGINS set to anything but
    "disable all" leaves pydantic's own lookup in place."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from reconciler.commands import cli\n"
        "cli.no_pydantic_plugins()\n"
        "from pydantic import BaseModel\n"
        "class M(BaseModel):\n"
        "    x: int\n"
        "assert M.model_validate({'x': 1}).x == 1\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if setting is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = setting
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(setting == "some-plugin")
