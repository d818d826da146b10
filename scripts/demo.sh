#!/usr/bin/env bash
# The quick start, safe to re-run (`make demo` runs setup and starts libvirtd first):
#   - two dir pools in this checkout's private libvirtd: reconciler-demo at .run/pools/demo
#     and reconciler-demo-fast at .run/pools/demo-fast (each step skipped when done);
#   - the example image the config names (1 MiB of zeros, matching its sha256);
#   - .run/demo-config.yaml from examples/config.yaml.in (@LIBVIRT_URI@, @RUN_DIR@);
#   - where Ceph is installed: this checkout's Ceph test cluster (scripts/ceph.sh), a libvirt
#     secret with its client.admin key and an rbd pool reconciler-demo-ceph on its pool `rbd`,
#     and pool `ceph` (backend rbd) added to the config, for examples/ceph;
#   - `reconcile --dry-run`, then `reconcile`, over examples/manifests (and examples/ceph);
#   - last, a guest boots: scripts/guest.sh builds a tiny bootable image (Debian's kernel, a
#     busybox initramfs), `reconcile` makes examples/boot's disks from it, `reconcile wait`
#     and `reconcile disks` give their <disk> elements, and a transient domain made of only
#     those boots under TCG; the guest's console lines say what it read on each disk.
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

# The guest image examples/boot's manifest names (`demo-guest`), added to the config.
say "building the guest image (scripts/guest.sh; cached in .run/guest)"
bash scripts/guest.sh "$run_dir/guest" >/dev/null
# shellcheck disable=SC1091
. "$run_dir/guest/guest.env"
cp "$GUEST_IMAGE" "$run_dir/images/demo-guest.raw.tmp"
mv "$run_dir/images/demo-guest.raw.tmp" "$run_dir/images/demo-guest.raw"
.venv/bin/python - "$config" "$run_dir/images/demo-guest.raw" "$GUEST_SHA256" "$GUEST_SIZE" <<'PY'
import json, sys
import yaml
path, image, sha, size = sys.argv[1:]
with open(path) as f:
    cfg = yaml.safe_load(f)
cfg["images"]["demo-guest"] = {
    "location": "file://" + image, "format": "raw", "sha256": sha, "size": int(size),
}
with open(path + ".tmp", "w") as f:
    json.dump(cfg, f, indent=2)
PY
mv "$config.tmp" "$config"
say "wrote $config"

manifests=(examples/manifests examples/boot)
if command -v ceph-mon >/dev/null && [ "${RECONCILER_WITH_CEPH:-1}" != 0 ]; then
    ceph_conf=$(bash scripts/ceph.sh start "$(bash scripts/ceph-dir.sh)" | tail -n 1)
    eval "$(bash scripts/ceph.sh env "$(bash scripts/ceph-dir.sh)")"
    # The secret libvirt (and a domain's rbd disk) authenticates with; one per cluster key.
    secret_uuid=$(virsh_ secret-list | awk '/client.admin reconciler-demo/ { print $1 }' | head -n 1)
    if [ -z "$secret_uuid" ]; then
        secret_uuid=$(cat /proc/sys/kernel/random/uuid)
        printf "<secret ephemeral='no' private='no'><uuid>%s</uuid><usage type='ceph'><name>client.admin reconciler-demo</name></usage></secret>" \
            "$secret_uuid" >"$run_dir/demo-secret.xml"
        virsh_ secret-define "$run_dir/demo-secret.xml" >/dev/null
    fi
    # The key goes through a file only the owner reads, removed right after: on the command
    # line it would show in `ps` (virsh says so: "Passing secret value as command-line
    # argument is insecure!"). --file reads base64, which is what ceph-authtool -p prints.
    key_file=$(umask 077 && mktemp "$run_dir/demo-secret-key.XXXXXX")
    trap 'rm -f "$key_file"' EXIT
    ceph-authtool -p -n client.admin "$CEPH_KEYRING" >"$key_file"
    virsh_ secret-set-value "$secret_uuid" --file "$key_file" >/dev/null
    rm -f "$key_file"
    trap - EXIT
    # A new cluster (scripts/ceph.sh start after a stop) has a new port: define the pool anew.
    if pool_listed reconciler-demo-ceph --all; then
        if pool_listed reconciler-demo-ceph; then virsh_ pool-destroy reconciler-demo-ceph >/dev/null; fi
        virsh_ pool-undefine reconciler-demo-ceph >/dev/null
    fi
    printf "<pool type='rbd'><name>reconciler-demo-ceph</name><source><name>%s</name><host name='127.0.0.1' port='%s'/><auth username='admin' type='ceph'><secret uuid='%s'/></auth></source></pool>" \
        "$CEPH_POOL" "$CEPH_MON_V1_PORT" "$secret_uuid" >"$run_dir/demo-ceph-pool.xml"
    virsh_ pool-define "$run_dir/demo-ceph-pool.xml" >/dev/null
    virsh_ pool-start reconciler-demo-ceph >/dev/null
    say "rbd pool reconciler-demo-ceph on Ceph pool $CEPH_POOL ($ceph_conf)"
    # Add pool `ceph` to the config (JSON is YAML).
    .venv/bin/python - "$config" "$uri" "$ceph_conf" "$CEPH_POOL" "$secret_uuid" <<'PY'
import json, sys
import yaml
path, uri, conf, pool, secret = sys.argv[1:]
with open(path) as f:
    cfg = yaml.safe_load(f)
cfg["pools"]["ceph"] = {
    "uri": uri,
    "libvirtPool": "reconciler-demo-ceph",
    "backends": ["rbd"],
    "ceph": {"conf": conf, "pool": pool, "secretUuid": secret},
}
with open(path + ".tmp", "w") as f:
    json.dump(cfg, f, indent=2)
PY
    mv "$config.tmp" "$config"
    manifests+=(examples/ceph)
else
    say "Ceph is not installed: the rbd example (examples/ceph) is left out"
fi

# --dry-run exits 0 (nothing to do), 2 (changes to make) or 1 (errors).
rc=0
run "$reconcile" --dry-run --config "$config" "${manifests[@]}" || rc=$?
case $rc in
0 | 2) ;;
*) die "dry run failed (exit $rc)" ;;
esac
run "$reconcile" --config "$config" "${manifests[@]}"
if [ ${#manifests[@]} -gt 2 ]; then  # examples/ceph is in
    run virsh -q -c "$uri" pool-refresh reconciler-demo-ceph
    run virsh -q -c "$uri" vol-list reconciler-demo-ceph
fi

# A guest boots from disks the reconciler made, attached only by `reconcile disks`.
vm=7e57b007-0000-4000-8000-00000000d3e0
run "$reconcile" wait --config "$config" -m examples/boot --timeout 60 "$vm"
"$reconcile" disks --config "$config" -m examples/boot "$vm" >"$run_dir/demo-vm-disks.xml"
say "the <disk> elements of $vm (.run/demo-vm-disks.xml):"
cat "$run_dir/demo-vm-disks.xml"
console="$run_dir/demo-vm.console"
rm -f "$console"
.venv/bin/python - "$run_dir/demo-vm-disks.xml" "$console" >"$run_dir/demo-vm.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
devices = ET.parse(sys.argv[1]).getroot()  # <devices instance=...>: the disks only
dom = ET.fromstring(
    "<domain type='qemu'><name>reconciler-demo-vm</name><memory unit='MiB'>256</memory>"
    "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
    "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
    "<on_crash>destroy</on_crash><devices/></domain>"
)
devs = dom.find("devices")
devs.extend(list(devices))
serial = ET.SubElement(devs, "serial", type="file")
ET.SubElement(serial, "source", path=sys.argv[2])
ET.SubElement(serial, "target", port="0")
ET.SubElement(devs, "memballoon", model="none")
print(ET.tostring(dom, encoding="unicode"))
PY
if virsh_ domstate reconciler-demo-vm >/dev/null 2>&1; then virsh_ destroy reconciler-demo-vm >/dev/null || true; fi
run virsh -q -c "$uri" create "$run_dir/demo-vm.xml"
# Wait for the guest's last line (it powers off after it), 120 s at most.
deadline=$((SECONDS + 120))
until grep -q "REPORT done" "$console" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
        virsh_ destroy reconciler-demo-vm >/dev/null 2>&1 || true
        tail -n 20 "$console" >&2 || true
        die "the guest did not finish booting in 120 s (console: $console)"
    fi
    sleep 0.5
done
say "the guest's console ($console): what it read on each disk"
.venv/bin/python - "$console" "$GUEST_SHA256" <<'PY'
import sys
sha = sys.argv[2]
def text(v):
    return "-" if v == "-" else bytes.fromhex(v).rstrip(b"\0 ").decode("utf-8", "replace")
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("REPORT dev="):
        continue
    f = dict(kv.split("=", 1) for kv in line.split()[1:])
    what = "the guest image's bytes" if f["sha256"] == sha else f"ext4 label {text(f['ext4label'])}"
    print(f"  {line.strip()}")
    print(f"  -> {f['dev']} (serial {text(f['serial'])}): {int(f['size']) >> 20} MiB, {what}")
PY
if virsh_ domstate reconciler-demo-vm >/dev/null 2>&1; then virsh_ destroy reconciler-demo-vm >/dev/null 2>&1 || true; fi
