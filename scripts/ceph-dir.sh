#!/usr/bin/env bash
# Print the directory of this checkout's Ceph test cluster (for scripts/ceph.sh).
#
# $RECONCILER_CEPH_DIR if set; else .run/ceph, unless the repo path makes the daemons'
# admin socket paths (DIR/run/ceph-osd.0.asok) longer than ceph.sh accepts (sun_path is
# 108 bytes): then /tmp/reconciler-ceph-<first 12 hex digits of sha256(repo path)>.
# The Makefile and tests/conftest_ceph.py both ask this script, so they always agree on one
# cluster per checkout.
set -euo pipefail

if [ -n "${RECONCILER_CEPH_DIR:-}" ]; then
    realpath -m -- "$RECONCILER_CEPH_DIR"
    exit 0
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
dir="$root/.run/ceph"
sock="$dir/run/ceph-osd.0.asok"
# Count bytes, not characters: the limit is on the encoded path.
if [ "$(printf '%s' "$sock" | wc -c)" -gt 100 ]; then
    dir="/tmp/reconciler-ceph-$(printf '%s' "$root" | sha256sum | cut -c1-12)"
fi
echo "$dir"
