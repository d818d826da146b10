#!/usr/bin/env bash
# Install what the project needs on a Debian 12 machine (as root), then the Python venv.
#
#   scripts/setup.sh                          # Debian packages (Ceph too) + .venv from requirements.lock
#   RECONCILER_WITH_CEPH=0 scripts/setup.sh   # without the Ceph packages (rbd tests then skip)
#
# Idempotent and quick when done: packages are checked with dpkg-query and apt runs only if
# one is missing; .venv is synced to requirements.lock (every package pinned, hash-checked)
# only when the lock or pyproject.toml changed since the last install (.venv/.setup-stamp).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# Debian packages: libvirtd with the dir/fs/logical storage backends, virsh, qemu-img,
# what libvirt-python builds against, and the tools templates run (mkfs.*, mkswap).
# qemu-system-x86 (43 MB, no recommends) lets the private libvirtd define domains, so the
# tests can check that a disk a domain uses is never deleted, and boot a tiny guest (TCG)
# that reports what it sees on each disk (tests/guest.py).
# fdisk (sfdisk; bookworm ships it apart from util-linux) writes the partition tables of
# the partitioned raw images the tests build. lvm2 makes and changes the lvm backend's
# logical volumes (the tests make a private VG over a loop device, tests/conftest_lvm.py).
# Not libvirt-daemon-system: it drags in systemd-sysv, and scripts/libvirtd.sh runs its own.
DEBIAN_PACKAGES=(
    libvirt-daemon libvirt-clients qemu-utils libvirt-dev pkg-config gcc
    e2fsprogs xfsprogs dosfstools util-linux fdisk qemu-system-x86 lvm2
    strace  # tests/test_record_trust.py: a traced apply opens nothing outside the pool
    # scripts/guest.sh builds the test guest's boot disk from Debian packages, as a plain
    # file (no loop mount): busybox-static is its initramfs's every tool; syslinux writes
    # the boot sector, ldlinux.sys and ldlinux.c32 (all carried in the installer itself)
    # into the FAT image through mtools, which also copies the kernel and initramfs in.
    # Not syslinux-common (syslinux's recommends, the .c32 modules): traced, `syslinux
    # --install` opens nothing of it, and the guest's syslinux.cfg loads no module.
    busybox-static syslinux mtools
    # tests/test_markdown_render.py renders `--output markdown` with cmark-gfm (the
    # GitHub-flavoured Markdown renderer GitHub's own is built on; 0.29 in bookworm) and
    # checks the HTML it makes, with raw HTML allowed and suppressed.
    cmark-gfm
    # tests/test_metrics_promtool.py: `promtool check metrics` (only in Debian's prometheus
    # package, about 19 MB; its own service is never started, nor needed) lints the loop's
    # metrics as Prometheus reads them.
    prometheus
)

# Ceph (installed unless RECONCILER_WITH_CEPH=0): the one-node test cluster of
# scripts/ceph.sh (mon, memstore OSD, the ceph/rbd CLIs); Python reaches it through Debian's
# rados/rbd modules, linked into the venv below (no PyPI package provides a usable rbd).
# libvirt's rbd pool backend is a separate package, which libvirtd loads when it starts
# (scripts/libvirtd.sh restarts a daemon started before it was installed). About 20 s and
# 220 MB on a machine that has libvirt already; no ceph-mgr (nothing needs it).
# qemu-block-extra holds qemu's rbd block driver (block-rbd.so, a module qemu loads on
# demand): without it qemu cannot open a guest's `<source protocol='rbd'>` disk
# (tests/test_guest_boot.py boots one).
CEPH_PACKAGES=(
    ceph-mon ceph-osd ceph-common python3-rados python3-rbd
    libvirt-daemon-driver-storage-rbd qemu-block-extra
)
WITH_CEPH=${RECONCILER_WITH_CEPH:-1}
case "$WITH_CEPH" in 0 | 1) ;; *) die "RECONCILER_WITH_CEPH must be 0 or 1, not '$WITH_CEPH'" ;; esac

command -v python3 >/dev/null || die "python3 not found on PATH (CPython 3.11 or newer is needed)"

packages=("${DEBIAN_PACKAGES[@]}")
if [ "$WITH_CEPH" = 1 ]; then packages+=("${CEPH_PACKAGES[@]}"); fi
# Debian's own python3 needs venv and headers from packages; pyenv's python has both.
if [[ "$(readlink -f "$(command -v python3)")" == /usr/bin/* ]]; then
    packages+=(python3-venv python3-dev)
fi

did=0  # whether this run changed anything

# ---- Debian packages --------------------------------------------------------------------
missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}..."
    did=1
    [ "$(id -u)" -eq 0 ] || die "not root: install these Debian packages first: ${missing[*]}"
    log=$(mktemp "${TMPDIR:-/tmp}/reconciler-apt.XXXXXX")
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -q >"$log" 2>&1; then
        cat "$log" >&2
        die "apt-get update failed (output above)"
    fi
    if ! apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 \
        "${missing[@]}" </dev/null >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "apt-get install failed (full output in $log)"
    fi
    rm -f "$log"
fi

# ---- Python venv: exactly what requirements.lock pins -------------------------------------
# shellcheck source=scripts/uv.sh
. scripts/uv.sh
if [ "$(sed -n 's/^# deps-sha256: //p' requirements.lock)" != "$(deps_hash)" ]; then
    die "pyproject.toml's dependencies changed since requirements.lock was made: run 'make lock'"
fi
ensure_uv
if [ -e .venv ] && ! .venv/bin/python -c '' 2>/dev/null; then
    did=1
    say "recreating .venv (it does not run: was its python removed?)..."
    rm -rf .venv
fi
if [ ! -e .venv ]; then
    say "creating .venv..."
    did=1
    "$UV" venv -q --python "$(command -v python3)" .venv || die "'uv venv .venv' failed"
fi

# Reinstalled whenever the lock (or the package's own metadata) changes; `uv pip sync`
# also removes whatever the lock does not name, so .venv holds exactly the lock.
stamp=.venv/.setup-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    did=1
    say "installing Python packages from requirements.lock..."
    # Builds (libvirt-python is an sdist; this package) take setuptools from the lock too.
    # --compile-bytecode: as pip does; without it every start compiles what it imports
    # wherever the environment forbids writing __pycache__ (PYTHONDONTWRITEBYTECODE).
    "$UV" pip sync -q --compile-bytecode --python .venv/bin/python --require-hashes \
        --build-constraints requirements.lock requirements.lock ||
        die "installing requirements.lock failed (output above)"
    "$UV" pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e . ||
        die "installing this package into .venv failed (output above)"
    echo "$want" >"$stamp"
fi

# This package is installed editable: its modules are compiled here, as pip compiles an
# installed package, so a command does not compile ~100 modules on every start wherever
# the environment forbids writing __pycache__ (PYTHONDONTWRITEBYTECODE; 0.5 s of CPU,
# measured on `reconcile disks`). Only what changed since the last run is compiled again.
.venv/bin/python -m compileall -q -j 0 reconciler >/dev/null || die "compiling reconciler/ failed"

# Debian builds rados/rbd for its own python3 (3.11): another venv python cannot load them,
# and the rbd tests then skip, saying why.
if [ "$WITH_CEPH" = 1 ] && ! link_debian_ceph .venv; then
    say "warning: Debian's rados/rbd modules are not importable in .venv: the Ceph tests will skip"
fi

if [ "$did" = 1 ]; then say "done"; else say "up to date"; fi
