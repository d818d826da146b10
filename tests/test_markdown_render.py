"""The Markdown review comment as a forge shows it: rendered by Debian's cmark-gfm (the
GitHub-flavoured Markdown renderer GitHub's own is built on), with the extensions GitHub
turns on, once with raw HTML let through (--unsafe: <details> folds each action's volume
and patch) and once with raw HTML suppressed (a renderer that strips all raw HTML); the
assertions are on the HTML it makes."""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reconciler.commands.cli import main
from reconciler.diff import PlanOptions, plan
from reconciler.diff.render import MAX_MARKDOWN, to_json, to_markdown
from reconciler.model import Desired, Plan
from reconciler.schema import exported
from reconciler.schema.manifest import DiskSpec
from tests.helpers import desired_from, example_config, observed, record_for
from tests.test_plan_snapshots import SCENARIOS, desired  # noqa: F401 (a fixture)

GITHUB_EXTENSIONS = ("table", "strikethrough", "autolink", "tagfilter")
POOLS = {"demo": set[str](), "demo-fast": set[str]()}
TWO_DISKS = """\
  - name: disk
    backend: qcow2
    pool: demo
    format: qcow2
    size: 1GiB
    source:
      image: tiny-linux
  - name: disk.eph0
    backend: flat
    pool: demo
    format: raw
    size: 512MiB
    source:
      template: ext4
      label: ephemeral0
"""


def render(markdown: str, *, unsafe: bool) -> str:
    cmark = shutil.which("cmark-gfm")
    if cmark is None:
        pytest.fail("cmark-gfm is not installed: run 'make setup' (scripts/setup.sh)")
    args = [cmark]
    for ext in GITHUB_EXTENSIONS:
        args += ["-e", ext]
    if unsafe:
        args.append("--unsafe")
    done = subprocess.run(args, input=markdown, capture_output=True, text=True, check=True)
    return done.stdout


class Html(HTMLParser):
    """The rendered page: its elements must nest and close; text and headings kept."""

    VOID = frozenset({"br", "hr", "img", "input"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.broken: list[str] = []
        self.tags: dict[str, int] = {}
        self.comments: list[str] = []
        self.text: list[str] = []
        self.headings: list[tuple[str, str]] = []
        self._heading: list[str] | None = None
        self.feed(html)
        self.close()
        if self.stack:
            self.broken.append(f"never closed: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag in ("h3", "h4"):
            self._heading = []
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.broken.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("h3", "h4") and self._heading is not None:
            self.headings.append((tag, "".join(self._heading).strip()))
            self._heading = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data.strip())

    @property
    def plain(self) -> str:
        return "".join(self.text)


def sound(markdown: str, *, unsafe: bool) -> tuple[str, Html]:
    """Render, and check what every review must be: well-formed, no empty code block,
    nothing left of markup as stray text."""
    html = render(markdown, unsafe=unsafe)
    page = Html(html)
    assert not page.broken, page.broken
    assert not re.search(r"<pre><code[^>]*>\s*</code></pre>", html), "an empty code block"
    assert not re.search(r"<code>\s*</code>", html), "an empty code span"
    assert "<script" not in html and "<style" not in html
    # Markup that did not render shows up as text: none may.
    for stray in ("<details", "</details", "<summary", "```", "**", "&lt;details"):
        assert stray not in page.plain, (stray, page.plain[:2000])
    if unsafe:
        assert not page.comments
    else:
        assert "details" not in page.tags and "summary" not in page.tags
        assert set(page.comments) <= {"raw HTML omitted"}
    return html, page


def items(html: str, section: str) -> list[str]:
    """The top-level list items of the section under the h4 that starts with `section`."""
    part = html.split(f"<h4>{section}", 1)[1].split("<h4>", 1)[0]
    return re.findall(r"<li>(.*?)</li>", part, re.S)


def new_instances(tmp_path: Path, n: int) -> tuple[Desired, Plan]:
    config = example_config(tmp_path)
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    for i in range(n):
        text = "apiVersion: reconciler/v1\nkind: InstanceStorage\n"
        text += f"instance: {uuid.UUID(int=0x1000 + i)}\ndisks:\n{TWO_DISKS}"
        (mdir / f"vm-{i:04d}.yaml").write_text(text)
    d = desired_from([str(mdir)], config)
    assert not d.failed
    return d, plan(d, observed([], POOLS), PlanOptions())


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("unsafe", [True, False], ids=["html", "html-stripped"])
def test_every_example_plan_renders_whole_and_sound(
    scenario: str,
    unsafe: bool,
    desired: Desired,  # noqa: F811 (the fixture)
) -> None:
    make, options = SCENARIOS[scenario]
    p = plan(desired, make(desired), options)
    md = to_markdown(p, ["Planned against the example state."])
    assert len(md.encode()) <= MAX_MARKDOWN
    html, page = sound(md, unsafe=unsafe)
    assert page.headings[0] == ("h3", "reconcile plan")
    want = [
        title
        for title, n in (
            (f"❌ Errors ({len(p.errors)})", len(p.errors)),
            (f"⚠️ Held by the delete guard ({len(p.held)})", len(p.held)),
            (f"Actions ({len(p.actions)})", len(p.actions)),
            (f"Warnings ({len(p.warnings)})", len(p.warnings)),
        )
        if n
    ]
    assert [h for tag, h in page.headings if tag == "h4"] == want
    # The summary table: a column per count, the plan's counts in it.
    head = re.findall(r"<th[^>]*>(.*?)</th>", html)
    cells = [re.sub(r"<[^>]+>|[^0-9]", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", html)]
    s = p.summary()
    assert head[-3:] == ["destructive", "errors", "warnings"]
    assert [int(c) for c in cells] == [s[k] for k in head]
    # Every action is shown whole: its line, and its volume and patch (folded where HTML
    # is let through, a plain code block where it is not), and no "Shortened" note.
    assert "Shortened" not in page.plain
    shown = p.actions + p.held
    assert page.tags.get("pre", 0) == len(shown)
    assert page.tags.get("details", 0) == (len(shown) if unsafe else 0)
    for a in shown:
        assert f"volume {a.pool}/{a.volume}\n" in page.plain
    if not p.actions:
        assert "No changes." in page.plain


@pytest.mark.parametrize("unsafe", [True, False], ids=["html", "html-stripped"])
def test_errors_stand_out_as_destructive_actions_do(
    unsafe: bool,
    desired: Desired,  # noqa: F811 (the fixture)
) -> None:
    for scenario in ("refused-allow-replace", "migrating", "drifted-prune"):
        make, options = SCENARIOS[scenario]
        p = plan(desired, make(desired), options)
        assert p.errors
        html, _ = sound(to_markdown(p), unsafe=unsafe)
        errors = items(html, "❌ Errors")
        assert len(errors) == len(p.errors)
        for li, e in zip(errors, p.errors, strict=True):
            assert li.startswith(f"❌ <strong>error</strong> <code>{e.code.value}</code>: "), li
        assert f"<strong>{len(p.errors)}</strong> ❌</td>" in html  # the table's cell
        marked = html.count("<strong>⚠️ DESTRUCTIVE</strong>")
        assert marked == sum(1 for a in p.actions + p.held if a.destructive)
        # An instance with an error says so beside its name.
        with_errors = {e.instance for e in p.errors} & {a.instance for a in p.actions}
        for inst in with_errors:
            line = re.search(rf"instance <code>{inst}</code>[^\n]*", html)
            assert line is not None and "error(s)</strong> ❌" in line.group(0)


@pytest.mark.parametrize("unsafe", [True, False], ids=["html", "html-stripped"])
def test_every_action_the_delete_guard_held_is_shown_and_is_not_in_the_plan(
    unsafe: bool,
    desired: Desired,  # noqa: F811 (the fixture)
) -> None:
    make, options = SCENARIOS["drifted-prune"]
    p = plan(desired, make(desired), options)
    assert [e.code.value for e in p.errors].count("delete-threshold") == 1
    assert len(p.held) == 2 and all(a.destructive for a in p.held)
    assert not any(a.destructive for a in p.actions)
    assert '"held"' not in to_json(p)  # the JSON (an API) is as it was
    html, page = sound(to_markdown(p), unsafe=unsafe)
    assert "The delete guard held 2 destructive action(s)" in page.plain
    held = html.split("<h4>⚠️ Held by the delete guard (2)</h4>", 1)[1].split("<h4>", 1)[0]
    assert "--force" in held
    for a in p.held:
        assert f"<strong>{a.action.value}</strong> <code>{a.disk}</code>" in held
        assert f"volume {a.pool}/{a.volume}\n" in held
    # The orphan has no manifest; the tombstone's is named.
    assert (
        "<strong>no manifest</strong>: instance <code>00000000-0000-0000-0000-00000000feed" in held
    )
    assert "<strong><code>examples/manifests/old-3.yaml</code></strong>" in held


def test_each_instance_is_named_by_its_manifest_file(
    desired: Desired,  # noqa: F811 (the fixture)
) -> None:
    make, options = SCENARIOS["drifted"]
    p = plan(desired, make(desired), options)
    files = {i.instance: i.file for i in desired.instances}
    html, _ = sound(to_markdown(p), unsafe=True)
    for inst in {a.instance for a in p.actions}:
        name = f"<strong><code>{files[inst]}</code></strong>: instance <code>{inst}</code>"
        assert name in html
    # Sizes read as people read them, in the line and in the patch.
    assert "replace /size: 512 MiB" in html and "536870912" not in html


@pytest.mark.parametrize("unsafe", [True, False], ids=["html", "html-stripped"])
def test_a_hundred_new_instances_fit_with_every_action_on_its_line(
    tmp_path: Path, unsafe: bool
) -> None:
    d, p = new_instances(tmp_path, 100)
    md = to_markdown(p)
    assert len(md.encode()) <= MAX_MARKDOWN < 65_536
    html, page = sound(md, unsafe=unsafe)
    actions = items(html, "Actions (200)")
    assert len(actions) == 200
    assert all(li.startswith("<code>+</code> <strong>create</strong> <code>disk") for li in actions)
    for inst in d.instances:
        assert f"<strong><code>{inst.file}</code></strong>: instance <code>{inst.instance}" in html
    # What was left out to fit is said, and how to see it.
    assert "Shortened to fit 60,000 characters" in page.plain
    assert "the volume and patch of 200 action(s) that destroy nothing are left out" in page.plain
    assert "--max-size 0" in page.plain
    assert "not shown" not in page.plain
    # The whole comment, without a limit, has them all.
    _, whole_page = sound(to_markdown(p, max_size=0), unsafe=unsafe)
    assert whole_page.tags.get("pre", 0) == 200 and "Shortened" not in whole_page.plain


@pytest.mark.parametrize("unsafe", [True, False], ids=["html", "html-stripped"])
def test_a_thousand_new_instances_fit_and_the_rest_are_counted(
    tmp_path: Path, unsafe: bool
) -> None:
    d, p = new_instances(tmp_path, 1000)
    md = to_markdown(p)
    assert len(md.encode()) <= MAX_MARKDOWN
    html, page = sound(md, unsafe=unsafe)
    shown = items(html, "Actions (2000)")
    files = re.findall(r"<strong><code>([^<]*)</code></strong>: instance", html)
    assert 100 < len(files) < 1000 and len(shown) == 2 * len(files)
    assert files == [i.file for i in d.instances[: len(files)]]  # in plan order
    left = 1000 - len(files)
    note = f"{left:,} more instance(s) not shown, with {2 * left:,} action(s): {2 * left:,} create"
    assert page.plain.count(note) == 2  # in the note at the top and where they would be
    assert '<td align="right">2000</td>' in html  # the table counts them all


def test_many_errors_are_shown_until_the_limit_then_counted(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    for i in range(700):
        text = "apiVersion: reconciler/v1\nkind: InstanceStorage\n"
        text += f"instance: {uuid.UUID(int=0x2000 + i)}\ndisks:\n{TWO_DISKS}"
        (mdir / f"bad-{i:04d}.yaml").write_text(text.replace("size: 1GiB", "size: 1GB"))
    d = desired_from([str(mdir)], config)
    p = plan(d, observed([], POOLS), PlanOptions())
    assert len(p.errors) == 700
    md = to_markdown(p)
    assert len(md.encode()) <= MAX_MARKDOWN
    for unsafe in (True, False):
        html, page = sound(md, unsafe=unsafe)
        shown = items(html, "❌ Errors (700)")
        assert 50 < len(shown) < 700
        assert all("<code>manifest-invalid</code>" in li for li in shown)
        left = 700 - len(shown)
        assert f"{left} more error(s) not shown: {left} manifest-invalid" in page.plain


def test_names_and_messages_that_look_like_markup_are_shown_as_text(tmp_path: Path) -> None:
    """A manifest's file name is the author's: it lands in code spans and in reasons
    (a tombstone names its file), and must render as the characters it is."""
    config = example_config(tmp_path)
    mdir = tmp_path / "m"
    mdir.mkdir()
    name = "x` <img src=x onerror=alert(1)> *b* _i_ [l](javascript:x) ~s~ ``|&amp;.yaml"
    inst = str(uuid.UUID(int=0xBAD))
    (mdir / name).write_text(
        f"apiVersion: reconciler/v1\nkind: InstanceStorage\ninstance: {inst}\ndeleted: true\n"
    )
    d = desired_from([str(mdir)], config)
    assert not d.failed
    spec = DiskSpec.model_validate(
        {
            "name": "disk",
            "backend": "flat",
            "pool": "demo",
            "format": "raw",
            "size": 1 << 20,
            "source": {"template": "blank"},
            "deletionPolicy": "Delete",
        }
    )
    rec = record_for(inst, spec, f"{inst}_disk")
    p = plan(
        d, observed([rec], {"demo": {rec.volume}, "demo-fast": set()}), PlanOptions(force=True)
    )
    assert [a.action.value for a in p.actions] == ["delete"]
    assert name in p.actions[0].reason
    for unsafe in (True, False):
        _, page = sound(to_markdown(p), unsafe=unsafe)
        for tag in ("img", "a", "em", "del"):  # no image, link, emphasis or strike-through
            assert tag not in page.tags, tag
        assert page.tags.get("table") == 1  # the summary's only
        full = str(mdir / name)
        assert page.plain.count(full) == 2  # the instance's line, and the reason


def test_the_command_keeps_the_comment_under_max_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reconcile --dry-run --output markdown --observed STATE --max-size N`, as CI runs it."""
    new_instances(tmp_path, 300)  # the manifests; the command plans them
    now = datetime.datetime.now(datetime.UTC)
    config = example_config(tmp_path)
    state = tmp_path / "state.json.gz"
    exported.write(str(state), exported.document(observed([], POOLS), config, now))
    base = ["--dry-run", "--config", str(tmp_path / "config.yaml"), "--observed", str(state)]
    base += ["--output", "markdown", str(tmp_path / "manifests")]
    for extra, limit in (([], MAX_MARKDOWN), (["--max-size", "5000"], 5000)):
        assert main([*base, *extra]) == 0
        out = capsys.readouterr().out
        assert len(out.encode()) <= limit
        assert out.startswith("### reconcile plan\n\n> Planned against the observed state")
        assert f"Shortened to fit {limit:,} characters" in out
    assert main([*base, "--max-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "Shortened" not in out and out.count("<details>") == 600
    with pytest.raises(SystemExit) as exc:
        main([*base, "--max-size", "100"])
    assert exc.value.code == 2
    assert "--max-size: expected 0 (no limit) or a whole number of at least 2,000, not '100'" in (
        capsys.readouterr().err
    )
