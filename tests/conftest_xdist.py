"""How `make test` runs the suite in parallel (docs/development.md, "Tests run in parallel").

scripts/pytest-phases.sh runs pytest twice: the tests not marked `serial` under
pytest-xdist (3 workers, `--dist loadfile`: a file's tests run in order in one worker,
different files at once against the same libvirtd, Ceph cluster and, per worker, its own
LVM VG), then the `serial` ones in one process. This module, whose hooks tests/conftest.py
takes in, does the rest:

- Heaviest files first (`HEAVY_FIRST`, measured): xdist hands out files in collection
  order (with `--no-loadscope-reorder`), so the long ones start at once and the short ones
  fill in at the end, and the workers finish together.
- A worker that dies (librbd aborts the whole process: "Fatal Python error: Aborted") is
  not replaced (`--max-worker-restart=0`): pytest-xdist 3.8 re-runs the crashed test in
  the replacement, and with `--dist loadfile` a replacement given a single test waits
  forever for a second one (the run that hung until CI's 5,400 s limit; reproduced with a
  throwaway test calling os.abort()). The run then ends once the other workers finish the
  files they have, and the summary names the crash and every test it left unrun.
- Per test: pytest-timeout fails a test after `timeout` seconds (SIGALRM, with every
  thread's stack; pyproject.toml); in the parallel phase, faulthandler ends the worker
  after `faulthandler_timeout` seconds where the test is stuck in C and never sees the
  signal (reproduced with a test deadlocked in pthread_mutex_lock), and the run ends.
- Per phase: scripts/pytest-phases.sh stops pytest past its limit, first sending SIGUSR1,
  on which every pytest process prints its threads' stacks (registered here), and prints
  which test each process was running ($RECONCILER_PYTEST_NOW, one file per process).
- The summary lists the slowest files (their tests' setup, call and teardown added up),
  for keeping `HEAVY_FIRST` true.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time
from collections import defaultdict
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Slowest first, as measured (`make test` prints the slowest files at its end; seconds in
# the parallel phase of a full run, 2026-12-07, load average 7-15). Files not named here
# run after these, in collection order: name a new file that takes over a minute.
HEAVY_FIRST = [
    "test_encryption.py",  # 733 s: it alone sets the phase's shortest possible time
    "test_rbd_crash.py",  # 382
    "test_lvm.py",  # 338
    "test_boot.py",  # 310
    "test_lvm_migrate.py",  # 262
    "test_rbd_migrate.py",  # 148
    "test_loop.py",  # 84
    "test_rbd.py",  # 83
    "test_guest_boot.py",  # 80
    "test_rbd_hosts.py",  # 80
    "test_crash.py",  # 80
    "test_crash_migrate.py",  # 59
    "test_store_faults.py",  # 53
    "test_images.py",  # 53
    "test_ploop.py",  # 48
    "test_saved_plan.py",  # 48
    "test_plainyaml.py",  # 46
    "test_planner_properties.py",  # 41
    "test_retry_libvirt.py",  # 38
    "test_rbd_osd.py",  # 33
    "test_import_nova.py",  # 33
    "test_docs.py",  # 26
    "test_observed_state.py",  # 26
    "test_demo.py",  # 25
    "test_json_schema.py",  # 22
]

_stderr_copy: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    """SIGUSR1 prints every thread's stack on the real stderr (not a test's captured one),
    in the controller and in each worker alike."""
    global _stderr_copy
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            _stderr_copy = os.dup(2)
    else:
        _stderr_copy = os.dup(2)
    faulthandler.register(signal.SIGUSR1, file=_stderr_copy, all_threads=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def _now_file() -> Path | None:
    d = os.environ.get("RECONCILER_PYTEST_NOW")
    if not d:
        return None
    return Path(d) / (os.environ.get("PYTEST_XDIST_WORKER") or f"pid-{os.getpid()}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Say which test this process runs, for a phase that runs past its limit."""
    now = _now_file()
    if now is not None:
        now.parent.mkdir(parents=True, exist_ok=True)
        now.write_text(f"{item.nodeid} (since {time.strftime('%H:%M:%S')})\n")
    try:
        return (yield)
    finally:
        if now is not None:
            now.unlink(missing_ok=True)


class _Run:
    """What the controller (or the one process) saw: which tests were collected and
    reported, which workers died, and each file's time."""

    def __init__(self) -> None:
        self.collected: set[str] = set()
        self.reported: set[str] = set()
        self.crashed: list[str] = []
        self.file_time: dict[str, float] = defaultdict(float)


_run = _Run()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: Sequence[str]) -> None:
    _run.collected.update(ids)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    if error:
        _run.crashed.append(f"{node.gateway.id}: {error}")
        # Its test is no longer running (the crash is reported instead).
        now = os.environ.get("RECONCILER_PYTEST_NOW")
        if now:
            (Path(now) / node.gateway.id).unlink(missing_ok=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _run.reported.add(report.nodeid)
    _run.file_time[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    tr = terminalreporter
    counts = os.environ.get("RECONCILER_PYTEST_COUNTS")
    if counts and not hasattr(config, "workerinput"):  # for scripts/pytest-phases.sh's total
        phase = os.environ.get("RECONCILER_PYTEST_PHASE", "pytest")
        kinds = ("passed", "failed", "skipped", "error")
        n = {k: len(tr.stats.get(k, [])) for k in kinds}
        Path(counts).mkdir(parents=True, exist_ok=True)
        (Path(counts) / f"{phase}.json").write_text(json.dumps(n))
    if _run.crashed:
        unrun = sorted(_run.collected - _run.reported)
        tr.write_sep("=", "a pytest worker died; workers are not replaced", red=True)
        for line in _run.crashed:
            tr.write_line(f"worker {line}")
        by_file: dict[str, int] = defaultdict(int)
        for nodeid in unrun:
            by_file[nodeid.split("::", 1)[0]] += 1
        tr.write_line(
            f"{len(unrun)} tests never ran (the crashed file's rest and the files not yet started):"
        )
        for name, count in sorted(by_file.items()):
            tr.write_line(f"  not run: {name} ({count} tests)")
    slow = sorted(_run.file_time.items(), key=lambda kv: -kv[1])[:25]
    if slow and sum(t for _, t in slow) > 60:
        tr.write_sep("-", "slowest files (s, their tests' setup + call + teardown)")
        for name, seconds in slow:
            tr.write_line(f"{seconds:8.1f}  {name}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A crashed worker fails the run even where its test's report was lost."""
    if _run.crashed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
