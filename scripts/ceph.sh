#!/usr/bin/env bash
# Start or stop a private one-node Ceph cluster (one mon, one memstore OSD) on 127.0.0.1.
#
#   scripts/ceph.sh start DIR    # prints the path of its ceph.conf (DIR/ceph.conf)
#   scripts/ceph.sh stop DIR
#   scripts/ceph.sh status DIR   # exit 0 running, 3 stopped, 1 half running
#   scripts/ceph.sh env DIR      # KEY=VALUE lines: CEPH_CONF, CEPH_KEYRING, CEPH_MON_HOST, ...
#   scripts/ceph.sh stop-osd DIR   # stop only the OSD (the mon marks it down); for fault tests
#   scripts/ceph.sh start-osd DIR  # start it again and wait until the mon counts it up
#
# RECONCILER_CEPH_OBJECTSTORE=bluestore (at `start`) gives the OSD a BlueStore on a sparse
# file in DIR instead of memstore: slower to make, but its data survives stop-osd/start-osd
# (memstore keeps everything in the OSD's memory, so a restarted memstore OSD has lost its
# superblock and every object: it cannot serve the cluster it was part of).
#
# For tests and the quick start: pool `rbd` (8 PGs, size 1, rbd-initialised, clone v2 allowed)
# reached as client.admin. Everything lives in DIR (conf, keyrings, mon store, OSD dir, admin
# sockets, logs under DIR/log); nothing is read from or written to /etc/ceph or /var/lib/ceph.
# No mgr: nothing here needs one (`ceph df` shows zeros without it).
#
# The cluster is throwaway. `start` on a running cluster is a no-op that prints the same
# path; otherwise it wipes DIR's previous cluster and bootstraps a new one (about 1.5-2 s; a
# memstore OSD keeps nothing across a restart anyway), with a fresh fsid, keys and ports.
# `stop` ends the OSD, then the mon (an OSD tells the mon it is going, and waits up to 5 s
# for an answer that a stopped mon never sends).
#
# Ports: the mon and the OSD use a block of 100 ports in 10000-31999 (below Linux's
# ephemeral range), picked from a hash of DIR and moved on while any port of the block is in
# use, so clusters of several checkouts run side by side.
#
# Environment: RECONCILER_CEPH_START_TIMEOUT (s, default 60), RECONCILER_CEPH_STOP_TIMEOUT
# (s per daemon, default 30). Every step is polled against these deadlines.
set -euo pipefail

usage() { echo "usage: ceph.sh start|stop|status|env|stop-osd|start-osd DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
case "$cmd" in start | stop | status | env | stop-osd | start-osd) ;; *) usage ;; esac
say() { echo "ceph.sh: $*" >&2; }

if [ "$cmd" = start ]; then mkdir -p "$2"; fi
if [ ! -d "$2" ]; then
    case "$cmd" in
    stop | stop-osd) exit 0 ;;
    status) echo "stopped"; exit 3 ;;
    *) say "$2: no such directory: no cluster there (scripts/ceph.sh start $2)"; exit 3 ;;
    esac
fi
dir=$(cd "$2" && pwd -P)
conf="$dir/ceph.conf"
admin_keyring="$dir/admin.keyring"
envfile="$dir/env"
ready="$dir/ready"
pool=rbd
start_timeout=${RECONCILER_CEPH_START_TIMEOUT:-60}
stop_timeout=${RECONCILER_CEPH_STOP_TIMEOUT:-30}

# ---- daemons ------------------------------------------------------------------------------
# DIR/run/NAME.pid (NAME is mon.a or osd.0) holds the pid; a pid counts only while its
# command line names this cluster's conf (a reused pid is not ours).
pid_of() {
    local pid cmdline
    pid=$(cat "$dir/run/$1.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ "$cmdline" == *" -c $conf "* ]] || return 1
    echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }

# Started in their own session, in the foreground (-f: logging to DIR/log/NAME.log), with
# stdout/stderr in DIR/log/NAME.out and without the lock's descriptor.
launch() {
    local name=$1
    shift
    setsid "$@" >"$dir/log/$name.out" 2>&1 </dev/null 9>&- &
    echo $! >"$dir/run/$name.pid"
}

# Daemons of this cluster whose pid file is lost (a bootstrap interrupted at a bad moment):
# PROG (ceph-osd, ceph-mon) processes whose command line names this cluster's conf.
strays() {
    local p args
    for p in /proc/[0-9]*; do
        mapfile -d '' -t -n 3 args 2>/dev/null <"$p/cmdline" || continue
        if [ "${args[0]:-}" = "$1" ] && [ "${args[1]:-}" = -c ] && [ "${args[2]:-}" = "$conf" ]; then
            echo "${p#/proc/}"
        fi
    done
}

stop_daemon() {
    local name=$1 pid
    if pid=$(pid_of "$name"); then stop_pid "$name" "$pid"; fi
    rm -f "$dir/run/$name.pid"
    for pid in $(strays "ceph-${name%%.*}"); do stop_pid "$name" "$pid"; done
}

stop_pid() {
    local name=$1 pid=$2 deadline
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + stop_timeout))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) still running ${stop_timeout}s after SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    fi
}

stop_all() {
    rm -f "$ready"
    stop_daemon osd.0
    stop_daemon mon.a
}

running() { [ -f "$ready" ] && alive mon.a && alive osd.0; }

# Mon commands as client.admin, through Debian's python3-rados (what the ceph CLI runs on,
# without its 0.4-0.8 s start per command; the conf's [client] section names the keyring
# and bounds every wait):
#   mon_do prepare UUID SECRET_FILE POOL  # ceph osd new UUID -i SECRET_FILE (prints the id);
#                                         # ceph osd set-require-min-compat-client mimic;
#                                         # ceph osd pool create POOL 8 8
#   mon_do wait-up SECONDS                # poll ceph osd stat until num_up_osds is 1
mon_do() {
    /usr/bin/python3 - "$conf" "$@" <<'PY'
import json, sys, time
import rados

conf, what, *args = sys.argv[1:]

def mon(prefix, inbuf=b"", **kw):
    ret, out, err = cluster.mon_command(json.dumps({"prefix": prefix, "format": "json", **kw}), inbuf)
    if ret != 0:
        sys.exit(f"'{prefix}' failed: {ret} {err}")
    return out

cluster = rados.Rados(conffile=conf, name="client.admin")
cluster.connect()
if what == "prepare":
    uuid, secret_file, pool = args
    with open(secret_file, "rb") as f:
        print(json.loads(mon("osd new", f.read(), uuid=uuid))["osdid"])
    # Clone v2: clones of unprotected snapshots (without it `clone` raises InvalidArgument).
    mon("osd set-require-min-compat-client", version="mimic")
    # The OSD creates the pool's PGs once it is up.
    mon("osd pool create", pool=pool, pg_num=8, pgp_num=8)
elif what == "wait-up":
    deadline = time.monotonic() + float(args[0])
    while True:
        stat = json.loads(mon("osd stat"))
        if stat["num_up_osds"] == 1:
            break
        if time.monotonic() > deadline:
            sys.exit(f"the OSD was not up in time (osd stat: {stat})")
        time.sleep(0.05)
cluster.shutdown()
PY
}

# ---- ports --------------------------------------------------------------------------------
# Every local TCP port in use (listening or connected), one per line.
ports_in_use() { ss -Htan 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }' | sort -un; }

pick_base() {
    local used idx i base p busy
    used=" $(ports_in_use | tr '\n' ' ') "
    idx=$((16#$(printf '%s' "$dir" | sha256sum | cut -c1-8) % 220))
    for i in $(seq 0 219); do
        base=$((10000 + ((idx + i) % 220) * 100))
        busy=0
        for ((p = base; p < base + 100; p++)); do
            if [[ "$used" == *" $p "* ]]; then busy=1; break; fi
        done
        if [ $busy = 0 ]; then echo "$base"; return 0; fi
    done
    return 1
}

# ---- bootstrap ----------------------------------------------------------------------------
objectstore=${RECONCILER_CEPH_OBJECTSTORE:-memstore}
objectstore_conf() {
    case "$objectstore" in
    memstore) printf 'osd_objectstore = memstore\nmemstore_device_bytes = 2147483648\n' ;;
    bluestore)
        # A sparse 4 GiB file; small caches, no fsck at mkfs (a throwaway test OSD).
        printf 'osd_objectstore = bluestore\nbluestore_block_path = %s/osd-block\n' "$dir"
        printf 'bluestore_block_size = 4294967296\nbluestore_block_create = true\n'
        printf 'bluestore_fsck_on_mkfs = false\nbluestore_cache_size = 134217728\n'
        printf 'osd_memory_target = 939524096\nbluefs_buffered_io = true\n'
        ;;
    *) say "error: RECONCILER_CEPH_OBJECTSTORE must be memstore or bluestore, not $objectstore"; exit 2 ;;
    esac
}

show_logs() {
    local f
    for f in "$dir"/log/*; do
        [ -s "$f" ] || continue
        echo "--- $f (last 15 lines)" >&2
        tail -n 15 "$f" >&2
    done
}

die_start() {
    say "error: $*"
    show_logs
    stop_all
    exit 1
}

bootstrap() {
    local base v2 v1 fsid osd_uuid osd_key osd_id t0
    t0=$(date +%s.%N)
    for tool in ceph ceph-mon ceph-osd ceph-authtool monmaptool rbd; do
        command -v "$tool" >/dev/null ||
            { say "error: Ceph is not installed ($tool not found): run scripts/setup.sh"; exit 1; }
    done
    # Admin sockets are unix sockets: sun_path is 108 bytes.
    if [ "$(printf '%s' "$dir/run/ceph-osd.0.asok" | wc -c)" -gt 100 ]; then
        say "error: $dir is too long for the daemons' admin sockets; use a shorter DIR"
        exit 1
    fi
    stop_all
    rm -rf --one-file-system "$dir"/{mon,osd,run,log,crash}
    rm -f "$dir/osd-block" "$conf" "$admin_keyring" "$dir/mon.keyring" "$dir/monmap" "$dir/osd-secret.json" "$envfile"
    mkdir -p "$dir"/{mon,osd,run,log,crash}

    base=$(pick_base) || { say "error: no free block of 100 ports in 10000-31999"; exit 1; }
    v2=$base
    v1=$((base + 1))
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$conf" <<CONF
# Written by scripts/ceph.sh: a throwaway one-node test cluster. Do not edit; 'start' rewrites it.
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
ms_bind_port_min = $((base + 2))
ms_bind_port_max = $((base + 99))
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $dir/run
crash_dir = $dir/crash
# One OSD: pools of size 1, replicas chosen among OSDs (not hosts), no autoscaler.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
# Paxos commits at once (pool create + init 4 s -> 0.3 s, snapshot create 1 s -> 0.07 s).
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
$(objectstore_conf)

[mon]
mon_data = $dir/mon
keyring = $dir/mon/keyring
log_file = $dir/log/\$name.log
mon_cluster_log_file = default=$dir/log/ceph.\$channel.log cluster=$dir/log/ceph.log
# The mon store is tiny; a crowded host disk must not make the mon warn or shut itself down.
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# Every client here is Ceph 16.2.15: no insecure global_id reclaim (and no warning about it).
auth_allow_insecure_global_id_reclaim = false

[osd]
osd_data = $dir/osd
keyring = $dir/osd/keyring
log_file = $dir/log/\$name.log
# A client killed with an image open keeps its watch until this expires (default 30 s), and
# the image cannot be removed (EBUSY) or locked by librbd until then; the crash tests kill
# clients on purpose, so the test cluster lets a dead watch go after 5 s.
osd_client_watch_timeout = 5

# Clients (the ceph/rbd CLIs, python-rados in tests): the admin key, and every wait bounded.
# Without these an op on a down OSD blocks forever and connect() to a down mon for 300 s.
[client]
keyring = $admin_keyring
# No client admin socket: one shared path makes every extra client print "File exists".
admin_socket =
log_file =
rados_osd_op_timeout = 60
rados_mon_op_timeout = 60
client_mount_timeout = 60
CONF

    # Keys: mon. (in the mon keyring only) and client.admin (imported into it, so the new
    # mon knows the admin from its first start).
    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$admin_keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$admin_keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
        >"$dir/log/mon.a.mkfs" 2>&1 || die_start "ceph-mon --mkfs failed"
    launch mon.a ceph-mon -c "$conf" -i a -f

    # The OSD: registered with a cephx key we choose; its keyring is written into its data
    # dir before mkfs (mkfs does not write one, and the OSD then cannot authenticate). The
    # same client sets clone v2 and creates the pool, which need only the mon.
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    osd_key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$osd_key" >"$dir/osd-secret.json"
    osd_id=$(mon_do prepare "$osd_uuid" "$dir/osd-secret.json" "$pool" 2>"$dir/log/mon-cmds.err") ||
        die_start "mon commands (osd new, set-require-min-compat-client, pool create) failed: $(cat "$dir/log/mon-cmds.err")"
    rm -f "$dir/osd-secret.json"
    [ "$osd_id" = 0 ] || die_start "'ceph osd new' gave id '$osd_id', not 0"
    ceph-authtool --create-keyring "$dir/osd/keyring" --name osd.0 --add-key "$osd_key" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.0.mkfs" 2>&1 ||
        die_start "ceph-osd --mkfs failed"
    launch osd.0 ceph-osd -c "$conf" -i 0 -f

    # Poll (no fixed sleep) until the mon counts the OSD up.
    local left=$((start_deadline - SECONDS))
    mon_do wait-up "$left" 2>"$dir/log/mon-cmds.err" ||
        die_start "waiting for the OSD failed: $(cat "$dir/log/mon-cmds.err")"
    alive osd.0 || die_start "ceph-osd exited"
    local t_up
    t_up=$(date +%s.%N)

    # rbd pool init writes to the pool, so it also waits for its PGs to become active.
    rbd -c "$conf" pool init "$pool" 2>"$dir/log/pool.err" ||
        die_start "'rbd pool init $pool' failed: $(cat "$dir/log/pool.err")"
    rm -f "$dir/log/pool.err" "$dir/log/mon-cmds.err"

    cat >"$envfile" <<ENV
CEPH_CONF=$conf
CEPH_KEYRING=$admin_keyring
CEPH_USER=admin
CEPH_MON_HOST=[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
CEPH_MON_ADDR=127.0.0.1
CEPH_MON_V1_PORT=$v1
CEPH_MON_V2_PORT=$v2
CEPH_POOL=$pool
CEPH_FSID=$fsid
ENV
    touch "$ready"
    say "$(awk -v a="$t0" -v b="$t_up" -v c="$(date +%s.%N)" \
        'BEGIN { printf "cluster up: OSD up after %.2f s, pool %s ready after %.2f s", b - a, "'"$pool"'", c - a }')"
}

# ---- commands -----------------------------------------------------------------------------
# One command at a time per DIR (two test sessions may start the cluster at once).
exec 9>>"$dir/lock"
if ! flock -w $((start_timeout + 2 * stop_timeout)) 9; then
    say "error: another scripts/ceph.sh holds $dir/lock"
    exit 1
fi

case "$cmd" in
start)
    if ! running; then
        start_deadline=$((SECONDS + start_timeout))
        # Whatever fails (set -e), leave no half-made cluster running.
        trap 'rc=$?; if [ ! -f "$ready" ]; then say "error: bootstrap failed (exit $rc)"; show_logs; stop_all; fi' EXIT
        bootstrap
        trap - EXIT
    fi
    echo "$conf"
    ;;
stop)
    stop_all
    ;;
status)
    if running; then
        echo "running: mon.a pid $(pid_of mon.a), osd.0 pid $(pid_of osd.0), conf $conf"
    elif alive mon.a || alive osd.0 || [ -f "$ready" ]; then
        echo "broken: mon.a $(pid_of mon.a || echo down), osd.0 $(pid_of osd.0 || echo down); 'start' makes a new cluster"
        exit 1
    else
        echo "stopped"
        exit 3
    fi
    ;;
env)
    running || { say "no cluster running in $dir (scripts/ceph.sh start $dir)"; exit 3; }
    cat "$envfile"
    ;;
stop-osd)
    [ -f "$ready" ] || { say "no cluster running in $dir"; exit 3; }
    stop_daemon osd.0
    ;;
start-osd)
    [ -f "$ready" ] && alive mon.a || { say "no cluster (mon) running in $dir"; exit 3; }
    grep -q '^osd_objectstore = bluestore' "$conf" ||
        { say "error: a memstore OSD lost its data when it stopped; only a bluestore cluster (RECONCILER_CEPH_OBJECTSTORE=bluestore) can restart its OSD"; exit 1; }
    if ! alive osd.0; then
        launch osd.0 ceph-osd -c "$conf" -i 0 -f
        mon_do wait-up "$start_timeout" 2>"$dir/log/mon-cmds.err" ||
            { say "error: waiting for the OSD failed: $(cat "$dir/log/mon-cmds.err")"; exit 1; }
    fi
    ;;
esac
