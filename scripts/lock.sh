#!/usr/bin/env bash
# Refresh the lock files deliberately (`make lock`): every Python dependency, direct and
# transitive, pinned to one version with the sha256 of each of its files.
#
#   scripts/lock.sh             # newest releases pyproject.toml's ranges allow
#   scripts/lock.sh --keep      # keep current pins where they still fit (after an edit)
#
# requirements.lock is pip's hash-checking format: `pip install --require-hashes -r` reads
# it as well as `uv pip sync`, and it names no index. It is universal (Python 3.11 to 3.13,
# any platform). Its first line records a hash of pyproject.toml's dependency lists, so
# scripts/setup.sh notices a range changed without a new lock. setuptools is locked too:
# it builds libvirt-python (an sdist) and this package, so the build uses locked bytes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/uv.sh
. scripts/uv.sh

upgrade=(--upgrade)
if [ "${1:-}" = --keep ]; then upgrade=(); fi
ensure_uv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'setuptools>=68\n' >"$tmp/build.in"
[ -f requirements.lock ] && cp requirements.lock "$tmp/out.txt"
"$UV" pip compile -q pyproject.toml "$tmp/build.in" --extra test --universal \
    --python-version 3.11 --generate-hashes --no-header --no-annotate "${upgrade[@]}" \
    -o "$tmp/out.txt"
{
    echo "# deps-sha256: $(deps_hash)"
    echo "# Made by scripts/lock.sh (make lock) from pyproject.toml; do not edit by hand."
    grep -v '^#' "$tmp/out.txt"
} >requirements.lock.new
mv requirements.lock.new requirements.lock
echo "lock: wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
