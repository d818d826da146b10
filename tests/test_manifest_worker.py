"""Loading manifests with a forked worker gives exactly what a sequential load gives.

A directory above the fork threshold, with valid manifests (some in the plain subset, some
not) and every broken one of the corpus, is loaded both ways; the results must be equal
down to each error's file, line, column and field, and `reconcile validate` must print the
same. A worker that crashes, raises or stops
sending is replaced by loading its files here; none outlives its load.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reconciler.schema import load, manifestdir
from reconciler.schema.config import Config
from reconciler.schema.load import FailedManifest, LoadedManifest, load_config, load_manifest
from reconciler.schema.manifestdir import FORK_THRESHOLD, ManifestLoad
from reconciler.schema.speed import worker
from reconciler.schema.speed.mcache import ManifestCache
from reconciler.schema.speed.worker import Worker

# Alone, in a process of one thread: a worker forks only where no other thread runs, and
# an xdist worker has execnet's (can_fork() is False there, so nothing here would fork).
pytestmark = pytest.mark.serial

CORPUS = Path(__file__).resolve().parent / "corpus"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Result = tuple[list[LoadedManifest], list[FailedManifest]]


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(str(CORPUS / "config.yaml"))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory, config: Config) -> Path:
    """Copies of the valid corpus manifests (new instance ids; some moved outside the
    plain subset) and every broken manifest that loading reports rather than raises."""
    d = tmp_path_factory.mktemp("many")
    valid = sorted((CORPUS / "valid").iterdir())
    for i in range(FORK_THRESHOLD):
        src = valid[i % len(valid)].read_text()
        text = UUID.sub(str(uuid.UUID(int=i + 1)), src, count=1)
        if i % 7 == 0:
            text = "---\n" + text  # a document marker: not in the subset, read by libyaml
        (d / f"v{i:04d}.yaml").write_text(text)
    for p in sorted((CORPUS / "manifests").iterdir()):
        try:
            load_manifest(str(p), config)
        except Exception:  # the corpus's xfails: loading raises, both ways alike
            continue
        shutil.copy(p, d / f"x{p.name}")
    return d


def sequential(d: Path, config: Config, cache: ManifestCache | None = None) -> Result:
    with ManifestLoad([str(d)], config, cache, fork_threshold=sys.maxsize) as loading:
        assert loading.worker is None
        return loading.finish()


def forked(d: Path, config: Config, cache: ManifestCache | None = None) -> Result:
    with ManifestLoad([str(d)], config, cache) as loading:
        assert loading.worker is not None, "no worker was forked"
        return loading.finish()


def describe(result: Result) -> tuple[list[Any], list[Any]]:
    """Everything a load returns, in comparable form."""
    loaded, failed = result
    return (
        [(lm.file, lm.manifest, lm.disk_lines) for lm in loaded],
        [
            (
                f.file,
                f.instance,
                [(e.location.file, e.location.line, e.location.column, e.field, e.message)
                 for e in f.errors],
            )
            for f in failed
        ],
    )  # fmt: skip


@pytest.fixture
def worker_does_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process claims nothing, so the worker loads every file: deterministic."""
    monkeypatch.setattr(Worker, "claim", lambda self: None)


def in_worker(parent: int, file_suffix: str, act: Callable[[], None]) -> None:
    """Make load_manifest run `act` in the worker when it reaches a file named *suffix."""
    real = load.load_manifest

    def patched(path: str, config: Config | None) -> LoadedManifest | FailedManifest:
        if os.getpid() != parent and path.endswith(file_suffix):
            act()
        return real(path, config)

    load.load_manifest = patched


@pytest.fixture
def restore_load_manifest() -> Iterator[None]:
    real = load.load_manifest
    yield
    load.load_manifest = real


# -- the same results -----------------------------------------------------------------


def test_forked_load_equals_sequential_load(manifests: Path, config: Config) -> None:
    want = describe(sequential(manifests, config))
    loaded, failed = want
    assert len(loaded) == FORK_THRESHOLD and len(failed) > 150
    assert any(e[1] is not None and e[2] is not None for f in failed for e in f[2])  # line:col
    assert describe(forked(manifests, config)) == want


def test_a_worker_that_loads_everything_gives_the_same(
    manifests: Path, config: Config, worker_does_everything: None
) -> None:
    assert describe(forked(manifests, config)) == describe(sequential(manifests, config))


def test_the_cache_a_forked_load_writes_is_the_sequential_one(
    manifests: Path, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.schema.speed import mcache

    monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))  # trust files just written
    forked(manifests, config, ManifestCache(tmp_path / "forked.json"))
    sequential(manifests, config, ManifestCache(tmp_path / "sequential.json"))
    assert (tmp_path / "forked.json").read_bytes() == (tmp_path / "sequential.json").read_bytes()
    hits = ManifestCache(tmp_path / "forked.json")
    again = sequential(manifests, config, hits)
    assert len(hits.fresh) == FORK_THRESHOLD
    assert describe(again) == describe(sequential(manifests, config))


# -- a worker that fails ----------------------------------------------------------------


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise() -> None:
    raise RuntimeError("injected")


@pytest.mark.parametrize(
    ("act", "why"),
    [(_crash, "killed by signal 9"), (_raise, "RuntimeError: injected")],
    ids=["killed", "raises"],
)
def test_a_failing_worker_is_replaced_by_this_process(
    manifests: Path,
    config: Config,
    worker_does_everything: None,
    restore_load_manifest: None,
    act: Callable[[], None],
    why: str,
) -> None:
    want = describe(sequential(manifests, config))
    in_worker(os.getpid(), "v0100.yaml", act)
    with capture_logs() as logs:
        got = describe(forked(manifests, config))
    assert got == want
    (warning,) = [e for e in logs if e["event"] == "manifests.worker_failed"]
    assert why in warning["why"] and warning["loading_here"] > 0


def test_a_stalled_worker_is_stopped_and_replaced(
    manifests: Path,
    config: Config,
    worker_does_everything: None,
    restore_load_manifest: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "STALL_S", 0.2)
    stuck_r, stuck_w = os.pipe()  # read in the worker, written by nobody: it blocks for good
    want = describe(sequential(manifests, config))
    in_worker(os.getpid(), "v0100.yaml", lambda: print(os.read(stuck_r, 1)))
    try:
        with capture_logs() as logs, ManifestLoad([str(manifests)], config) as loading:
            w = loading.worker
            assert w is not None
            pid = w.pid
            got = describe(loading.finish())
    finally:
        os.close(stuck_r)
        os.close(stuck_w)
    assert got == want
    (warning,) = [e for e in logs if e["event"] == "manifests.worker_failed"]
    assert "sent nothing for 0.2 s" in warning["why"]
    assert pid is not None and w.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already


# -- when not to fork, and cleaning up --------------------------------------------------


def test_small_inputs_are_loaded_without_a_fork(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fork() -> int:
        raise AssertionError("forked for a handful of manifests")

    monkeypatch.setattr(os, "fork", no_fork)
    for p in sorted((CORPUS / "valid").iterdir()):
        shutil.copy(p, tmp_path / p.name)
    with ManifestLoad([str(tmp_path)], config) as loading:
        assert loading.worker is None
        loaded, failed = loading.finish()
    assert len(loaded) == 4 and not failed


def test_a_load_left_unfinished_leaves_no_worker(manifests: Path, config: Config) -> None:
    with ManifestLoad([str(manifests)], config) as loading:
        w = loading.worker
        assert w is not None and w.pid is not None
        pid = w.pid
    assert w.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_no_fork_while_another_thread_runs() -> None:
    """In a process of its own: a thread started here would linger in /proc/self/task a
    moment after join() and keep the other tests of this file from forking."""
    code = (
        "import threading\n"
        "from reconciler.schema.speed.worker import Worker, can_fork\n"
        "release = threading.Event()\n"
        "t = threading.Thread(target=release.wait)\n"
        "t.start()\n"
        "print(can_fork(), Worker.start(10, lambda i: i))\n"
        "release.set()\n"
        "t.join()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None"]


def test_worker_results_come_back_in_place() -> None:
    """The engine alone: every job's plain result, wherever each side ran it."""
    w = Worker.start(1000, lambda i: [i, str(i), {"n": i}])
    assert w is not None
    got: dict[int, Any] = {}
    try:
        while (chunk := w.claim()) is not None:
            got.update((i, [i, str(i), {"n": i}]) for i in chunk)
            got.update(w.poll())
        got.update(w.wait())
        assert w.missing() == [] and w.failure is None
    finally:
        w.close()
    assert got == {i: [i, str(i), {"n": i}] for i in range(1000)}


def test_validate_prints_the_same_with_and_without_a_worker(
    manifests: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.commands import cli

    started: list[Worker | None] = []
    real_start = Worker.start

    def spy(n: int, job: Callable[[int], Any], then: Any = None) -> Worker | None:
        started.append(real_start(n, job, then))
        return started[-1]

    monkeypatch.setattr(Worker, "start", spy)
    argv = ["validate", "--config", str(CORPUS / "config.yaml"), str(manifests)]
    forked_rc = cli.main(argv)
    forked_out = capsys.readouterr()
    assert started and started[0] is not None
    monkeypatch.setattr(worker, "can_fork", lambda: False)
    sequential_rc = cli.main(argv)
    sequential_out = capsys.readouterr()
    assert started[-1] is None
    assert (forked_rc, forked_out.out, forked_out.err) == (
        sequential_rc,
        sequential_out.out,
        sequential_out.err,
    )
    assert forked_rc == 1 and f"{FORK_THRESHOLD} valid" in forked_out.out
    assert re.search(r"^error: .*/x\d{3}-[a-z0-9-]+\.yaml:\d+:\d+: ", forked_out.err, re.M)


# -- the manifest cache, written by the worker -------------------------------------------


@pytest.fixture
def trust_new_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.schema.speed import mcache

    monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))


def test_the_worker_writes_the_cache_and_close_waits_for_it(
    manifests: Path, config: Config, tmp_path: Path, trust_new_files: None
) -> None:
    path = tmp_path / "cache.json"
    with ManifestLoad([str(manifests)], config, ManifestCache(path)) as loading:
        loading.finish()
        w = loading.worker
        assert w is not None and w.handed
    assert w.pid is None and w.failure is None
    assert len(ManifestCache(path).entries) == FORK_THRESHOLD


def test_a_cache_the_worker_cannot_write_is_reported(
    manifests: Path, config: Config, tmp_path: Path, trust_new_files: None
) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "cache.json"  # its directory is a file: mkdir fails
    cache = ManifestCache(path)
    with capture_logs() as logs, ManifestLoad([str(manifests)], config, cache) as loading:
        loading.finish()
    (warning,) = [e for e in logs if e["event"] == "manifest_cache.write_failed"]
    assert warning["error"].startswith("FileExistsError") and warning["path"] == str(path)


def test_a_worker_killed_while_writing_the_cache_is_reported(
    manifests: Path,
    config: Config,
    tmp_path: Path,
    trust_new_files: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manifestdir, "write_document", lambda path, doc: _crash())
    path = tmp_path / "cache.json"
    cache = ManifestCache(path)
    with capture_logs() as logs, ManifestLoad([str(manifests)], config, cache) as loading:
        loading.finish()
    (warning,) = [e for e in logs if e["event"] == "manifest_cache.write_failed"]
    assert "killed by signal 9" in warning["error"]
    assert not path.exists()


def test_a_worker_that_takes_no_hand_off_is_stopped_and_the_cache_written_here(
    manifests: Path,
    config: Config,
    tmp_path: Path,
    trust_new_files: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "STALL_S", 0.2)
    stuck_r, stuck_w = os.pipe()  # read in the worker, written by nobody: it blocks for good
    monkeypatch.setattr(worker, "_then", lambda then, then_fd, fd: os.read(stuck_r, 1))
    path = tmp_path / "cache.json"
    try:
        with ManifestLoad([str(manifests)], config, ManifestCache(path)) as loading:
            loading.finish()
            w = loading.worker
            assert w is not None and not w.handed and w.pid is None
            assert w.failure is not None and "took nothing" in w.failure
    finally:
        os.close(stuck_r)
        os.close(stuck_w)
    assert len(ManifestCache(path).entries) == FORK_THRESHOLD
