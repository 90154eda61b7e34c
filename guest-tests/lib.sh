# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared host-side helpers for the guest tests and the fio bench: logging, polling with
# deadlines, process cleanup, the guest cache, and starting the device (vhost-user-zram or
# qemu-storage-daemon) and QEMU. Sourced by guest-tests/*.sh and ci/fio-bench.sh; not run.

# shellcheck shell=bash

GT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$GT_DIR/.." && pwd)"
VUZ_BIN="${VUZ_BIN:-$REPO_DIR/target/release/vhost-user-zram}"
GUEST_CACHE_ROOT="${VUZ_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-zram-guest}"
GUEST_RAM_MIB="${VUZ_GUEST_RAM_MIB:-160}"
# The serial the root disk carries, so the guest can tell it from the device under test.
ROOT_SERIAL="vuz-rootfs"
# The serial qemu-storage-daemon's vhost-user-blk export reports (it has no option for it).
QSD_SERIAL="vhost_user_blk"
# shellcheck disable=SC2034 # used by setup.sh
APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio fio e2fsprogs jq xz-utils)

# ---------------------------------------------------------------------------------------------
# Logging

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() {
    log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Polling: never a fixed sleep for readiness, always a condition with a deadline.

# poll_until SECONDS DESCRIPTION COMMAND...: runs COMMAND until it succeeds; fails after SECONDS.
poll_until() {
    local timeout="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# pid_alive PID: true while PID runs (and is not a zombie we already reaped).
pid_alive() { kill -0 "$1" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# Cleanup: every process we start is tracked and killed on exit, whatever the reason.

TRACKED_PIDS=()
TRACKED_PATHS=()
TRACKED_CLEANUPS=()

track_pid() { TRACKED_PIDS+=("$1"); }
# untrack_pid PID: forget PID (a process this shell killed and reaped), so that the cleanup at
# exit never signals whatever process reuses the number later.
untrack_pid() {
    local i
    for i in "${!TRACKED_PIDS[@]}"; do
        [[ "${TRACKED_PIDS[i]}" != "$1" ]] || unset 'TRACKED_PIDS[i]'
    done
    TRACKED_PIDS=(${TRACKED_PIDS[@]+"${TRACKED_PIDS[@]}"})
}
track_path() { TRACKED_PATHS+=("$1"); }
# track_cleanup COMMAND: runs COMMAND at exit, before the tracked processes are stopped.
track_cleanup() { TRACKED_CLEANUPS+=("$1"); }

# stop_pid PID: SIGTERM, a bounded wait, then SIGKILL.
stop_pid() {
    local pid="$1"
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    poll_until 5 "pid $pid to exit" pid_gone "$pid" 2>/dev/null ||
        kill -KILL "$pid" 2>/dev/null || true
}

cleanup_all() {
    local pid path cleanup
    for cleanup in "${TRACKED_CLEANUPS[@]}"; do
        "$cleanup" || true
    done
    for pid in "${TRACKED_PIDS[@]}"; do
        stop_pid "$pid"
    done
    for path in "${TRACKED_PATHS[@]}"; do
        rm -rf -- "$path"
    done
}

install_cleanup_trap() {
    trap cleanup_all EXIT
    trap 'exit 130' INT TERM
}

# new_tmpdir VAR: a unique temp dir, removed on exit.
new_tmpdir() {
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-guest.XXXXXX")"
    track_path "$dir"
    printf -v "$1" '%s' "$dir"
}

# ---------------------------------------------------------------------------------------------
# The guest cache: built by setup.sh, keyed on the kernel version and a hash of what goes in.

# kernel_package: the newest plain Debian 6.1 kernel image package apt offers.
kernel_package() {
    if [[ -n "${VUZ_GUEST_KERNEL_PKG:-}" ]]; then
        echo "$VUZ_GUEST_KERNEL_PKG"
        return
    fi
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n 1
}

# units_kernel_package: the kernel of the units suite, which swaps out 64 KiB folios (mTHP
# swap-out came in 6.10): the newest Debian 12 6.12 image apt offers (bookworm-security).
units_kernel_package() {
    if [[ -n "${VUZ_UNITS_KERNEL_PKG:-}" ]]; then
        echo "$VUZ_UNITS_KERNEL_PKG"
        return
    fi
    apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n 1
}

# inputs_hash: a hash of every file that shapes the guest image.
inputs_hash() {
    (
        cd "$GT_DIR" || exit 1
        find setup.sh guest pressure/Cargo.toml pressure/src -type f -print0 | sort -z |
            xargs -0 sha256sum
    ) | sha256sum | cut -c1-16
}

# guest_dir KERNEL_PKG: the cache directory for this kernel and these inputs.
guest_dir() { echo "$GUEST_CACHE_ROOT/${1#linux-image-}-$(inputs_hash)"; }

# ---------------------------------------------------------------------------------------------
# Accelerator: KVM only if a short bounded boot proves it works (nested KVM can hang).

ACCEL=""
pick_accel() {
    local want="${1:-auto}" guest="$2" out="$3"
    case "$want" in
        tcg) ACCEL=tcg ;;
        kvm) ACCEL=kvm ;;
        auto)
            ACCEL=tcg
            if [[ -r /dev/kvm && -w /dev/kvm ]]; then
                log "probing KVM with a bounded boot (20 s)"
                if ACCEL=kvm run_guest "$guest" "$out/kvm-probe" probe 20 >/dev/null 2>&1 &&
                    grep -q 'VUZ-GUEST-READY' "$out/kvm-probe.console.log"; then
                    ACCEL=kvm
                else
                    ACCEL=tcg
                fi
            fi
            ;;
        *) die "unknown accelerator '$want' (auto, kvm or tcg)" ;;
    esac
    log "accelerator: $ACCEL"
}

# ---------------------------------------------------------------------------------------------
# The device under test.

# resolve_device_kind auto|vuz|qsd: sets DEVICE_KIND. auto means vhost-user-zram when its
# binary is the daemon, qemu-storage-daemon otherwise; with
# VUZ_REQUIRE_DAEMON=1 that fallback is an error. Not for $(...): it may need to exit.
DEVICE_KIND=""
resolve_device_kind() {
    case "$1" in
        vuz | qsd) DEVICE_KIND="$1" ;;
        auto)
            DEVICE_KIND="$(device_kind_auto)"
            [[ "$DEVICE_KIND" != build-failed ]] || die "cargo build --release of vhost-user-zram failed"
            ;;
        *) die "unknown device kind '$1' (auto, vuz or qsd)" ;;
    esac
    if [[ "$DEVICE_KIND" == qsd && "${VUZ_REQUIRE_DAEMON:-0}" == 1 ]]; then
        die "VUZ_REQUIRE_DAEMON=1 but $VUZ_BIN is missing or is not the vhost-user-zram daemon"
    fi
    if [[ "$DEVICE_KIND" == vuz && ! -x "$VUZ_BIN" ]]; then
        die "the device is vhost-user-zram, but $VUZ_BIN does not exist"
    fi
    if [[ "$DEVICE_KIND" == qsd ]]; then
        warn "the device under test is qemu-storage-daemon, not vhost-user-zram ($VUZ_BIN is missing or not the daemon)"
    fi
}

# device_kind_auto: prints vuz, qsd or build-failed. The default $VUZ_BIN is (re)built first:
# cargo does nothing when it is fresh, and a stale binary from older sources is not tested.
device_kind_auto() {
    if [[ "$VUZ_BIN" == "$REPO_DIR/target/release/vhost-user-zram" ]]; then
        log "building vhost-user-zram (cargo build --release)"
        (cd "$REPO_DIR" && cargo build --release >&2) || {
            echo build-failed
            return
        }
    fi
    if [[ -x "$VUZ_BIN" ]] && "$VUZ_BIN" --help 2>&1 | grep -q -- '--socket-path'; then
        echo vuz
    else
        echo qsd
    fi
}

# start_device VAR KIND NAME SIZE NUM_QUEUES SERIAL RW|RO LOGDIR
# Starts a vhost-user-blk backend and waits for its socket. Sets VAR_PID, VAR_SOCK, VAR_CTL
# (vhost-user-zram only), VAR_KIND and VAR_SERIAL (what the guest will read).
start_device() {
    local var="$1" kind="$2" name="$3" size="$4" nq="$5" serial="$6" mode="$7" logdir="$8"
    local dir sock ctl="" pid logf="$logdir/$name.daemon.log"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-dev.XXXXXX")"
    track_path "$dir"
    sock="$dir/vhost.sock"
    case "$kind" in
        vuz)
            ctl="$dir/ctl.sock"
            local args=(--socket-path "$sock" --size "$size" --num-queues "$nq" --serial "$serial"
                --control-socket "$ctl" --log-level "${VUZ_LOG_LEVEL:-info}")
            [[ "$mode" == RO ]] && args+=(--read-only)
            # @DIR@ in a --daemon-arg is this device's own directory (e.g. its backing file).
            args+=(${DAEMON_ARGS[@]+"${DAEMON_ARGS[@]//@DIR@/$dir}"})
            # DEVICE_ARGS (this device only) and DEVICE_CGROUP (a memory cgroup it runs in).
            args+=(${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]//@DIR@/$dir}"})
            local launch=("$VUZ_BIN")
            # sh joins the cgroup, then execs the daemon: same pid, every page charged there.
            # shellcheck disable=SC2016 # $$ and $0 are the inner shell's
            [[ -z "${DEVICE_CGROUP:-}" ]] ||
                launch=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$DEVICE_CGROUP" "$VUZ_BIN")
            log "starting vhost-user-zram $name${DEVICE_CGROUP:+ in $DEVICE_CGROUP}: ${args[*]}"
            "${launch[@]}" "${args[@]}" >"$logf" 2>&1 &
            pid=$!
            ;;
        qsd)
            local img
            img="$(mktemp /dev/shm/vuz-qsd.XXXXXX)"
            track_path "$img"
            truncate -s "$size" "$img"
            local writable=on
            [[ "$mode" == RO ]] && writable=off
            serial="$QSD_SERIAL"
            log "starting qemu-storage-daemon $name: $size on $img, writable=$writable, $nq queue(s)"
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=f,filename=$img,discard=unmap" \
                --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$sock,writable=$writable,num-queues=$nq" \
                >"$logf" 2>&1 &
            pid=$!
            ;;
        *) die "unknown device kind '$kind'" ;;
    esac
    track_pid "$pid"
    log "$name: pid $pid"
    local ready=("[" -S "$sock" "]")
    [[ -n "$ctl" ]] && ready=(bash -c "[[ -S '$sock' && -S '$ctl' ]]")
    if ! poll_until 30 "$name socket $sock" "${ready[@]}"; then
        pid_alive "$pid" || log "$name exited early; its log ($logf):"
        tail -n 20 "$logf" >&2 || true
        return 1
    fi
    WATCH_PIDS+=("$pid")
    printf -v "${var}_PID" '%s' "$pid"
    printf -v "${var}_SOCK" '%s' "$sock"
    printf -v "${var}_CTL" '%s' "$ctl"
    printf -v "${var}_KIND" '%s' "$kind"
    printf -v "${var}_SERIAL" '%s' "$serial"
}

# wait_exit PID SECONDS: waits (bounded) for a child of this shell to exit and sets EXIT_RC to
# its exit status. Fails on timeout. Not for $(...): a subshell cannot wait for our children.
export EXIT_RC=""
wait_exit() {
    local pid="$1" timeout="$2"
    EXIT_RC=""
    poll_until "$timeout" "pid $pid to exit" pid_gone "$pid" || return 1
    EXIT_RC=0
    wait "$pid" || EXIT_RC=$?
}

# pid_gone PID: PID has exited (it may still be a zombie waiting to be reaped).
pid_gone() { ! pid_alive "$1" || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# QEMU

# vhost_user_args NAME SOCK NUM_QUEUES [RECONNECT_SECS]: the QEMU arguments for one
# vhost-user-blk disk. With RECONNECT_SECS, QEMU reconnects to the socket that often after the
# backend went away (a daemon killed and restarted) instead of leaving the disk dead.
vhost_user_args() {
    local chardev="socket,id=$1,path=$2"
    [[ -z "${4:-}" ]] || chardev+=",reconnect=$4"
    printf '%s\n' -chardev "$chardev" \
        -device "vhost-user-blk-pci,chardev=$1,num-queues=$3,id=${1}dev"
}

# unix_listening PATH: a process listens on the Unix socket PATH. A socket file alone proves
# nothing (a killed daemon leaves its file behind), and connecting would be taken for a frontend.
unix_listening() {
    awk -v p="$1" '$NF == p && $4 == "00010000" { found = 1 } END { exit !found }' /proc/net/unix
}

# now_ms: wall-clock milliseconds, for timing a restart.
now_ms() { echo $((${EPOCHREALTIME//[!0-9]/} / 1000)); }

# run_guest GUEST_DIR OUT_PREFIX TEST TIMEOUT [QEMU_ARGS...]
# Boots the guest with vuz.test=TEST in the background; the console goes to
# OUT_PREFIX.console.log. Env: ACCEL, SMP (1), REBOOT (no: -no-reboot), APPEND (extra cmdline;
# VUZ_GUEST_APPEND from the user is added too, e.g. vuz.klog=1 for kernel messages).
# PREALLOC=on allocates the guest's RAM when QEMU starts, so that QEMU's cgroup, not a
# device's that happens to touch a guest page first, is charged for it.
# For live migration: ROOT_IMG (a writable copy of the root image both QEMUs share, instead of
# snapshot=on, whose private overlay would not migrate) and INCOMING (QEMU's -incoming URI:
# the destination). KERNEL_DIR: another kernel and initramfs (the units suite's 6.12) for
# the same root fs.
# Sets QEMU_PID and CONSOLE_IN (a FIFO that feeds the guest's serial console) and returns at
# once when called as `run_guest_bg`; `run_guest` waits for QEMU to exit (bounded by TIMEOUT).
run_guest_bg() {
    local guest="$1" out="$2" test="$3" timeout="$4"
    shift 4
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-qemu.XXXXXX")"
    track_path "$dir"
    mkfifo "$dir/con.in" "$dir/con.out"
    CONSOLE_LOG="$out.console.log"
    CONSOLE_IN="$dir/con.in"
    : >"$CONSOLE_LOG"
    cat "$dir/con.out" >"$CONSOLE_LOG" &
    track_pid $!
    local cpu=qemu64 smp="${SMP:-1}"
    [[ "$ACCEL" == kvm ]] && cpu=host
    # With a single possible vCPU, QEMU 7.2's TCG leaves out the host fences for the guest's
    # memory barriers (tcg_gen_mb without CF_PARALLEL; QEMU 8.0 emits them always, "even with
    # a single cpu we have i/o threads running in parallel"). The vhost-user backend is another
    # process on another core, so virtio's event-idx handshakes race and now and then a kick or
    # an interrupt is lost and the guest waits forever. maxcpus=2 makes TCG emit the fences.
    local smp_arg="$smp"
    ((smp >= 2)) || smp_arg="$smp,maxcpus=2"
    MONITOR_SOCK="$dir/monitor.sock"
    # shellcheck disable=SC2054 # commas inside QEMU option values
    local cmd=(qemu-system-x86_64 -nodefaults -no-user-config -nographic
        -monitor "unix:$MONITOR_SOCK,server=on,wait=off"
        -accel "$ACCEL" -cpu "$cpu" -smp "$smp_arg" -m "${GUEST_RAM_MIB}M"
        -object "memory-backend-memfd,id=mem,size=${GUEST_RAM_MIB}M,share=on,prealloc=${PREALLOC:-off}"
        -numa node,memdev=mem
        -kernel "${KERNEL_DIR:-$guest}/vmlinuz" -initrd "${KERNEL_DIR:-$guest}/initramfs.cpio.gz"
        -append "console=ttyS0 quiet loglevel=3 panic=-1 zswap.enabled=0 vuz.test=$test ${APPEND:-} ${VUZ_GUEST_APPEND:-}"
        -drive "file=${ROOT_IMG:-$guest/rootfs.img},format=raw,if=none,id=root,snapshot=$([[ -n "${ROOT_IMG:-}" ]] && echo off || echo on)"
        -device "virtio-blk-pci,drive=root,serial=$ROOT_SERIAL"
        -chardev "pipe,id=con,path=$dir/con" -serial chardev:con
        "$@")
    [[ "${REBOOT:-no}" == no ]] && cmd+=(-no-reboot)
    [[ -z "${INCOMING:-}" ]] || cmd+=(-incoming "$INCOMING")
    printf '%q ' "${cmd[@]}" >"$out.qemu-cmdline"
    # The callers give up after TIMEOUT and dump the queues first; QEMU's own limit comes later.
    timeout --kill-after=5 "$((timeout + ${QEMU_MARGIN:-60}))" "${cmd[@]}" </dev/null >"$out.qemu.log" 2>&1 &
    QEMU_PID=$!
    track_pid "$QEMU_PID"
}

run_guest() {
    QEMU_MARGIN=0 run_guest_bg "$@"
    wait "$QEMU_PID"
}

# console_has PATTERN: the console log has a line matching the extended regex PATTERN.
console_has() { tr -d '\r' <"$CONSOLE_LOG" | grep -Eq -- "$1"; }

# Device processes to watch while a guest runs: if one dies, waiting for the guest stops.
WATCH_PIDS=()

# guest_or_device_ended: QEMU has exited, or a watched device process has.
guest_or_device_ended() {
    local pid
    pid_gone "$QEMU_PID" && return 0
    for pid in "${WATCH_PIDS[@]}"; do
        pid_gone "$pid" && return 0
    done
    return 1
}

# dump_virtio OUT: when a guest stops making progress, QEMU's view of every virtio queue (and
# the rings in guest memory) into OUT, for telling a lost notification from a lost request.
dump_virtio() {
    if pid_gone "$QEMU_PID" || ! command -v python3 >/dev/null; then
        return 0
    fi
    timeout 30 python3 "$GT_DIR/virtio-dump.py" "$MONITOR_SOCK" >"$1" 2>&1 || true
    log "virtio queue state of the stuck guest: $1"
}

# console_or_exit PATTERN: the console has PATTERN, or it never will (QEMU or a device ended).
console_or_exit() { console_has "$1" || guest_or_device_ended; }

# console_send LINE: types LINE (and a newline) on the guest's serial console.
console_send() {
    # QEMU holds the FIFO open read-write, so this open does not block.
    printf '%s\n' "$1" >"$CONSOLE_IN"
}

# wait_console PATTERN SECONDS: polls the console for PATTERN while QEMU runs.
wait_console() {
    local pattern="$1" timeout="$2"
    poll_until "$timeout" "console line /$pattern/" console_or_exit "$pattern" || return 1
    console_has "$pattern"
}
