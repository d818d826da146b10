"""Progress of long steps (reconciler/util/progress.py): qemu-img's own percentages read
as it converts and compares, raw copies counted as they go, lines on a terminal and off
it, the loop's metrics and `reconcile status` from what a loop publishes, and a real
migration showing its convert and verify with instance, disk and action named."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.control.metrics import Metrics
from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import compare_argv, convert_argv
from reconciler.drivers.host.run import execute
from reconciler.util import logs, progress
from tests.env import Env, disk

MiB = 1 << 20


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_update(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_PROGRESS_EVERY", "0")


def data_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for i in range(0, size, MiB):
            f.write(bytes([i // MiB % 251 + 1]) * MiB)
    return path


@pytest.fixture
def reached(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """Every (step, done, total) a task reached, in order."""
    seen: list[tuple[str, int, int]] = []
    real = progress.Task._set

    def spy(self: progress.Task, done: int) -> None:
        real(self, done)
        seen.append((self.what, self.done, self.total))

    monkeypatch.setattr(progress.Task, "_set", spy)
    yield seen


def test_qemu_img_reports_its_percentages_to_the_open_task(
    tmp_path: Path, reached: list[tuple[str, int, int]]
) -> None:
    src = data_file(tmp_path / "src.raw", 64 * MiB)
    dst = tmp_path / "dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst), "64M"], check=True)
    with progress.acting("migrate", "i-1", "disk"), progress.task("convert", 64 * MiB) as t:
        res = execute(convert_argv("raw", "qcow2", str(src), str(dst)), (), "convert")
        assert res.returncode == 0, res.stderr
        assert res.args[:3] == ["qemu-img", "convert", "-p"]
        assert "100" not in res.stdout  # the percentages were read, not kept as output
        assert t.done == 64 * MiB
        assert t.snapshot().action == "migrate" and t.snapshot().instance == "i-1"
    dones = [d for what, d, _ in reached if what == "convert"]
    assert len(dones) >= 3 and dones == sorted(dones) and dones[-1] == 64 * MiB
    with progress.task("verify", 64 * MiB) as t:
        same = execute(compare_argv("raw", "qcow2", str(src), str(dst)), (), "compare")
        assert same.returncode == 0 and "-q" not in same.args and t.done == 64 * MiB
        subprocess.run(  # make them differ: compare still says so by its status
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0 0 4k", str(dst)],
            check=True,
            capture_output=True,
        )
        differ = execute(compare_argv("raw", "qcow2", str(src), str(dst)), (), "compare")
        assert differ.returncode == 1, differ.stdout + differ.stderr
    # Without a task the command line is as built (no -p), output untouched.
    plain = execute(compare_argv("raw", "raw", str(src), str(src)), (), "compare")
    assert plain.returncode == 0 and plain.args[:3] == ["qemu-img", "compare", "-q"]


def test_a_raw_copy_counts_its_bytes_holes_included(
    tmp_path: Path, reached: list[tuple[str, int, int]]
) -> None:
    src = tmp_path / "sparse"
    with src.open("wb") as f:
        f.truncate(256 * MiB)
        f.seek(200 * MiB)
        f.write(b"x" * MiB)
    dst = tmp_path / "copy"
    dst.touch()
    os.truncate(dst, 256 * MiB)
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        raw_copy(FileSource(fs, "sparse"), FileSink(fd, "copy"))
    finally:
        os.close(fs)
        os.close(fd)
    steps = [(d, t) for what, d, t in reached if what == "copy sparse"]
    assert steps and steps[-1] == (201 * MiB, 256 * MiB)  # its last extent's end
    assert dst.read_bytes()[200 * MiB : 200 * MiB + 4] == b"xxxx"


def test_lines_on_a_terminal_and_off_it(
    every_update: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    with progress.acting("create", "inst", "root"), progress.task("fetch img", 4 * MiB) as t:
        t.advance(MiB)
        t.advance(MiB)
    text = tty.getvalue()
    assert logs.CLEAR_LINE + "create inst/root: fetch img: 2.0 MiB of 4.0 MiB (50%) at " in text
    assert " left" in text and text.endswith(logs.CLEAR_LINE)  # the line is gone at the end
    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    logs.configure(logs.WARNING)  # a one-shot run's log: its own key=value line
    with progress.acting("migrate", "inst", "root"), progress.task("convert to p/v", 8 * MiB) as t:
        t.reach(0.25)
    line = plain.getvalue().strip().splitlines()[-1]
    assert line.startswith("progress action=migrate instance=inst disk=root ")
    fields = dict(
        kv.split("=", 1) for kv in line.split(" ", 1)[1].replace('"convert to p/v"', "c").split()
    )
    assert (fields["done"], fields["total"], fields["percent"]) == (
        str(2 * MiB),
        str(8 * MiB),
        "25.0",
    )


def test_metrics_and_status_show_the_steps_under_way(
    every_update: None, env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = Metrics()
    state = Path(json.loads(env.config_path.read_text())["state"]["dir"])
    state.mkdir(parents=True, exist_ok=True)
    progress.publish_to(state / progress.PROGRESS_FILE)
    try:
        with progress.acting("migrate", "inst-1", "root"), progress.task("verify x", 10 * MiB) as t:
            t.advance(3 * MiB)
            got = {
                (s.name, tuple(sorted(smp.labels.items())), smp.value)
                for s in metrics.registry.collect()
                if s.name.startswith("reconcile_step_")
                for smp in s.samples
            }
            labels = (
                ("action", "migrate"),
                ("disk", "root"),
                ("instance", "inst-1"),
                ("step", "verify"),
            )
            assert got == {
                ("reconcile_step_done_bytes", labels, 3 * MiB),
                ("reconcile_step_size_bytes", labels, 10 * MiB),
            }
            published = progress.read_published(state / progress.PROGRESS_FILE)
            assert [(p["instance"], p["done"], p["total"]) for p in published] == [
                ("inst-1", 3 * MiB, 10 * MiB)
            ]
            rc, out, err = env.main(["status", "--config", str(env.config_path)])
            assert rc == 0, err
            assert "Under way:\n  migrate inst-1/root: verify x: 3.0 MiB of 10.0 MiB (30%)" in out
        # Ended: gone from the metrics and from the published file.
        assert not [
            s
            for s in metrics.registry.collect()
            if s.name.startswith("reconcile_step") and s.samples
        ]
        assert progress.read_published(state / progress.PROGRESS_FILE) == []
    finally:
        progress.publish_to(None)


def test_a_published_file_of_a_loop_that_is_gone_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / progress.PROGRESS_FILE
    child = subprocess.Popen(["true"])
    child.wait()
    item = {"action": "create", "instance": "i", "disk": "d", "step": "copy", "done": 1,
            "total": 2, "rate": 1, "eta": 1, "started": 0}  # fmt: skip
    path.write_text(json.dumps({"pid": child.pid, "written": 0, "running": [item]}))
    assert progress.read_published(path) == []
    path.write_text(json.dumps({"pid": os.getpid(), "written": 0, "running": [item]}))
    assert progress.read_published(path) == [item]
    path.write_text("{not json")
    assert progress.read_published(path) == []


def test_a_migration_shows_its_convert_and_verify(env: Env) -> None:
    inst = env.manifest("m", [disk("d", size="64MiB")])
    assert env.run()[0] == 0
    with env.volume(inst, "d").open("r+b") as f:
        f.write(os.urandom(32 * MiB))
    env.manifest("m", [disk("d", backend="qcow2", fmt="qcow2", size="64MiB")], instance=inst)
    res = env.subprocess(env={"RECONCILER_PROGRESS_EVERY": "0"})
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("progress ")]
    steps = {ln.split('step="', 1)[1].split(" ", 1)[0] for ln in lines if 'step="' in ln}
    assert steps == {"convert", "verify"}, res.stderr
    assert all(f"action=migrate instance={inst} disk=d " in ln for ln in lines)
    assert any("percent=100.0" in ln for ln in lines)


def test_qemu_img_progress_with_descriptors_numbered_past_1024(tmp_path: Path) -> None:
    """apply raises its descriptor limit and may hold many open: select() cannot watch a
    descriptor past 1024, so qemu-img's output is polled."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the hard descriptor limit here is {hard}: this test needs 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        src = data_file(tmp_path / "src.raw", 8 * MiB)
        with progress.task("verify", 8 * MiB) as t:
            res = execute(compare_argv("raw", "raw", str(src), str(src)), (), "compare")
            assert res.returncode == 0, res.stderr
            assert t.done == 8 * MiB
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
