#!/usr/bin/env bash
# Build the test guest's boot disk: OUT_DIR/guest.img, a raw FAT image booted by syslinux,
# holding Debian's kernel and a busybox initramfs whose init reports, on the serial console,
# what the guest sees on each virtio disk, then powers off (tests/guest.py boots it).
#
#   scripts/guest.sh OUT_DIR    # prints OUT_DIR/guest.env (GUEST_IMAGE, GUEST_SIZE, GUEST_SHA256, ...)
#
# Everything comes from Debian packages: the kernel is `apt-get download`ed (the
# linux-image-6.1.0-*-amd64 that linux-image-amd64 depends on; only vmlinuz and the virtio
# modules are taken out of it), busybox-static is the initramfs's one binary, syslinux and
# mtools write the boot sector and files into the image as a plain file (no loop mount,
# no mount at all), qemu-img makes the qcow2 header the guest writes (see below).
#
# Cached: a second run with OUT_DIR/guest.stamp naming this script's sha256 and an image of
# the recorded sha256 builds nothing. The downloaded .deb is kept in OUT_DIR/cache (only the
# current one). Runs under an exclusive lock on OUT_DIR/.lock, so concurrent callers wait
# for one build. The image is built in a scratch dir and renamed into place, so a reader
# never sees half an image.
#
# What the guest's init prints, one line each (values that are text are hex, so a line is
# always split on spaces; "-" is "none"):
#   REPORT boot
#   REPORT dev=vdb serial=<hex of /sys/block/vdb/serial> size=<bytes>
#          sha256=<of the first GUEST_SIZE bytes (all, if smaller)> magic=<hex of bytes 0-7>
#          ext4label=<hex of 16 bytes at 1144, if 0xEF53 at 1080>
#          swap=<1 if SWAPSPACE2 at 4086, else 0> swaplabel=<hex of 16 bytes at 1052, if swap>
#          vfatlabel=<hex of the boot sector's 11-byte label, if FAT12/16/32>
#   (one such line per /dev/vd*, then, for the disk whose serial is `scribble`:)
#   REPORT scribbled dev=vdc      after writing a qcow2 header whose backing file is the
#                                 HOST path GUEST_HEADER_BACKING at the disk's start, synced
#   REPORT done                   then it powers off (if init ever exits, panic=-1 reboots,
#                                 which the harness's domain turns into a stop)
#   REPORT error <what>           a step that failed (insmod, the scribble's write)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"

die() { echo "guest.sh: error: $*" >&2; exit 1; }
say() { echo "guest.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: scripts/guest.sh OUT_DIR"
mkdir -p "$1"
out=$(cd "$1" && pwd)

IMAGE_MIB=16                       # the image's size; the kernel and initramfs take ~10 MiB
IMAGE_SIZE=$((IMAGE_MIB * 1024 * 1024))
HEADER_BACKING=/etc/hostname       # the host path the scribbled qcow2 header names
LABEL=RCLGUEST                     # the image's FAT volume label
# The modules the guest loads (their dependencies too, found in the modules themselves).
ROOT_MODULES=(virtio_pci virtio_blk)

script_sha=$(sha256sum "$self" | cut -d' ' -f1)
img="$out/guest.img"
envf="$out/guest.env"
stamp="$out/guest.stamp"

print_env() { cat "$envf"; }

# ---- cached? -------------------------------------------------------------------------------
cached() {
    [ -f "$img" ] && [ -f "$envf" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$script_sha" ] || return 1
    local want
    want=$(sed -n 's/^GUEST_SHA256=//p' "$envf")
    [ "$(sha256sum "$img" | cut -d' ' -f1)" = "$want" ]
}

exec 9>"$out/.lock"
flock 9
if cached; then print_env; exit 0; fi
# Scratch dirs of a build that was killed (the lock is ours: no build runs now).
rm -rf --one-file-system "$out"/build.*

# ---- tools ---------------------------------------------------------------------------------
need() {  # need TOOL PACKAGE
    command -v "$1" >/dev/null || die "$1 not found: install Debian's $2 (scripts/setup.sh does)"
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need mkfs.vfat dosfstools
need syslinux syslinux
need mcopy mtools
need qemu-img qemu-utils
need gzip gzip
need flock util-linux
# Debian's busybox-static; its `busybox` package (the same path, dynamically linked) would
# not run in an initramfs that holds no libc.
BUSYBOX=/bin/busybox
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
    [ ! -x "$BUSYBOX" ]; then
    die "Debian's busybox-static is not installed (the initramfs needs a static busybox): run scripts/setup.sh"
fi

start=$(date +%s%N)
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT

# ---- the kernel package ----------------------------------------------------------------------
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
apt_update() {  # apt_update WHY
    [ "$(id -u)" -eq 0 ] || die "$1: run 'apt-get update' as root"
    say "$1: running apt-get update..."
    apt-get update -q >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; die "apt-get update failed"; }
}
download() {  # download PKG: into $work; 1 if apt-get download failed
    # As root apt warns that its _apt user cannot write here; the download works.
    (cd "$work" && apt-get download -q "$1") >"$work/apt.log" 2>&1
}
pkg=$(kernel_package)
if [ -z "$pkg" ]; then
    # A machine whose package lists were never fetched (a fresh container) knows no kernel.
    apt_update "apt knows no linux-image-amd64"
    pkg=$(kernel_package)
    [ -n "$pkg" ] || die "linux-image-amd64 depends on no linux-image-<version> package (apt-cache depends linux-image-amd64)"
fi
cache="$out/cache"
mkdir -p "$cache"
deb=$(compgen -G "$cache/${pkg}_*.deb" | head -n1 || true)
if [ -z "$deb" ]; then
    say "downloading $pkg..."
    if ! download "$pkg"; then
        # Old package lists name a kernel the mirror has since dropped: fetch them anew.
        cat "$work/apt.log" >&2
        apt_update "apt-get download $pkg failed"
        pkg=$(kernel_package)
        download "$pkg" || { cat "$work/apt.log" >&2; die "apt-get download $pkg failed"; }
    fi
    downloaded=$(compgen -G "$work/${pkg}_*.deb" | head -n1 || true)
    [ -n "$downloaded" ] || die "apt-get download $pkg left no ${pkg}_*.deb"
    rm -f "$cache"/linux-image-*.deb  # other kernels' debs: only the current one is kept
    mv "$downloaded" "$cache/"
    deb="$cache/$(basename "$downloaded")"
fi

# ---- vmlinuz and the modules -----------------------------------------------------------------
x="$work/x"
mkdir -p "$x"
dpkg-deb --fsys-tarfile "$deb" |
    tar -x -C "$x" --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/drivers/virtio/*' \
        './lib/modules/*/kernel/drivers/block/virtio_blk.ko*' ||
    die "$deb: no vmlinuz or virtio modules where Debian 12's kernels have them (./boot, ./lib/modules/*/kernel/drivers)"
vmlinuz=$(compgen -G "$x/boot/vmlinuz-*" | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir="$x/lib/modules/$kver/kernel/drivers"

# Modules may be compressed (.ko.xz in later Debian kernels): decompress them on the host,
# since busybox's insmod loads a plain .ko.
for f in $(find "$x/lib/modules" -name '*.ko.*'); do
    case "$f" in
    *.ko.xz) "$BUSYBOX" unxz "$f" ;;
    *.ko.zst) command -v zstd >/dev/null || die "$f is zstd-compressed: install Debian's zstd"
        zstd -q -d --rm "$f" ;;
    *.ko.gz) gzip -d "$f" ;;
    *) die "$f: unknown module compression" ;;
    esac
done

# Load order: each module after what it depends on (its .modinfo's depends=), found here.
declare -A modpath=() seen=()
while IFS= read -r f; do m=$(basename "$f" .ko); modpath[$m]=$f; done < <(find "$moddir" -name '*.ko')
order=()
visit() {
    local m=$1 d deps
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    [ -n "${modpath[$m]:-}" ] || die "module $m (needed by the guest) is not in $pkg's drivers/virtio or drivers/block"
    deps=$(tr '\0' '\n' <"${modpath[$m]}" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do visit "$d"; done
    order+=("$m")
}
for m in "${ROOT_MODULES[@]}"; do visit "$m"; done

# ---- the initramfs ---------------------------------------------------------------------------
r="$work/root"
mkdir -p "$r"/{bin,dev,proc,sys,lib/modules}
cp "$BUSYBOX" "$r/bin/busybox"
for a in sh mount insmod cat head dd od tr cut sha256sum sync poweroff echo sleep ls; do
    ln -s busybox "$r/bin/$a"
done
for m in "${order[@]}"; do cp "${modpath[$m]}" "$r/lib/modules/$m.ko"; done
# The qcow2 header the guest writes onto the `scribble` disk: a valid image whose backing
# file is a path on the HOST. -u: the backing file is named, not opened.
qemu-img create -q -f qcow2 -u -b "$HEADER_BACKING" -F raw "$r/hdr.qcow2" 1M ||
    die "qemu-img create of the qcow2 header failed"

cat >"$r/init" <<'INIT'
#!/bin/sh
# The test guest's init (scripts/guest.sh): report each virtio disk, scribble, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Only panics on the console from here on: a kernel line cannot cut a REPORT line.
echo 1 >/proc/sys/kernel/printk
echo "REPORT boot"
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "REPORT error insmod-$m"
done

N=@IMAGE_SIZE@
hex() { od -A n -t x1 -v | tr -d ' \n'; }
at() { dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null | hex; }
orhyphen() { if [ -n "$1" ]; then echo "$1"; else echo -; fi; }

scribble=
for s in /sys/block/vd*; do
    [ -e "$s" ] || continue
    d=${s##*/}
    dev=/dev/$d
    serial=$(cat "$s/serial" 2>/dev/null)
    size=$(($(cat "$s/size") * 512))
    sha=$(head -c "$N" "$dev" | sha256sum | cut -d' ' -f1)
    magic=$(at "$dev" 0 8)
    ext4label=-
    [ "$(at "$dev" 1080 2)" = 53ef ] && ext4label=$(orhyphen "$(at "$dev" 1144 16)")
    swap=0 swaplabel=-
    # "SWAPSPACE2" at the end of the first 4 KiB page.
    if [ "$(at "$dev" 4086 10)" = 53574150535041434532 ]; then
        swap=1
        swaplabel=$(orhyphen "$(at "$dev" 1052 16)")
    fi
    vfatlabel=-
    if [ "$(at "$dev" 510 2)" = 55aa ]; then
        case "$(at "$dev" 54 5)" in 4641543132 | 4641543136) vfatlabel=$(at "$dev" 43 11) ;; esac
        [ "$(at "$dev" 82 5)" = 4641543332 ] && vfatlabel=$(at "$dev" 71 11)
    fi
    echo "REPORT dev=$d serial=$(orhyphen "$(printf '%s' "$serial" | hex)") size=$size sha256=$sha magic=$(orhyphen "$magic") ext4label=$ext4label swap=$swap swaplabel=$swaplabel vfatlabel=$vfatlabel"
    [ "$serial" = scribble ] && scribble="$scribble $d"
done

for d in $scribble; do
    if dd if=/hdr.qcow2 of="/dev/$d" conv=notrunc,fsync 2>/dev/null && sync; then
        echo "REPORT scribbled dev=$d"
    else
        echo "REPORT error scribble-$d"
    fi
done

echo "REPORT done"
sync
poweroff -f
# Not reached unless poweroff failed: init exiting panics, and panic=-1 reboots at once.
INIT
sed -i -e "s/@MODULES@/${order[*]}/" -e "s/@IMAGE_SIZE@/$IMAGE_SIZE/" "$r/init"
chmod 755 "$r/init"
(cd "$r" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) | gzip -9 -n >"$work/initrd.gz"

# ---- the image -------------------------------------------------------------------------------
# SERIAL 0: syslinux's banner on the serial console too, so a console that has it but no
# `REPORT boot` tells a kernel that did not come up from a disk the BIOS did not boot.
cat >"$work/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0 panic=-1 quiet loglevel=3
CFG
cp "$vmlinuz" "$work/vmlinuz"
need_bytes=$(($(stat -c %s "$work/vmlinuz") + $(stat -c %s "$work/initrd.gz") + 1048576))
[ "$need_bytes" -lt "$IMAGE_SIZE" ] ||
    die "kernel and initramfs ($need_bytes bytes with slack) do not fit a ${IMAGE_MIB} MiB image: raise IMAGE_MIB"
part="$work/guest.img"
truncate -s "$IMAGE_SIZE" "$part"
mkfs.vfat -n "$LABEL" -i 52434c47 "$part" >/dev/null || die "mkfs.vfat $part failed"
syslinux --install "$part" || die "syslinux --install $part failed"
# MTOOLS_SKIP_CHECK: mtools otherwise refuses some geometries of a plain file.
MTOOLS_SKIP_CHECK=1 mcopy -i "$part" "$work/vmlinuz" "$work/initrd.gz" "$work/syslinux.cfg" ::/ ||
    die "mcopy into $part failed"

sha=$(sha256sum "$part" | cut -d' ' -f1)
mv -f "$part" "$img"
cat >"$envf.tmp" <<ENV
GUEST_IMAGE=$img
GUEST_SIZE=$IMAGE_SIZE
GUEST_SHA256=$sha
GUEST_KERNEL=$kver
GUEST_MODULES='${order[*]}'
GUEST_HEADER_BACKING=$HEADER_BACKING
GUEST_LABEL=$LABEL
ENV
mv -f "$envf.tmp" "$envf"
echo "$script_sha" >"$stamp"
say "built $img ($IMAGE_SIZE bytes, sha256 $sha, kernel $kver) in $((($(date +%s%N) - start) / 1000000)) ms"
print_env
