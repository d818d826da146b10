#!/usr/bin/env bash
# The quick start, safe to re-run (`make demo` runs setup and starts libvirtd first):
#   - two dir pools in this checkout's private libvirtd: reconciler-demo at .run/pools/demo
#     and reconciler-demo-fast at .run/pools/demo-fast (each step skipped when done);
#   - the example image the config names (1 MiB of zeros, matching its sha256);
#   - .run/demo-config.yaml from examples/config.yaml.in (@LIBVIRT_URI@, @RUN_DIR@);
#   - `reconcile --dry-run`, then `reconcile`, over examples/manifests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "demo: $*"; }
die() { echo "demo: error: $*" >&2; exit 1; }
# Echo a command (as "$ CMD"), then run it.
run() { echo "$ $*"; "$@"; }

run_dir="$(pwd -P)/.run"
template=examples/config.yaml.in
config=.run/demo-config.yaml
reconcile=.venv/bin/reconcile

[ -x "$reconcile" ] || die "$reconcile not found: run 'make setup' first"
[ -f "$template" ] || die "$template not found"

# `start` is a no-op (it just prints the URI) when the daemon already runs.
uri=$(bash scripts/libvirtd.sh start "$(bash scripts/libvirt-dir.sh)" | tail -n 1)
virsh_() { virsh -q -c "$uri" "$@"; }
# Whether pool $1 is defined (--all) or running; no `| grep -q`, which can SIGPIPE virsh.
pool_listed() {
    local names
    # virsh pads the names with spaces.
    names=$(virsh_ pool-list --name "${@:2}" | sed 's/[[:space:]]*$//')
    grep -qxF "$1" <<<"$names"
}

# Define, build and start a dir pool; skip what is done. A pool of that name pointing
# elsewhere (a moved checkout) is redefined; libvirt leaves the old directory alone.
ensure_pool() {
    local name=$1 path=$2 current
    if pool_listed "$name" --all; then
        current=$(virsh_ pool-dumpxml "$name" | sed -n 's:.*<path>\(.*\)</path>.*:\1:p' | head -n 1)
        if [ "$current" != "$path" ]; then
            say "pool $name points at $current; redefining it at $path"
            if pool_listed "$name"; then virsh_ pool-destroy "$name"; fi
            virsh_ pool-undefine "$name"
        fi
    fi
    if ! pool_listed "$name" --all; then
        say "defining pool $name at $path"
        virsh_ pool-define-as "$name" dir --target "$path" >/dev/null
    fi
    if [ ! -d "$path" ]; then
        say "building pool $name"
        virsh_ pool-build "$name" >/dev/null
    fi
    if ! pool_listed "$name"; then
        say "starting pool $name"
        virsh_ pool-start "$name" >/dev/null
    fi
}

mkdir -p "$run_dir/pools"
ensure_pool reconciler-demo "$run_dir/pools/demo"
ensure_pool reconciler-demo-fast "$run_dir/pools/demo-fast"

# The image examples/config.yaml.in declares: 1 MiB of zeros, so the sha256 there holds.
image="$run_dir/images/tiny-linux.raw"
if [ ! -f "$image" ]; then
    say "writing example image $image"
    mkdir -p "$(dirname "$image")"
    head -c 1048576 /dev/zero >"$image.tmp"
    mv "$image.tmp" "$image"
fi

# sed replacement text: escape \, & and the | delimiter.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
sed -e "s|@LIBVIRT_URI@|$(sed_escape "$uri")|g" -e "s|@RUN_DIR@|$(sed_escape "$run_dir")|g" \
    "$template" >"$config.tmp"
mv "$config.tmp" "$config"
say "wrote $config"

# --dry-run exits 0 (nothing to do), 2 (changes to make) or 1 (errors).
rc=0
run "$reconcile" --dry-run --config "$config" examples/manifests || rc=$?
case $rc in
0 | 2) ;;
*) die "dry run failed (exit $rc)" ;;
esac
run "$reconcile" --config "$config" examples/manifests
