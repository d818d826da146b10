#!/usr/bin/env bash
# `make test`'s pytest, in two phases (docs/development.md, "Tests run in parallel"):
#   1. parallel: every test not marked `serial`, on 3 pytest-xdist workers, one file per
#      worker at a time (--dist loadfile), heaviest files first (tests/conftest_xdist.py);
#      a worker that dies is not replaced (--max-worker-restart=0: a replaced worker can
#      hang the run, see tests/conftest_xdist.py), so the run ends with the crash named;
#   2. serial: the tests marked `serial`, in one process, alone.
#
#   scripts/pytest-phases.sh [PYTEST_ARGS...]    # what `make test PYTEST_ARGS=...` runs
#
# PYTEST_ARGS go to both phases, after the phase's own: `-n 0` runs the first phase in
# one process too, a `-m` of one's own replaces the phase's marker selection. A phase that
# selects no test (pytest's exit 5) is no failure, unless neither phase selects any.
# Each phase is stopped past its limit ($RECONCILER_PYTEST_TIMEOUT, default 2400 s, and
# $RECONCILER_PYTEST_SERIAL_TIMEOUT, default 1200 s; CI kills the whole run at 5400 s):
# SIGUSR1 first, on which every pytest process prints its threads' stacks, SIGKILL 30 s
# later, then the test each process was running is printed. Both phases always run; the
# exit status is the first failing phase's, and the last line counts both phases' tests.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

workers=${RECONCILER_PYTEST_WORKERS:-3}
run=$(pwd -P)/.run/pytest
export RECONCILER_PYTEST_NOW="$run/now" RECONCILER_PYTEST_COUNTS="$run/counts"
rm -rf "$run"
mkdir -p "$run" "$RECONCILER_PYTEST_COUNTS"

# phase NAME LIMIT PYTEST_ARGS...: its exit status.
phase() {
    local name=$1 limit=$2 pid rc start=$SECONDS
    shift 2
    rm -rf "$RECONCILER_PYTEST_NOW"
    echo "pytest-phases: $name phase: pytest $*"
    # In the background, so that Ctrl-C or a TERM reaches pytest through timeout (which
    # runs it in a process group of its own) instead of leaving it running.
    RECONCILER_PYTEST_PHASE=$name timeout -s USR1 -k 30 "$limit" .venv/bin/pytest "$@" &
    pid=$!
    trap 'kill -INT $pid 2>/dev/null' INT
    trap 'kill -TERM $pid 2>/dev/null' TERM
    while :; do
        wait "$pid"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives: wait again.
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - INT TERM
    echo "pytest-phases: $name phase: exit $rc after $((SECONDS - start)) s"
    if [ $((SECONDS - start)) -ge "$limit" ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
        echo "pytest-phases: the $name phase ran past its $limit s and was stopped" \
            "(each pytest process printed its stacks on SIGUSR1, above); it was running:"
        cat "$RECONCILER_PYTEST_NOW"/* 2>/dev/null || echo "  (no test)"
        # Its pytest wrote no counts: the stopped phase counts as one failed test.
        echo '{"failed": 1}' >"$RECONCILER_PYTEST_COUNTS/$name-stopped.json"
    fi
    return $rc
}

# faulthandler_timeout only here: its watchdog is a thread, and the serial phase's
# manifest-worker tests need a process of one thread (a forked worker starts only there).
# Past it (a test stuck in C, deaf to pytest-timeout's SIGALRM at 600 s) the worker prints
# its stacks and exits, and the run ends instead of waiting on it.
phase parallel "${RECONCILER_PYTEST_TIMEOUT:-2400}" \
    -n "$workers" --dist loadfile --no-loadscope-reorder --max-worker-restart=0 \
    -o faulthandler_timeout=720 -o faulthandler_exit_on_timeout=true \
    -m "not serial" "$@"
rc1=$?
phase serial "${RECONCILER_PYTEST_SERIAL_TIMEOUT:-1200}" -n 0 -m serial "$@"
rc2=$?

# Both phases' counts, as one closing line (each phase's controller wrote its own).
python3 - "$RECONCILER_PYTEST_COUNTS" <<'PY'
import json, pathlib, sys
total = {"passed": 0, "failed": 0, "skipped": 0}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for k, v in json.loads(f.read_text()).items():
        total["failed" if k == "error" else k] = total.get("failed" if k == "error" else k, 0) + v
print(f"tests: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
PY

for rc in $rc1 $rc2; do
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
if [ $rc1 -eq 5 ] && [ $rc2 -eq 5 ]; then
    echo "pytest-phases: no test selected in either phase"
    exit 5
fi
exit 0
