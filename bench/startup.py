"""Benchmark: how long `reconcile` takes to start, against a bare Python start.

    .venv/bin/python bench/startup.py [--rounds 15]

Each round runs, one after the other (so that a busy machine slows them alike), as new
processes: `python -c pass` (the floor: the interpreter and site, .venv's included),
`reconcile --version`, `reconcile validate --help` and `reconcile --help` (the default
command's parser, which loads the planner). Figures are medians over the rounds after
one untimed round, with their ranges; the cost is the median less the floor's.

`reconcile --version` and `NAME --help` import only what they print: cli.py imports a
subcommand's module when it runs (SUBCOMMANDS maps a name to a module), the exit codes
are in commands/exits.py, and a subcommand imports the schema only after its arguments
are parsed (commands/common.read_config). Before that, every command's modules were
imported at start: 1.75-2.08 s for `reconcile --version` on this 2-CPU machine under
load, 0.85 s of it pydantic models (python -X importtime).

Target: `reconcile --version` <= 0.15 s. Reported, not asserted: exit 0 unless a command
failed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"
TARGET_S = 0.15

CASES = {
    "python -c pass": [str(PYTHON), "-c", "pass"],
    "reconcile --version": [str(RECONCILE), "--version"],
    "reconcile validate --help": [str(RECONCILE), "validate", "--help"],
    "reconcile --help": [str(RECONCILE), "--help"],
}


def once(argv: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed (exit {res.returncode}):\n{res.stderr}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    for argv in CASES.values():  # untimed: page cache, .pyc files
        once(argv)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, argv in CASES.items():
            times[name].append(once(argv))
    floor = statistics.median(times["python -c pass"])
    print(f"{'command':28} {'median':>8} {'range':>17} {'over floor':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28} {med:7.3f}s {min(ts):7.3f}-{max(ts):7.3f}s {med - floor:+10.3f}s")
    version = statistics.median(times["reconcile --version"])
    verdict = "PASS" if version <= TARGET_S else "FAIL"
    print(f"target: reconcile --version: {version:.3f} s (want <= {TARGET_S} s) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
