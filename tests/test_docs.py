"""The documentation's examples run as shown, and its reference is the schema's.

Every ```sh and ```python block in README.md and docs/ carries a marker, an HTML comment
on the line before it:

- `<!-- docs-test: run [exit=N] [expect=TEXT]... [timeout=S] -->`: run it, in the page's
  order, in a sandbox made for the page; it must exit N (default 0) and its output (stdout
  and stderr) must contain each TEXT;
- `<!-- docs-test: file PATH -->` (any language): write the block to PATH in the sandbox;
- `<!-- docs-test: skip REASON -->`: not run, with the reason (a host's real setup: the
  production install, systemd; a synopsis).

The sandbox is what a reader has after `make demo`, on fresh dir pools of this checkout's
private libvirtd, as tests/env.py builds them: a config with pools `demo`, `demo-fast` and
`local` (flat, qcow2, ploop) and the image `tiny-linux`, reachable as `.run/demo-config.yaml`,
as `/etc/reconciler/config.yaml` (the default config, in RECONCILER_CONFIG) and so at the
production install's paths: `/etc/reconciler/` and `/var/lib/reconciler/` in a block are
the sandbox's `etc/reconciler/` and `var/lib/reconciler/`. `examples/` and `.venv` are the
checkout's; the venv's bin is on PATH. A shell block runs in `bash -e -o pipefail` in its own
session, whose processes are ended after it; a Python block runs in the venv's python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.schema.reference import REGENERATE, render
from tests.conftest import Pools
from tests.env import ROOT, Env

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUNNABLE = ("sh", "python")
_MARK = re.compile(r"^<!-- docs-test: (?P<what>run|file|skip)\b(?P<args>.*?)\s*-->$")
_FENCE = re.compile(r"^(?P<fence>```+)(?P<info>[^`]*)$")
# README's first lines are the two commands, with nothing before them: `make demo` is
# tests/test_demo.py's (it runs the demo's script), `make test` the suite itself.
_FIRST_LINES = ("README.md", 3)
_TINY = 1024 * 1024  # the demo's image: 1 MiB of zeros (examples/config.yaml.in)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mark: str | None = None  # run, file or skip
    args: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's fenced code blocks, each with the marker on the line before it."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        indent = len(lines[start]) - len(lines[start].lstrip())
        text = "\n".join(line[indent:] for line in body) + "\n"
        b = Block(page, start + 1, m["info"].strip().split(" ")[0], text)
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = _MARK.match(lines[j].strip()) if j >= 0 else None
        if mark:
            args = mark["args"].strip()  # a reason is prose (apostrophes), not shell words
            b.mark = mark["what"]
            b.args = ([args] if args else []) if b.mark == "skip" else shlex.split(args)
        out.append(b)
        i += 1
    return out


def test_every_shell_and_python_block_is_marked_run_or_skipped_with_a_reason() -> None:
    unmarked, reasonless = [], []
    for page in PAGES:
        for b in blocks(page):
            if (str(b.page.relative_to(ROOT)), b.line) == _FIRST_LINES:
                assert b.text.startswith("make demo"), "README's first lines are the commands"
                continue
            if b.lang in RUNNABLE and b.mark not in ("run", "skip"):
                unmarked.append(b.where)
            if b.mark == "skip" and not b.args:
                reasonless.append(b.where)
            if b.mark == "file":
                assert len(b.args) == 1, f"{b.where}: docs-test: file takes one PATH"
    assert not unmarked, f"blocks without <!-- docs-test: run|skip ... -->: {unmarked}"
    assert not reasonless, f"skipped without a reason: {reasonless}"


def test_the_reference_is_rendered_from_the_schema_as_it_is_now() -> None:
    current = (ROOT / "docs" / "reference.md").read_text()
    assert current == render(), f"docs/reference.md is stale: regenerate it with {REGENERATE}"


def test_the_reference_names_every_field_of_both_schemas() -> None:
    from reconciler.schema.jsonschema import config_schema, manifest_schema

    text = (ROOT / "docs" / "reference.md").read_text()
    for schema in (manifest_schema(), config_schema()):
        for model in [schema, *schema["$defs"].values()]:
            assert f"### {model['title']} (" in text
            for prop in model.get("properties", {}):
                assert f"| `{prop}` |" in text, (model["title"], prop)


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of PAGE."""
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_link_between_the_pages_names_a_file_and_heading_that_exist() -> None:
    broken = []
    for page in PAGES:
        for m in _LINK.finditer(page.read_text()):
            target = m["target"]
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


@pytest.fixture
def sandbox(pools: Pools, tmp_path: Path) -> Iterator[Path]:
    """A reader's checkout after `make demo`, on fresh pools (see the module's docstring)."""
    root = tmp_path / "sandbox"
    made = {n: pools.make(tmp_path / "pools" / n) for n in ("demo", "demo-fast", "local")}
    image = root / "images" / "tiny-linux.raw"
    image.parent.mkdir(parents=True)
    image.write_bytes(bytes(_TINY))
    env = Env(
        root=root / "etc" / "reconciler",
        uri=pools.uri,
        pools={n: (p.name, p.path) for n, p in made.items()},
        backends=["flat", "qcow2", "ploop"],
        images={
            "tiny-linux": {
                "location": image.as_uri(),
                "format": "raw",
                "sha256": hashlib.sha256(bytes(_TINY)).hexdigest(),
                "size": _TINY,
            }
        },
    )
    env.write_config()  # etc/reconciler/config.yaml
    config = json.loads(env.config_path.read_text())
    config["state"]["dir"] = str(root / "var" / "lib" / "reconciler")  # as installed
    env.config_path.write_text(json.dumps(config, indent=2))
    (root / "var" / "lib" / "reconciler" / "manifests").mkdir(parents=True)
    (root / "var" / "lib" / "reconciler").chmod(0o700)  # the state directory's own mode
    (root / ".run").mkdir()
    (root / ".run" / "demo-config.yaml").symlink_to(env.config_path)
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (root / "examples").symlink_to(ROOT / "examples")
    yield root


def _localise(text: str, root: Path) -> str:
    for prefix in ("/etc/reconciler/", "/var/lib/reconciler/"):
        text = text.replace(prefix, f"{root}{prefix}")
    return text


def _run(b: Block, root: Path) -> None:
    opts = dict(a.split("=", 1) for a in b.args if "=" in a and not a.startswith("expect="))
    expects = [a.removeprefix("expect=") for a in b.args if a.startswith("expect=")]
    text = _localise(b.text, root)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["RECONCILER_CONFIG"] = str(root / "etc" / "reconciler" / "config.yaml")
    env["PYTHONPATH"] = str(ROOT)
    argv = (
        ["bash", "-e", "-o", "pipefail", "-c", text]
        if b.lang == "sh"
        else [sys.executable, "-c", text]
    )
    proc = subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=float(opts.get("timeout", 300)))
    finally:
        with contextlib.suppress(ProcessLookupError):  # what it left running (`watch &`)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    want = int(opts.get("exit", 0))
    assert proc.returncode == want, f"{b.where}: exit {proc.returncode}, not {want}:\n{out}"
    for e in expects:
        assert e in out, f"{b.where}: {e!r} not in the output:\n{out}"


def _pages_with_runs() -> list[Path]:
    return [p for p in PAGES if any(b.mark in ("run", "file") for b in blocks(p))]


@pytest.mark.libvirtd
@pytest.mark.parametrize("page", _pages_with_runs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_pages_examples_run_as_shown(page: Path, sandbox: Path) -> None:
    for b in blocks(page):
        if b.mark == "file":
            dest = Path(_localise(b.args[0], sandbox))
            dest = dest if dest.is_absolute() else sandbox / dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(b.text)
        elif b.mark == "run":
            _run(b, sandbox)
