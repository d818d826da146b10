"""Time to fail under Ceph faults, with opTimeout 5 s (docs/backends/rbd.md: the formula).

    .venv/bin/python bench/rbd_faults.py [--op-timeout 5]

On a private one-node cluster of its own (BlueStore OSD, so it keeps its data across a
stop; scripts/ceph.sh, started and removed here) and this checkout's private libvirtd:
  osd  six disks cloned from one image, `reconcile --jobs 2` paused after the image is
       imported and the first disks are cloned (fault boundary 12); the OSD is stopped,
       the run resumed. Reported: when each step failed and when the run ended, counted
       from the stop, and the error each step gave.
  mon  the monitor stopped with SIGSTOP (connections accepted, never answered), then a
       one-shot run: how long it takes to fail, counted from its start (Python's own
       start-up included).
Documented bound (docs/backends/rbd.md): a step fails within opTimeout + its local work of
meeting the outage. Printed, not asserted (the suite asserts the causes: tests/test_rbd_osd.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rbd import script  # noqa: E402
from tests.conftest_ceph import ceph_sh, private_cluster  # noqa: E402
from tests.env import ROOT, Env  # noqa: E402
from tests.rbdsite import rbd_site  # noqa: E402
from tests.test_rbd import catalog, image_file, rdisk  # noqa: E402


def run(
    env: Env, extra: dict[str, str], fault: Callable[[], float] | None
) -> tuple[int, float, list[tuple[float, str]]]:
    """Run `reconcile --jobs 2`; `fault` (if any) waits for the run to pause, causes the
    fault and returns when. The exit code, the time to the end and the timed lines, both
    counted from the fault (else from the start)."""
    start = time.monotonic()
    p = subprocess.Popen(
        env.argv("--jobs", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, **extra},
    )
    lines: list[tuple[float, str]] = []

    def reader() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append((time.monotonic(), line.rstrip()))

    t = threading.Thread(target=reader)
    t.start()
    if fault is not None:
        start = fault()
    p.wait(timeout=600)
    end = time.monotonic()
    t.join()
    return p.returncode, end - start, [(at - start, line) for at, line in lines]


# What a step may take beyond opTimeout: its local work of meeting the outage (the
# step's cleanup), and Python's start-up and exit (the runs are timed as processes).
SLACK = 2.0


def verdict(what: str, rc: int, seconds: float, bound: float) -> str:
    ok = rc != 0 and seconds <= bound
    return (
        f"target: {what}: failed (exit {rc}) in {seconds:.2f} s "
        f"(want a failure within opTimeout + {SLACK:g} s = {bound:g} s) -> "
        f"{'PASS' if ok else 'FAIL'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--op-timeout", type=float, default=5.0)
    args = ap.parse_args()
    uri = script("libvirtd.sh", "start", script("libvirt-dir.sh"))
    with (
        tempfile.TemporaryDirectory(prefix="bench-rbd-faults-") as tmp,
        private_cluster("bench-faults", RECONCILER_CEPH_OBJECTSTORE="bluestore") as c,
    ):
        d: Path = c.dir  # type: ignore[attr-defined]
        with rbd_site(c, uri) as site:
            env = site.env(Path(tmp) / "env", namespace="faults", op_timeout=args.op_timeout)
            env.safety = {"maxDeletePercent": 100}
            env.images = {"a": catalog(image_file(Path(tmp) / "a.raw"), "raw")}
            env.write_config()
            for i in range(6):
                env.manifest(f"vm{i}", [rdisk("root", size="16MiB", image="a", template=None)])
            flag = Path(tmp) / "paused"

            def stop_osd() -> float:
                while not flag.exists():
                    time.sleep(0.01)
                ceph_sh("stop-osd", str(d))
                at = time.monotonic()
                flag.unlink()
                return at

            rc, total, lines = run(env, {"RECONCILER_PAUSE_AT": f"12:{flag}"}, stop_osd)
            osd = (rc, total)
            print(
                f"osd: opTimeout {args.op_timeout:g} s; the run exited {rc} "
                f"{total:.2f} s after the stop"
            )
            for at, line in lines:
                if line.startswith(("FAILED", "reconcile: error")):
                    print(f"  {at:6.2f} s  {line[:220]}")
            ceph_sh("start-osd", str(d))
            pid = int((d / "run" / "mon.a.pid").read_text())
            os.kill(pid, signal.SIGSTOP)
            try:
                rc, total, lines = run(env, {}, None)
            finally:
                os.kill(pid, signal.SIGCONT)
            mon = (rc, total)
            print(f"mon: opTimeout {args.op_timeout:g} s; the run exited {rc} after {total:.2f} s")
            for at, line in lines:
                if "cannot connect" in line and "!" in line:
                    print(f"  {at:6.2f} s  {line.strip()[:220]}")
    print(
        f"bound (docs/backends/rbd.md): opTimeout + local work = {args.op_timeout:g} s"
        " + local work per step"
    )
    bound = args.op_timeout + SLACK
    print(verdict("OSD stopped mid-apply, the run's end after the stop", *osd, bound))
    print(verdict("monitor unreachable, a one-shot run from its start", *mon, bound))


if __name__ == "__main__":
    main()
