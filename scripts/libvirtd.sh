#!/usr/bin/env bash
# Start or stop a private libvirtd on a private unix socket.
#
#   scripts/libvirtd.sh start DIR   # prints the connection URI
#   scripts/libvirtd.sh stop DIR
#   scripts/libvirtd.sh uri DIR
#
# The daemon runs in its own mount namespace (a slave of the host's, so it receives mounts
# but never sends its own) with DIR/{etc,run,lib,cache,log} bound over libvirt's system
# directories, so it sees none of the host's pools and the host sees none of its own.
# Re-running `start` on a running daemon is a no-op, except that a daemon started before
# the rbd storage backend was installed is restarted (it cannot load the backend later),
# and so is one started with another qemu.conf (see qemu_conf below).
set -euo pipefail

cmd=${1:?usage: libvirtd.sh start|stop|uri DIR}
dir=${2:?usage: libvirtd.sh start|stop|uri DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sock="$dir/sock/libvirt-sock"
# The daemon serves storage and the qemu driver (for checks of what disks domains use,
# and to boot the tests' tiny guests, tests/guest.py).
uri="qemu+unix:///system?socket=$sock"
pidfile="$dir/libvirtd.pid"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

stop_daemon() {
    local pid
    if running; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# libvirtd loads its storage backends when it starts: a daemon started before setup
# installed libvirt-daemon-driver-storage-rbd has no rbd pools until it is restarted.
lacks_rbd_backend() {
    local caps
    compgen -G '/usr/lib/*/libvirt/storage-backend/libvirt_storage_backend_rbd.so' >/dev/null || return 1
    caps=$(virsh -q -c "$uri" pool-capabilities 2>/dev/null) || return 1
    [[ "$caps" != *"<pool type='rbd' supported='yes'>"* ]]
}

# The qemu driver's configuration. libvirt caches each emulator's probed capabilities, and
# drops the cache when "KVM was enabled when probing, but it is not available now", which
# it decides by whether the qemu user can open /dev/kvm. Where /dev/kvm is root's alone
# (0600, as on this CI machine) while the probe found KVM, every domain define re-probed
# every emulator: 16 qemu runs, 32 s per define. So qemu runs as root: the check agrees
# with the probe and the cache holds for the daemon's life. Most tests only define
# domains (to see which disks they use); tests/guest.py boots tiny test guests (TCG).
# stdio_handler: by default libvirt hands a guest's qemu log to virtlogd through
# /run/libvirt/virtlogd-sock, and this daemon's private /run/libvirt has no virtlogd, so
# starting a domain failed ("Failed to connect socket to '/run/libvirt/virtlogd-sock'").
# "file" makes libvirtd write the log itself (DIR/log/qemu/NAME.log); nothing else to run.
qemu_conf='user = "root"
group = "root"
stdio_handler = "file"'

# A daemon started with another qemu.conf (before the lines above) keeps its old one.
stale_qemu_conf() {
    [ "$(cat "$dir/etc/qemu.conf" 2>/dev/null)" != "$qemu_conf" ]
}

case "$cmd" in
uri) echo "$uri" ;;
start)
    # Unix socket paths are limited to 108 bytes (sun_path).
    if [ ${#sock} -gt 100 ]; then
        echo "libvirtd.sh: socket path too long (${#sock} bytes): $sock; use a shorter DIR" >&2
        exit 1
    fi
    if running; then
        if lacks_rbd_backend; then
            echo "libvirtd.sh: restarting libvirtd: it started before its rbd storage backend was installed" >&2
        elif stale_qemu_conf; then
            echo "libvirtd.sh: restarting libvirtd: its qemu.conf is not this script's" >&2
        else
            echo "$uri"; exit 0
        fi
        stop_daemon
    fi
    command -v libvirtd >/dev/null || { echo "libvirtd.sh: libvirtd not installed (run scripts/setup.sh)" >&2; exit 1; }
    # libvirtd refuses to start as root without the qemu user it would drop privileges to.
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -M -s /usr/sbin/nologin libvirt-qemu
    mkdir -p "$dir"/{etc,run,lib,cache,log,sock}
    rm -f "$sock" "$sock-ro" "$sock-admin"
    cat >"$dir/etc/libvirtd.conf" <<CONF
unix_sock_dir = "$dir/sock"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
listen_tls = 0
listen_tcp = 0
log_outputs = "3:file:$dir/log/libvirtd.log"
max_client_requests = 32
max_workers = 20
CONF
    printf '%s\n' "$qemu_conf" >"$dir/etc/qemu.conf"
    # DIR/mnt is a shared mount: file systems that tests mount under it later (a tiny
    # tmpfs for the disk-full test) propagate into the daemon's private mount namespace.
    mkdir -p "$dir/mnt"
    if ! mountpoint -q "$dir/mnt"; then
        mount --bind "$dir/mnt" "$dir/mnt"
        mount --make-shared "$dir/mnt"
    fi
    # --timeout makes a forgotten daemon exit once idle (a safety net for CI).
    timeout_s=${LIBVIRTD_IDLE_TIMEOUT:-3600}
    setsid unshare -m --propagation slave bash -c '
        set -e
        d=$1
        for p in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
            mkdir -p "${p#*:}"
            mount --bind "$d/${p%%:*}" "${p#*:}"
        done
        exec libvirtd -f "$d/etc/libvirtd.conf" -p "$d/libvirtd.pid" --timeout "$2"
    ' _ "$dir" "$timeout_s" >"$dir/log/stdout.log" 2>&1 </dev/null &
    # Wait for the socket rather than sleeping a fixed time.
    for _ in $(seq 1 200); do
        [ -S "$sock" ] && running && { echo "$uri"; exit 0; }
        sleep 0.05
    done
    echo "libvirtd.sh: libvirtd did not start; see $dir/log/" >&2
    cat "$dir/log/stdout.log" >&2 || true
    tail -20 "$dir/log/libvirtd.log" >&2 || true
    exit 1
    ;;
stop)
    stop_daemon
    if mountpoint -q "$dir/mnt"; then
        umount -R "$dir/mnt" 2>/dev/null || umount -l "$dir/mnt" || true
    fi
    ;;
*) echo "usage: libvirtd.sh start|stop|uri DIR" >&2; exit 2 ;;
esac
