#!/usr/bin/env bash
# `make test-latest`: the suite in a throwaway venv of the newest releases that
# pyproject.toml's ranges allow (not the lock), so a release that breaks us is seen the day
# we choose to look. Prints which packages differ from requirements.lock, then runs pytest
# (arguments are passed on). The private libvirtd must be running (the Makefile starts it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/uv.sh
. scripts/uv.sh
ensure_uv
dir=$(mktemp -d "${TMPDIR:-/tmp}/reconciler-latest.XXXXXX")
trap 'rm -rf --one-file-system "$dir"' EXIT
"$UV" venv -q --python "$(command -v python3)" "$dir/venv"
# --refresh: ask the index again rather than trust cached metadata of what is newest.
"$UV" pip install -q --compile-bytecode --python "$dir/venv/bin/python" --refresh --resolution highest -e '.[test]'
# As in .venv: Debian's Ceph modules, where they are installed.
if [ "$(dpkg-query -W -f='${Status}' python3-rados 2>/dev/null)" = "install ok installed" ]; then
    link_debian_ceph "$dir/venv"
fi
"$UV" pip freeze -q --python "$dir/venv/bin/python" --exclude-editable | python3 -c '
import re, sys
locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.lock").read(), re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(k): v for k, v in locked.items()}
newer = []
for line in sys.stdin:
    m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
    if m and locked.get(norm(m[1])) != m[2]:
        was = locked.get(norm(m[1]), "(not locked)")
        newer.append(f"{m[1]} {was} -> {m[2]}")
print("test-latest: differs from the lock: " + (", ".join(newer) if newer else "nothing"))
'
"$dir/venv/bin/python" -m pytest "$@"
