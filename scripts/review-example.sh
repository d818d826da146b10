#!/usr/bin/env bash
# Export examples/review/observed-state.json anew, as a host would: a real export by
# `reconcile observe`, never an edited file (an edited one drifts from what the exporter
# writes, as the version 1 example did when states grew pool layouts).
#
#   - this checkout's private libvirtd (scripts/libvirtd.sh), reached at the socket path
#     examples/review/config.yaml names (/run/reconciler-demo/libvirt-sock, a link);
#   - two empty dir pools as scripts/demo.sh makes them, reconciler-demo and
#     reconciler-demo-fast, at /run/reconciler-demo/pools (any earlier definition of those
#     two pools in this private daemon, and /run/reconciler-demo, are removed first);
#   - the example image (1 MiB of zeros, matching the config's sha256);
#   - `reconcile` over examples/manifests, then db-1's config drive removed behind the
#     reconciler's back (the drift the example's review shows), then `reconcile observe`.
# Needs write access to /run (the config's paths are the documented host's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_dir=/run/reconciler-demo
config=examples/review/config.yaml
out=examples/review/observed-state.json
reconcile=.venv/bin/reconcile
[ -x "$reconcile" ] || { echo "review-example: run 'make setup' first" >&2; exit 1; }

uri=$(bash scripts/libvirtd.sh start "$(bash scripts/libvirt-dir.sh)" | tail -n 1)
virsh_() { virsh -q -c "$uri" "$@"; }
listed() { virsh_ pool-list --name "${@:2}" | sed 's/[[:space:]]*$//' | grep -qxF "$1"; }

for name in reconciler-demo reconciler-demo-fast; do
    if listed "$name"; then virsh_ pool-destroy "$name" >/dev/null; fi
    if listed "$name" --all; then virsh_ pool-undefine "$name" >/dev/null; fi
done
rm -rf "$run_dir"
mkdir -p "$run_dir/pools" "$run_dir/images"
ln -s "${uri#*socket=}" "$run_dir/libvirt-sock"
for p in demo:reconciler-demo demo-fast:reconciler-demo-fast; do
    virsh_ pool-define-as "${p#*:}" dir --target "$run_dir/pools/${p%%:*}" >/dev/null
    virsh_ pool-build "${p#*:}" >/dev/null
    virsh_ pool-start "${p#*:}" >/dev/null
done
head -c 1048576 /dev/zero >"$run_dir/images/tiny-linux.raw"

"$reconcile" --config "$config" examples/manifests
virsh_ vol-delete --pool reconciler-demo 5d6c2b7e-0f4a-4b8e-a1d3-7e9f00c4a2b2_disk.config
"$reconcile" observe --config "$config" --out "$out"
