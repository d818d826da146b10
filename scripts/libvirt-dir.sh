#!/usr/bin/env bash
# Print the directory of this checkout's private libvirtd (for scripts/libvirtd.sh).
#
# $RECONCILER_LIBVIRT_DIR if set; else .run/libvirt, unless the repo path makes the unix
# socket path (DIR/sock/libvirt-sock) longer than libvirtd.sh accepts (sun_path is 108
# bytes): then /tmp/reconciler-libvirt-<first 12 hex digits of sha256(repo path)>.
# The Makefile, scripts/demo.sh and tests/conftest_libvirtd.py all ask this script, so they
# always agree on one daemon per checkout.
set -euo pipefail

if [ -n "${RECONCILER_LIBVIRT_DIR:-}" ]; then
    realpath -m -- "$RECONCILER_LIBVIRT_DIR"
    exit 0
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
dir="$root/.run/libvirt"
sock="$dir/sock/libvirt-sock"
# Count bytes, not characters: the limit is on the encoded path.
if [ "$(printf '%s' "$sock" | wc -c)" -gt 100 ]; then
    dir="/tmp/reconciler-libvirt-$(printf '%s' "$root" | sha256sum | cut -c1-12)"
fi
echo "$dir"
