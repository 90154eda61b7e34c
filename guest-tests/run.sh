#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Entry point of the guest tests: builds the guest if needed (setup.sh), boots it in QEMU
# against the vhost-user-blk device under test (vhost-user-zram, or qemu-storage-daemon while the
# daemon does not exist yet), runs every suite, then the fio bench (ci/fio-bench.sh).
# Prints `PASS name` / `FAIL name: reason` per check and ends with `N passed, M failed`.
#
# Usage: guest-tests/run.sh [--accel auto|kvm|tcg] [--device auto|vuz|qsd]
#                           [--suites main,multiqueue,lifecycle,survive,migrate,units,libvirt]
#                           [--no-bench] [--bench-only] [--daemon-arg ARG]...
# The default suites are main, multiqueue, lifecycle, survive (the daemon killed and
# restarted under a swapping guest), migrate (the swapping guest live-migrated) and units (a 6.12
# guest's 64 KiB swap-outs stored as multi-page units); libvirt (the guest started by libvirtd,
# as an operator runs it) is asked for by name and SKIPs where libvirt cannot run.
# --daemon-arg passes ARG to every vhost-user-zram the suites start (e.g. --workers=0); @DIR@
# in ARG becomes the device's own temporary directory (--backing-file=@DIR@/backing).
# VUZ_EXPECT_WRITEBACK=1 makes the swap suite check that pages went to the backing file.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=libvirt.sh
source "$(dirname "${BASH_SOURCE[0]}")/libvirt.sh"
# shellcheck source-path=SCRIPTDIR source=migrate.sh
source "$(dirname "${BASH_SOURCE[0]}")/migrate.sh"
# shellcheck source-path=SCRIPTDIR source=memcg.sh
source "$(dirname "${BASH_SOURCE[0]}")/memcg.sh"

RESULTS_DIR="${VUZ_RESULTS_DIR:-$REPO_DIR/results}/guest"
# Extra vhost-user-zram arguments (--daemon-arg), used by start_device.
DAEMON_ARGS=()
PASSED=0
FAILED=0

# Put before every check's name the suite reports (libvirt/ for the libvirt suite, whose guest
# runs the same checks as main's).
RESULT_PREFIX=""
record_pass() {
    PASSED=$((PASSED + 1))
    echo "PASS $RESULT_PREFIX$1"
}
record_fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL $RESULT_PREFIX$1: $2"
}
record_skip() { echo "SKIP $RESULT_PREFIX$1: $2"; }

# collect_results OUT_PREFIX SUITE EXPECTED...: turns the guest's VUZ-RESULT lines into
# PASS/FAIL lines; an expected check the guest never reported is a failure.
collect_results() {
    local out="$1" suite="$2" line name reason
    shift 2
    local -A seen=()
    while IFS= read -r line; do
        line="${line#*VUZ-RESULT }"
        case "$line" in
            PASS\ *)
                name="${line#PASS }"
                seen[$name]=1
                record_pass "$name"
                ;;
            FAIL\ *)
                name="${line#FAIL }"
                reason="${name#*: }"
                name="${name%%: *}"
                seen[$name]=1
                record_fail "$name" "$reason"
                ;;
        esac
    done < <(tr -d '\r' <"$out.console.log" | grep 'VUZ-RESULT ')
    for name in "$@"; do
        [[ -n "${seen[$name]:-}" ]] ||
            record_fail "$name" "the guest reported no result (console: $out.console.log)"
    done
    if ! console_has "VUZ-GUEST-DONE test=$suite"; then
        record_fail "$suite/guest-finished" "the guest did not finish (console: $out.console.log)"
    fi
}

# qemu_finish SUITE SECONDS: waits for QEMU to exit; a timeout kills it. A device process that
# dies while the guest runs is a failure, and QEMU is stopped rather than left to time out.
# vhost-user-zram exits as soon as QEMU closes the socket, which is while QEMU is exiting, so
# QEMU gets a few seconds to finish exiting before the device's exit counts as a crash.
qemu_finish() {
    local suite="$1" timeout="$2" pid
    poll_until "$timeout" "QEMU ($suite) to exit" guest_or_device_ended || true
    if ! pid_gone "$QEMU_PID" && ! poll_until 10 "QEMU ($suite) to exit" pid_gone "$QEMU_PID"; then
        for pid in "${WATCH_PIDS[@]}"; do
            if pid_gone "$pid"; then
                wait_exit "$pid" 1 || true
                record_fail "$suite/device-alive" \
                    "device process $pid exited with status $EXIT_RC while the guest ran (logs in $RESULTS_DIR)"
            fi
        done
    fi
    if ! wait_exit "$QEMU_PID" 1; then
        dump_virtio "$RESULTS_DIR/$suite.virtio-dump.txt"
        log "stopping QEMU ($suite)"
        stop_pid "$QEMU_PID"
        wait_exit "$QEMU_PID" 5 || true
        EXIT_RC="killed (timeout or device exit)"
    fi
    log "QEMU exited: $EXIT_RC"
}

# suite_done: stop this suite's devices, and watch none of them any more.
suite_done() {
    local pid
    for pid in "${WATCH_PIDS[@]}"; do
        stop_pid "$pid"
    done
    WATCH_PIDS=()
}

# The seed of the pressure program's pattern; printed, and reusable with VUZ_SEED.
SEED="${VUZ_SEED:-$((RANDOM * 32768 + RANDOM))}"

# suite main: swap-under-pressure and block-semantics, one boot, a read-write and a read-only
# device.
suite_main() {
    local out="$RESULTS_DIR/main" ram="$GUEST_RAM_MIB"
    local pressure_mib=$((ram * 22 / 10)) tmpfs_mib=$((ram * 8 / 10))
    start_device RW "$DEVICE_KIND" main-rw 1G 1 vuz-main-rw RW "$RESULTS_DIR" || {
        record_fail main/device "the read-write device did not start"
        return
    }
    start_device RO "$DEVICE_KIND" main-ro 64M 1 vuz-main-ro RO "$RESULTS_DIR" || {
        record_fail main/device "the read-only device did not start"
        return
    }
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$RW_SOCK" 1; vhost_user_args vuz1 "$RO_SOCK" 1)
    # qemu-storage-daemon gives every export the same serial: the guest then goes by PCI order.
    local ro_nth=0
    # shellcheck disable=SC2153 # set by start_device
    [[ "$RO_SERIAL" == "$RW_SERIAL" ]] && ro_nth=1
    log "main: ${pressure_mib} MiB anonymous + ${tmpfs_mib} MiB tmpfs in ${ram} MiB RAM, seed $SEED"
    APPEND="vuz.rw=$RW_SERIAL vuz.ro=$RO_SERIAL vuz.ro_nth=$ro_nth vuz.rw_bytes=$((1 << 30)) vuz.seed=$SEED \
vuz.pressure_mib=$pressure_mib vuz.tmpfs_mib=$tmpfs_mib" SMP=1 \
        run_guest_bg "$GUEST" "$out" main "${VUZ_MAIN_TIMEOUT:-600}" "${qargs[@]}"

    # While the pressure program holds its pages on swap, look at the device from the host.
    if wait_console 'VUZ-HOSTCHECK-MMSTAT' "${VUZ_MAIN_TIMEOUT:-600}"; then
        check_mm_stat "$RW_KIND" "$RW_CTL" "$out"
        console_send "go"
    elif [[ "$RW_KIND" == vuz ]]; then
        record_fail swap-under-pressure/mm-stat "the guest never reached the point to check it"
    fi
    # Then the guest frees all its swap (swap still on, discard=pages): the host gets it back.
    if wait_console 'VUZ-HOSTCHECK-FREED' "${VUZ_MAIN_TIMEOUT:-600}"; then
        check_discard_frees "$RW_KIND" "$RW_CTL" "$out"
        console_send "go"
    elif [[ "$RW_KIND" == vuz ]]; then
        record_fail swap-under-pressure/discard-frees-host-memory \
            "the guest never reached the point to check it"
    fi
    qemu_finish main "${VUZ_MAIN_TIMEOUT:-600}"
    collect_results "$out" main \
        swap-under-pressure/{non-rotational,swapon,anon-pages,swap-used,tmpfs-files,swapoff} \
        block-semantics/{capacity,fio-verify-4k,fio-verify-64k,fio-verify-512-unaligned} \
        block-semantics/{fio-verify-mixed-unaligned,discard-zeroes,serial} \
        block-semantics/read-only/{ro-flag,write-refused,read-works}
    suite_done
}

# check_mm_stat KIND CTL OUT: while the guest's swap is in use, the daemon stored pages
# (orig_data_size > 0), compressed them (0 < compr_data_size < orig_data_size: a quarter of the
# pages are zero-filled) and found same-filled pages (same_pages > 0); io_stat shows no failed
# reads or writes. `stats --json` is kept in the results for reading.
check_mm_stat() {
    local kind="$1" ctl="$2" out="$3" name=swap-under-pressure/mm-stat stat
    if [[ "$kind" != vuz ]]; then
        record_skip "$name" "the device is qemu-storage-daemon"
        record_skip swap-under-pressure/io-stat "the device is qemu-storage-daemon"
        return
    fi
    timeout 10 "$VUZ_BIN" ctl --control-socket "$ctl" stats --json >"$out.stats.json" 2>&1 || true
    if ! stat="$(ctl_line "$ctl" mm_stat "$out")"; then
        record_fail "$name" "ctl mm_stat failed: $(head -c 300 "$out.mm_stat.err")"
    else
        log "mm_stat: $stat"
        local c
        read -r -a c <<<"$stat"
        if ((${#c[@]} != 9)); then
            record_fail "$name" "mm_stat has ${#c[@]} columns, expected 9: '$stat'"
        elif ! ((c[0] > 0)); then
            record_fail "$name" "orig_data_size is ${c[0]} with swap in use: '$stat'"
        elif ! ((c[1] > 0 && c[1] < c[0])); then
            record_fail "$name" "compr_data_size is ${c[1]}, expected between 0 and orig_data_size ${c[0]}: '$stat'"
        elif ! ((c[5] > 0)); then
            record_fail "$name" "same_pages is ${c[5]} though the guest swapped zero pages: '$stat'"
        else
            record_pass "$name"
        fi
    fi
    if [[ "${VUZ_EXPECT_WRITEBACK:-}" == 1 ]]; then
        check_written_back "$ctl" "$out"
    fi
    if ! stat="$(ctl_line "$ctl" io_stat "$out")"; then
        record_fail swap-under-pressure/io-stat "ctl io_stat failed: $(head -c 300 "$out.io_stat.err")"
    else
        log "io_stat: $stat"
        local c
        read -r -a c <<<"$stat"
        if ((${#c[@]} < 4)); then
            record_fail swap-under-pressure/io-stat "io_stat has ${#c[@]} columns, expected 4: '$stat'"
        elif ((c[0] != 0 || c[1] != 0)); then
            record_fail swap-under-pressure/io-stat "failed_reads ${c[0]}, failed_writes ${c[1]}: '$stat'"
        else
            record_pass swap-under-pressure/io-stat
        fi
    fi
}

# check_written_back CTL OUT: with a backing file and --writeback-above below what the guest
# swapped, pages went to the file (bd_count > 0) while the guest's pages are on swap, and none
# failed.
check_written_back() {
    local ctl="$1" out="$2" name=swap-under-pressure/written-back stat c
    if ! stat="$(ctl_line "$ctl" bd_stat "$out")"; then
        record_fail "$name" "ctl bd_stat failed: $(head -c 300 "$out.bd_stat.err")"
        return
    fi
    log "bd_stat: $stat"
    read -r -a c <<<"$stat"
    if ((${#c[@]} != 3)); then
        record_fail "$name" "bd_stat has ${#c[@]} columns, expected 3: '$stat'"
    elif ! ((c[0] > 0 && c[2] >= c[0])); then
        record_fail "$name" "no page went to the backing file: bd_stat '$stat'"
    else
        record_pass "$name"
    fi
}

# check_discard_frees KIND CTL OUT: after the guest freed every page it had on swap (swap on,
# discard=pages, the disk non-rotational), the daemon was told: notify_free rises above what
# it was while the pages were out, and mem_used_total falls below it. The guest discards from
# a work queue, so this polls (bounded) until both hold.
check_discard_frees() {
    local kind="$1" ctl="$2" out="$3" name=swap-under-pressure/discard-frees-host-memory
    if [[ "$kind" != vuz ]]; then
        record_skip "$name" "the device is qemu-storage-daemon"
        return
    fi
    local held_mm held_io
    if ! read -r -a held_mm <"$out.mm_stat" || ! read -r -a held_io <"$out.io_stat" ||
        ((${#held_mm[@]} != 9 || ${#held_io[@]} != 4)); then
        record_fail "$name" "no mm_stat and io_stat from while the pages were on swap"
        return
    fi
    local deadline=$((SECONDS + 60)) mm io
    while :; do
        mm=() io=()
        read -r -a mm < <(ctl_line "$ctl" mm_stat "$out.freed" || true)
        read -r -a io < <(ctl_line "$ctl" io_stat "$out.freed" || true)
        if ((${#mm[@]} == 9 && ${#io[@]} == 4 && io[3] > held_io[3] && mm[2] < held_mm[2])); then
            log "after the guest freed its swap: mem_used_total ${held_mm[2]} -> ${mm[2]}," \
                "orig_data_size ${held_mm[0]} -> ${mm[0]}, notify_free ${held_io[3]} -> ${io[3]}"
            record_pass "$name"
            return
        fi
        if ((SECONDS >= deadline)); then
            record_fail "$name" "60 s after the guest freed its swap: mem_used_total ${held_mm[2]} -> ${mm[2]:-?}, notify_free ${held_io[3]} -> ${io[3]:-?} (mm_stat '${mm[*]}')"
            return
        fi
        sleep 0.5
    done
}

# ctl_line CTL STAT OUT: one line of `vhost-user-zram ctl STAT`, also kept in OUT.STAT.
ctl_line() {
    local line
    line="$(timeout 10 "$VUZ_BIN" ctl --control-socket "$1" "$2" 2>"$3.$2.err")" || return 1
    echo "$line" >"$3.$2"
    echo "$line"
}

# suite multiqueue: two queues on the daemon and the QEMU device, two vCPUs. The guest writes
# 192 MiB of fio's incompressible verify data; vhost-user-zram runs in a memory cgroup of its
# own limited to MQ_MEMCG_MIB with a backing file and no memory flags, as an operator puts it
# under systemd's MemoryMax=: it must find the limit itself and write pages back to stay under
# it, with no I/O error and no OOM kill (multi-queue/memcg-*). The guest's RAM is preallocated
# so that QEMU, not the daemon, is charged for it.
MQ_MEMCG_MIB="${VUZ_MQ_MEMCG_MIB:-64}"
suite_multiqueue() {
    local out="$RESULTS_DIR/multiqueue" memcg="" why="" dir
    local DEVICE_ARGS=() DEVICE_CGROUP=""
    if [[ "$DEVICE_KIND" != vuz ]]; then
        why="the device is qemu-storage-daemon"
    elif ! memcg_filesystem_ok "${TMPDIR:-/tmp}"; then
        why="${TMPDIR:-/tmp} is tmpfs: a backing file there is charged to the daemon's cgroup"
    elif ! memcg_create vuz-mq "$MQ_MEMCG_MIB"; then
        why="$MEMCG_WHY"
    else
        memcg="$MEMCG_DIR"
        DEVICE_CGROUP="$memcg"
        DEVICE_ARGS=(--backing-file=@DIR@/backing)
    fi
    start_device MQ "$DEVICE_KIND" multiqueue 256M 2 vuz-mq RW "$RESULTS_DIR" || {
        record_fail multi-queue/device "the device did not start"
        return
    }
    [[ -z "$memcg" ]] || memcg_watch_bd_stat "$MQ_CTL" "$out.bd_stat.log" &
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$MQ_SOCK" 2)
    APPEND="vuz.mq=$MQ_SERIAL" SMP=2 PREALLOC=on \
        run_guest_bg "$GUEST" "$out" multiqueue "${VUZ_MQ_TIMEOUT:-300}" "${qargs[@]}"
    qemu_finish multiqueue "${VUZ_MQ_TIMEOUT:-300}"
    collect_results "$out" multiqueue multi-queue/{hw-queues,fio-verify-4k,fio-verify-64k}
    if [[ -z "$memcg" ]]; then
        record_skip multi-queue/memcg-limit "$why"
        record_skip multi-queue/memcg-writeback "$why"
    else
        # shellcheck disable=SC2153 # set by start_device
        wait_exit "$MQ_PID" 30 || stop_pid "$MQ_PID"
        check_memcg multi-queue "$out"
        memcg_remove "$memcg"
    fi
    suite_done
}

# memcg_watch_bd_stat CTL LOG: while the daemon answers, appends its bd_stat to LOG each second
# (the daemon exits with QEMU, so what it wrote back is read while it runs).
memcg_watch_bd_stat() {
    local ctl="$1" log="$2"
    while timeout 10 "$VUZ_BIN" ctl --control-socket "$ctl" bd_stat >>"$log" 2>/dev/null; do
        sleep 1
    done
}

# check_memcg SUITE OUT: the daemon stayed under its cgroup's limit, was never OOM-killed, and
# got there by writing pages back (bd_count > 0 at some point, none failed).
check_memcg() {
    local suite="$1" out="$2" peak kills most
    peak="$(memcg_peak)" kills="$(memcg_oom_kills)"
    log "$suite: cgroup peak $((peak >> 20)) MiB of $((MEMCG_LIMIT >> 20)) MiB, oom_kill $kills"
    if ((kills != 0)); then
        record_fail "$suite/memcg-limit" "the kernel OOM-killed $kills process(es) in the cgroup"
    elif ((peak > MEMCG_LIMIT)); then
        record_fail "$suite/memcg-limit" "peak usage $peak is above the limit $MEMCG_LIMIT"
    else
        record_pass "$suite/memcg-limit"
    fi
    most="$(awk 'NF == 3 && $1 > m { m = $1 } END { print m + 0 }' "$out.bd_stat.log" 2>/dev/null)"
    if ((most > 0)); then
        log "$suite: at most $most pages on the backing file"
        record_pass "$suite/memcg-writeback"
    else
        record_fail "$suite/memcg-writeback" \
            "no page went to the backing file (bd_stat log: $out.bd_stat.log)"
    fi
}

# suite lifecycle: data survives a guest reboot; the daemon exits 0 when QEMU goes away.
suite_lifecycle() {
    local out="$RESULTS_DIR/lifecycle"
    start_device LC "$DEVICE_KIND" lifecycle 128M 1 vuz-lifecycle RW "$RESULTS_DIR" || {
        record_fail lifecycle/device "the device did not start"
        return
    }
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$LC_SOCK" 1)
    APPEND="vuz.lc=$LC_SERIAL" SMP=1 REBOOT=yes \
        run_guest_bg "$GUEST" "$out" lifecycle "${VUZ_LC_TIMEOUT:-240}" "${qargs[@]}"
    # The daemon exits only after QEMU has gone, so watching it here still catches a crash.
    qemu_finish lifecycle "${VUZ_LC_TIMEOUT:-240}"
    collect_results "$out" lifecycle lifecycle/{write-before-reboot,data-after-reboot}
    local boots
    boots="$(tr -d '\r' <"$out.console.log" | grep -c 'VUZ-GUEST-READY' || true)"
    if [[ "$boots" == 2 ]]; then
        record_pass lifecycle/rebooted
    else
        record_fail lifecycle/rebooted "the guest booted $boots time(s), expected 2"
    fi
    if [[ "$LC_KIND" != vuz ]]; then
        record_skip lifecycle/daemon-exit "the device is qemu-storage-daemon (it does not exit)"
    elif ! wait_exit "$LC_PID" 30; then
        record_fail lifecycle/daemon-exit "the daemon still runs 30 s after QEMU exited"
    elif [[ "$EXIT_RC" != 0 ]]; then
        record_fail lifecycle/daemon-exit "the daemon exited with status $EXIT_RC"
    else
        record_pass lifecycle/daemon-exit
    fi
    stop_pid "$LC_PID"
    suite_done
}

# suite survive: the daemon dies under a swapping guest and comes back. The daemon keeps the
# guest's pages in a state file on tmpfs (--state); QEMU reconnects to its socket
# (reconnect=1). While the guest swaps out, and again while it swaps in, the host SIGKILLs the
# daemon and at once starts it again with the same arguments (same state, same socket); then
# once with SIGTERM (the upgrade path). Every page must verify, the guest kernel must have seen
# no I/O error, QEMU must still run and power off cleanly, and the daemon must exit 0 after QEMU
# and remove its state. Then a second, short QEMU process (survive-new) on a copy of the state
# the first kill left: it is another frontend, so it reads zeros and the old pages are
# destroyed; and when its daemon comes back without any state, its reads fail with I/O errors.

# The suite's daemon, as sv_launch starts it: arguments, log, process, sockets, state file.
SURV_ARGS=()
SURV_LOG=""
SURV_PID=""
SURV_SOCK=""
SURV_CTL=""
SURV_STATE=""
# After sv_restart: the old daemon's exit status, why it failed, the restart times (ms, from
# the signal to the new daemon listening) and how many restarts there were.
SURV_RC=""
SURV_WHY=""
SURV_TIMES=()
SURV_KILLS=0
# Per restart: the requests the new daemon found in flight and resubmitted.
SURV_RESUBMITTED=()
# A FIFO nobody writes, for sub-millisecond waits with the read builtin.
SURV_SLEEP_FD=""

# sv_setup DIR STATE LOG: the daemon's arguments for a socket in DIR and the state file STATE
# (none when empty): the same for every start of it.
sv_setup() {
    local dir="$1"
    SURV_SOCK="$dir/vhost.sock" SURV_CTL="$dir/ctl.sock" SURV_STATE="$2" SURV_LOG="$3"
    SURV_ARGS=(--socket-path "$SURV_SOCK" --control-socket "$SURV_CTL" --size 512M --num-queues 1
        --serial vuz-survive --log-level "${VUZ_LOG_LEVEL:-info}"
        ${DAEMON_ARGS[@]+"${DAEMON_ARGS[@]//@DIR@/$dir}"})
    [[ -z "$SURV_STATE" ]] || SURV_ARGS+=(--state "$SURV_STATE")
    : >"$SURV_LOG"
}

# sv_launch: starts the daemon with SURV_ARGS, appending to SURV_LOG, and watches it.
sv_launch() {
    echo "=== $(date +%T.%N) host: starting $VUZ_BIN ${SURV_ARGS[*]}" >>"$SURV_LOG"
    "$VUZ_BIN" "${SURV_ARGS[@]}" >>"$SURV_LOG" 2>&1 &
    SURV_PID=$!
    track_pid "$SURV_PID"
    WATCH_PIDS=("$SURV_PID")
}

# sv_listening: the daemon listens (waits up to 30 s). Sets SURV_LISTEN_MS (when it did).
SURV_LISTEN_MS=""
sv_listening() {
    local deadline=$((SECONDS + 30))
    until unix_listening "$SURV_SOCK"; do
        if pid_gone "$SURV_PID" || ((SECONDS >= deadline)); then
            return 1
        fi
        sv_sleep 0.005
    done
    SURV_LISTEN_MS="$(now_ms)"
}

# sv_sleep SECONDS: a wait without a fork (read -t on a FIFO nobody writes), for fine polling.
sv_sleep() { read -r -t "$1" -u "$SURV_SLEEP_FD" _ || true; }

# sv_stop SIGNAL: sends SIGNAL to the daemon and reaps it (30 s at most), polling every 10 ms
# so that the restart's timing is not the polling's; sets SURV_RC.
sv_stop() {
    local pid="$SURV_PID" deadline=$((SECONDS + 30))
    kill "-$1" "$pid" 2>/dev/null || true
    until pid_gone "$pid"; do
        ((SECONDS < deadline)) || return 1
        sv_sleep 0.01
    done
    SURV_RC=0
    wait "$pid" 2>/dev/null || SURV_RC=$?
    untrack_pid "$pid"
    WATCH_PIDS=()
}

# sv_figures: "READS WRITES CONNECTED ORIG_DATA_BYTES" from the running daemon's metrics:
# requests since it started, whether a frontend is connected, the data it holds.
sv_figures() {
    timeout 5 "$VUZ_BIN" ctl --control-socket "$SURV_CTL" metrics 2>/dev/null | awk '
        /^vhost_user_zram_requests_total\{.*type="read"/ { r = $NF }
        /^vhost_user_zram_requests_total\{.*type="write"/ { w = $NF }
        /^vhost_user_zram_frontend_connected/ { c = $NF }
        /^vhost_user_zram_mm_orig_data_size_bytes/ { o = $NF }
        END { if (r != "" && w != "" && c != "" && o != "") print r, w, c, o; else exit 1 }'
}

# sv_connected: a frontend is connected to the daemon.
sv_connected() {
    local f
    read -r -a f < <(sv_figures) || true
    [[ "${f[2]:-0}" == 1 ]]
}

# sv_wait_busy read|write|any N STOP SECONDS: waits until the daemon has served N more
# requests of that kind than when this was called, i.e. the guest is swapping through it right
# now. Returns 1 if the console shows STOP first (that phase is over), 2 if the guest or the
# daemon ended or SECONDS passed.
sv_wait_busy() {
    local kind="$1" n="$2" stop="$3" deadline=$((SECONDS + $4)) f count base=""
    while :; do
        if read -r -a f < <(sv_figures || true) && ((${#f[@]} == 4)); then
            case "$kind" in
                read) count="${f[0]}" ;;
                write) count="${f[1]}" ;;
                *) count=$((f[0] + f[1])) ;;
            esac
            [[ -n "$base" ]] || base="$count"
            ((count - base >= n)) && return 0
        fi
        console_has "$stop" && return 1
        if guest_or_device_ended || ((SECONDS >= deadline)); then
            return 2
        fi
        sleep 0.2
    done
}

# sv_restart KILL|TERM WHAT: signals the daemon and, as soon as it is gone, starts it again with
# the same arguments; waits for it to listen, for QEMU to reconnect and for the guest's requests
# to reach it. Logs the times from the signal. Returns 1 with SURV_WHY when one of these does not
# happen, when the state file is not there after the old daemon ended, or when the new daemon
# holds nothing while the old one held pages. With COPY_STATE=PATH, the first restart copies
# the state the old daemon left to PATH (survive-new uses it).
sv_restart() {
    local sig="$1" what="$2" t0 t_gone t_conn f before="" state_left=no
    SURV_WHY=""
    read -r -a f < <(sv_figures) || true
    ((${#f[@]} == 4)) && before="${f[3]}"
    local stopped=yes
    # (bash's "Killed" notice for the job, wherever it comes, goes to /dev/null.)
    {
        if [[ "${BACKLOG:-no}" == yes ]]; then
            # Let the guest queue requests while the daemon is stopped, then kill it a moment
            # after it resumes, while it works through them: the kill lands with requests
            # taken and not completed, which the new daemon must resubmit from the inflight
            # region. Builtins only: the kill follows the CONT by a millisecond (read -t on a
            # FIFO nobody writes), not by a fork's time, in which the backlog would be gone.
            kill -STOP "$SURV_PID"
            sleep 0.5
            kill -CONT "$SURV_PID"
            sv_sleep "${VUZ_SURVIVE_KILL_DELAY:-0.001}"
            kill "-$sig" "$SURV_PID"
        fi
        t0="$(now_ms)"
        sv_stop "$sig" || stopped=no
        t_gone="$(now_ms)"
    } 2>/dev/null
    if [[ "$stopped" == no ]]; then
        SURV_WHY="the daemon (pid $SURV_PID) still runs 30 s after SIG$sig"
        return 1
    fi
    local state_kib=""
    if [[ -n "$SURV_STATE" && -e "$SURV_STATE" ]]; then
        state_left=yes
        state_kib="$(du -sk "$SURV_STATE" 2>/dev/null | cut -f1 || true)"
    fi
    local copied=""
    if [[ -n "${COPY_STATE:-}" && "$state_left" == yes && ! -e "${COPY_STATE:-}" ]]; then
        track_path "$COPY_STATE"
        cp -a --sparse=always "$SURV_STATE" "$COPY_STATE" || warn "cannot copy $SURV_STATE"
        copied=" (of which $(($(now_ms) - t_gone)) ms copying the state for survive-new)"
    fi
    sv_launch
    if ! sv_listening; then
        SURV_WHY="the restarted daemon did not listen on $SURV_SOCK within 30 s (log: $SURV_LOG)"
        return 1
    fi
    SURV_KILLS=$((SURV_KILLS + 1))
    SURV_TIMES+=($((SURV_LISTEN_MS - t0)))
    if ! poll_until 30 "QEMU to reconnect" sv_connected; then
        SURV_WHY="QEMU did not reconnect within 30 s of the restart (log: $SURV_LOG)"
        return 1
    fi
    t_conn="$(now_ms)"
    read -r -a f < <(sv_figures) || true
    log "survive: $what: SIG$sig; the daemon gone after $((t_gone - t0)) ms (status $SURV_RC," \
        "state file left: $state_left), the new one listening after $((SURV_LISTEN_MS - t0)) ms," \
        "QEMU reconnected after $((t_conn - t0)) ms$copied; orig_data_size ${before:-?} before," \
        "${f[3]:-?} after"
    echo "$what: SIG$sig gone_ms=$((t_gone - t0)) status=$SURV_RC state_left=$state_left" \
        "listening_ms=$((SURV_LISTEN_MS - t0)) reconnected_ms=$((t_conn - t0))" \
        "orig_data_size_before=${before:-?} after=${f[3]:-?} state_kib=${state_kib:-?}" \
        >>"$RESULTS_DIR/survive.restarts"
    if [[ -n "$SURV_STATE" && "$state_left" == no ]]; then
        SURV_WHY="no state file at $SURV_STATE after SIG$sig"
        return 1
    fi
    if [[ -n "$SURV_STATE" ]] && ((${before:-0} > 0 && ${f[3]:-0} == 0)); then
        SURV_WHY="the restarted daemon holds nothing (orig_data_size 0; $before bytes before SIG$sig)"
        return 1
    fi
    # The guest had requests under way: they go on through the new daemon.
    if [[ "$(sv_wait_busy any 1 'VUZ-SURVIVE-VERIFIED' 30 && echo ok)" != ok ]] &&
        ! console_has 'VUZ-SURVIVE-VERIFIED'; then
        SURV_WHY="no request reached the restarted daemon within 30 s"
        return 1
    fi
    # Whether the kill caught requests taken and not completed (the new daemon resubmits them
    # from the inflight region first, and says so): a matter of timing, logged, not checked.
    local resubmitted
    resubmitted="$(awk '/host: starting/ { n = 0 } /resubmitting [0-9]+ request/ {
        for (i = 1; i < NF; i++) if ($i == "resubmitting") n += $(i + 1) } END { print n + 0 }' \
        "$SURV_LOG")"
    SURV_RESUBMITTED+=("$resubmitted")
    log "survive: $what: the new daemon resubmitted $resubmitted request(s) the old one had taken"
}

suite_survive() {
    local out="$RESULTS_DIR/survive" ram="$GUEST_RAM_MIB" dir state=""
    local timeout="${VUZ_SURVIVE_TIMEOUT:-600}" pressure_mib=$((ram * 22 / 10))
    if [[ "$DEVICE_KIND" != vuz ]]; then
        record_skip survive/suite "the device is qemu-storage-daemon; the suite kills and restarts vhost-user-zram"
        return
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-survive.XXXXXX")"
    track_path "$dir"
    if "$VUZ_BIN" --help 2>&1 | grep -q -- '--state'; then
        state="/dev/shm/vuz-survive-$$-${dir##*.}.state"
        track_path "$state"
    else
        record_fail survive/state-option "$VUZ_BIN has no --state option: pages cannot survive a restart"
    fi
    sv_setup "$dir" "$state" "$RESULTS_DIR/survive.daemon.log"
    mkfifo "$dir/sleep.fifo"
    exec {SURV_SLEEP_FD}<>"$dir/sleep.fifo"
    : >"$RESULTS_DIR/survive.restarts"
    SURV_KILLS=0 SURV_TIMES=() SURV_RESUBMITTED=()
    log "survive: ${pressure_mib} MiB anonymous in ${ram} MiB RAM, seed $SEED; daemon: ${SURV_ARGS[*]}"
    sv_launch
    if ! sv_listening; then
        record_fail survive/device "the daemon did not start (log: $SURV_LOG)"
        return
    fi
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$SURV_SOCK" 1 1)
    APPEND="vuz.sv=vuz-survive vuz.seed=$SEED vuz.pressure_mib=$pressure_mib" SMP=2 \
        run_guest_bg "$GUEST" "$out" survive "$timeout" "${qargs[@]}"

    sv_kill_phases "$timeout"

    # The guest has verified every page: QEMU, the same process, still runs.
    if wait_console 'VUZ-SURVIVE-VERIFIED' "$timeout" && ! pid_gone "$QEMU_PID"; then
        record_pass survive/qemu-alive
    else
        record_fail survive/qemu-alive "QEMU ended before the guest verified its pages: $(tail -n 3 "$out.qemu.log" | tr '\n' ' ')"
    fi
    local daemon="$SURV_PID"
    qemu_finish survive "$timeout"
    if [[ "$EXIT_RC" == 0 ]] && console_has 'VUZ-GUEST-DONE test=survive'; then
        record_pass survive/guest-poweroff
    else
        record_fail survive/guest-poweroff "QEMU exited with status $EXIT_RC (console: $out.console.log, QEMU log: $out.qemu.log)"
    fi
    collect_results "$out" survive \
        survive/{swapon,checksums,swapped-out,swapped-in,no-io-errors,swapoff}
    if ! wait_exit "$daemon" 30; then
        record_fail survive/daemon-exit "the daemon still runs 30 s after QEMU exited"
    elif [[ "$EXIT_RC" != 0 ]]; then
        record_fail survive/daemon-exit "the daemon exited with status $EXIT_RC after QEMU (log: $SURV_LOG)"
    else
        record_pass survive/daemon-exit
    fi
    stop_pid "$daemon"
    untrack_pid "$daemon"
    WATCH_PIDS=()
    if [[ -z "$state" ]]; then
        record_skip survive/state-removed-at-end "the daemon has no --state"
    elif [[ -e "$state" ]]; then
        record_fail survive/state-removed-at-end "$state is still there after the daemon's normal end"
    else
        record_pass survive/state-removed-at-end
    fi
    local times="${SURV_TIMES[*]}"
    log "survive: $SURV_KILLS restarts; from the signal to the new daemon listening: ${times// / ms, } ms;" \
        "requests in flight resubmitted: ${SURV_RESUBMITTED[*]:-none}"
    survive_new "$timeout" "${state:+$state.old}"
}

# sv_kill_phases TIMEOUT: the kills while the survive guest swaps: two SIGKILLs while it swaps
# out (the fill's writes; fewer if the fill ends first), then SIGKILLs while it swaps in (the
# verify passes' reads) until there were three in all, then a SIGTERM while it still swaps in.
# Each waits for the guest's requests to flow through the daemon of the moment.
sv_kill_phases() {
    local timeout="$1" n=0 out_kills=0 in_kills=0 rc why=""
    # About 16 MiB swapped out, a few MiB swapped in, through the daemon of the moment.
    local writes="${VUZ_SURVIVE_WRITES:-128}" reads="${VUZ_SURVIVE_READS:-256}"
    local state_copy="${SURV_STATE:+$SURV_STATE.old}"
    if ! wait_console 'VUZ-SURVIVE-SWAP-OUT' "$timeout"; then
        why="the guest never started to swap (console: $RESULTS_DIR/survive.console.log)"
        record_fail survive/sigkill-during-swap-out "$why"
        record_fail survive/sigkill-during-swap-in "$why"
        record_fail survive/upgrade-sigterm "$why"
        return
    fi
    while ((out_kills < 2)); do
        rc=0
        sv_wait_busy write "$writes" 'PRESSURE-FILLED' "$timeout" || rc=$?
        ((rc == 1)) && break
        ((rc == 0)) || { why="the guest or the daemon ended, or $timeout s passed, before kill $((n + 1))" && break; }
        n=$((n + 1))
        # The first kill lands wherever the daemon is; the second after a backlog.
        if ! BACKLOG="$([[ $n == 1 ]] && echo no || echo yes)" COPY_STATE="$state_copy" \
            sv_restart KILL "SIGKILL $n (swap-out)"; then
            why="SIGKILL $n: $SURV_WHY"
            break
        fi
        out_kills=$((out_kills + 1))
    done
    if [[ -n "$why" ]]; then
        record_fail survive/sigkill-during-swap-out "$why"
    elif ((out_kills == 0)); then
        why="the fill ended before $writes write requests reached the daemon"
        record_fail survive/sigkill-during-swap-out "$why"
    else
        record_pass survive/sigkill-during-swap-out
    fi
    [[ -z "$why" ]] || why="" # a fill too short still leaves the swap-in to test
    if [[ -n "$SURV_WHY" ]]; then
        record_fail survive/sigkill-during-swap-in "not tried: a restart failed"
        record_fail survive/upgrade-sigterm "not tried: a restart failed"
        return
    fi
    while ((n < 3 || in_kills < 1)); do
        rc=0
        sv_wait_busy read "$reads" 'VUZ-SURVIVE-VERIFIED' "$timeout" || rc=$?
        if ((rc != 0)); then
            why="the guest stopped swapping in (or $timeout s passed) before SIGKILL $((n + 1))"
            break
        fi
        if ! console_has 'PRESSURE-FILLED'; then
            # Still the fill: its reads are not the swap-in yet.
            sleep 0.2
            continue
        fi
        n=$((n + 1))
        if ! BACKLOG=yes COPY_STATE="$state_copy" sv_restart KILL "SIGKILL $n (swap-in)"; then
            why="SIGKILL $n: $SURV_WHY"
            break
        fi
        in_kills=$((in_kills + 1))
    done
    if [[ -n "$why" ]]; then
        record_fail survive/sigkill-during-swap-in "$why"
    else
        record_pass survive/sigkill-during-swap-in
    fi
    if [[ -n "$SURV_WHY" ]]; then
        record_fail survive/upgrade-sigterm "not tried: a restart failed"
        return
    fi
    rc=0
    sv_wait_busy read "$reads" 'VUZ-SURVIVE-VERIFIED' "$timeout" || rc=$?
    if ((rc != 0)); then
        record_fail survive/upgrade-sigterm "the guest stopped swapping in (or $timeout s passed) before the SIGTERM"
    elif ! sv_restart TERM "SIGTERM (upgrade, swap-in)"; then
        record_fail survive/upgrade-sigterm "$SURV_WHY"
    elif [[ "$SURV_RC" != 0 ]]; then
        record_fail survive/upgrade-sigterm "the daemon exited with status $SURV_RC on SIGTERM with the frontend connected"
    else
        record_pass survive/upgrade-sigterm
    fi
}

# survive_new TIMEOUT OLD_STATE: a new QEMU process (the guest's survive-new test) on a daemon
# started with OLD_STATE, a copy of the survive guest's state: another frontend, so the guest
# reads zeros and the daemon drops the old pages. Then, with data written, the daemon is killed
# and started again without its state file: the guest's reads must fail with I/O errors.
survive_new() {
    local timeout="$1" old="$2" out="$RESULTS_DIR/survive-new" dir f
    local checks=(survive/{identity-new-frontend-reads-zeros,identity-old-state-destroyed}
        survive/{refused-reads-fail,refused-kernel-reports-io-error,refused-daemon-log})
    if [[ -z "$old" || ! -e "$old" ]]; then
        local name
        for name in "${checks[@]}"; do
            record_fail "$name" "not tried: no state of the survive guest was kept (no --state, or no SIGKILL left one)"
        done
        return
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-survive.XXXXXX")"
    track_path "$dir"
    sv_setup "$dir" "$old" "$RESULTS_DIR/survive-new.daemon.log"
    sv_launch
    if ! sv_listening; then
        record_fail survive/identity-new-frontend-reads-zeros "the daemon did not start on the old state (log: $SURV_LOG)"
        return
    fi
    local before_orig before_kib
    read -r -a f < <(sv_figures) || true
    before_orig="${f[3]:-?}"
    before_kib="$(du -sk "$old" 2>/dev/null | cut -f1 || true)"
    log "survive-new: the daemon on the old state holds orig_data_size $before_orig; the state takes $before_kib KiB"
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$SURV_SOCK" 1 1)
    APPEND="vuz.sv=vuz-survive" SMP=2 \
        run_guest_bg "$GUEST" "$out" survive-new "$timeout" "${qargs[@]}"
    if wait_console 'VUZ-HOSTCHECK-IDENTITY' "$timeout"; then
        local after_kib="gone"
        read -r -a f < <(sv_figures) || true
        [[ ! -e "$old" ]] || after_kib="$(du -sk "$old" 2>/dev/null | cut -f1 || true)"
        log "survive-new: with the new frontend: orig_data_size ${f[3]:-?}, state $after_kib KiB"
        if [[ "$before_orig" == 0 || "$before_orig" == "?" ]]; then
            record_fail survive/identity-old-state-destroyed "the daemon started on the old state held no pages (orig_data_size $before_orig), so nothing was there to destroy"
        elif [[ "${f[3]:-}" != 0 ]]; then
            record_fail survive/identity-old-state-destroyed "the daemon holds orig_data_size ${f[3]:-?} (was $before_orig) with a new frontend"
        else
            record_pass survive/identity-old-state-destroyed
        fi
        console_send "go"
    else
        record_fail survive/identity-old-state-destroyed "the guest never reached the check"
    fi
    if wait_console 'VUZ-HOSTCHECK-REFUSE' "$timeout"; then
        # The daemon dies, its state with it; it comes back empty on the same socket.
        local t0
        t0="$(now_ms)"
        if ! sv_stop KILL 2>/dev/null; then
            record_fail survive/refused-daemon-log "the daemon survived SIGKILL"
        fi
        rm -rf -- "$old"
        sv_launch
        if sv_listening && poll_until 30 "QEMU to reconnect" sv_connected; then
            log "survive-new: restarted without state; QEMU reconnected after $(($(now_ms) - t0)) ms"
        else
            log "survive-new: restarted without state; no frontend connected within 30 s (log: $SURV_LOG)"
        fi
        console_send "go"
    fi
    qemu_finish survive-new "$timeout"
    collect_results "$out" survive-new \
        survive/{identity-new-frontend-reads-zeros,refused-reads-fail,refused-kernel-reports-io-error}
    local refusal
    # What the daemon said after its start without state (the second in its log).
    refusal="$(awk '/host: starting/ { n++ } n >= 2' "$SURV_LOG" |
        grep -Ei 'refus|does not hold|cannot give' | head -n 1 || true)"
    if [[ -n "$refusal" ]]; then
        log "survive-new: the daemon said: $refusal"
        record_pass survive/refused-daemon-log
    else
        record_fail survive/refused-daemon-log "the daemon restarted without state logged no refusal (log: $SURV_LOG)"
    fi
    if wait_exit "$SURV_PID" 10; then
        log "survive-new: the daemon exited with status $EXIT_RC"
    fi
    stop_pid "$SURV_PID"
    untrack_pid "$SURV_PID"
    WATCH_PIDS=()
}

# suite libvirt: the swap test of main, once more, in a guest libvirt starts as an operator
# would: a daemon with --num-queues 2 and its socket group-accessible to the unprivileged QEMU
# libvirt runs (--socket-mode 0660, chown to QEMU's group), a domain with contrib/
# libvirt-disk.xml's memory backing and disk (virsh define, start), the host's checks of the
# daemon while the guest swaps, the guest powering itself off (ACPI), the daemon exiting 0.
suite_libvirt() {
    local RESULT_PREFIX=libvirt/ out="$RESULTS_DIR/libvirt" ram="$GUEST_RAM_MIB"
    local timeout="${VUZ_LIBVIRT_TIMEOUT:-300}"
    # Less pressure than main's (2.2x and 0.8x RAM), still far past RAM: this suite is about
    # the path through libvirt, and main already swaps hard; it keeps the boot near 2 minutes.
    local pressure_mib=$((ram * 3 / 2)) tmpfs_mib=$((ram * 4 / 10))
    if [[ "$DEVICE_KIND" != vuz ]]; then
        record_skip suite "the device is qemu-storage-daemon, and the suite checks the daemon"
        return
    fi
    if ! libvirt_up "$RESULTS_DIR"; then
        record_skip suite "$LIBVIRT_SKIP"
        return
    fi
    local type=qemu group
    [[ "$ACCEL" == kvm ]] && type=kvm
    group="$(libvirt_qemu_group)"
    # What the README tells an operator: the vhost-user socket 0660 and owned by QEMU's group,
    # the control socket root's alone.
    local DAEMON_ARGS=(${DAEMON_ARGS[@]+"${DAEMON_ARGS[@]}"} --socket-mode=0660
        --control-socket-mode=0600)
    start_device LV vuz libvirt 1G 2 vuz-libvirt RW "$RESULTS_DIR" || {
        record_fail device "the daemon did not start"
        return
    }
    if ! chown "root:$group" "$LV_SOCK" || ! chmod 0711 "$(dirname "$LV_SOCK")"; then
        record_fail device "cannot give $LV_SOCK to group $group"
        return
    fi
    local modes
    modes="$(stat -c %a "$LV_SOCK" "$LV_CTL" | tr '\n' ' ')"
    if [[ "$modes" == "660 600 " ]]; then
        record_pass socket-modes
    else
        record_fail socket-modes "the vhost-user and control sockets are $modes, expected 660 and 600"
    fi

    libvirt_guest_dir "$GUEST" "$out"
    local name="vuz-guest-test-$$"
    local cmdline="console=ttyS0 quiet loglevel=3 panic=-1 zswap.enabled=0 vuz.test=libvirt \
vuz.rw=$LV_SERIAL vuz.seed=$SEED vuz.pressure_mib=$pressure_mib vuz.tmpfs_mib=$tmpfs_mib ${VUZ_GUEST_APPEND:-}"
    libvirt_domain_xml "$name" "$type" "$LIBVIRT_DIR" "$LV_SOCK" "$cmdline" >"$out.domain.xml"
    LIBVIRT_DOMAINS+=("$name")
    log "libvirt: define and start $name ($type, QEMU in group $group), seed $SEED"
    if ! virsh_ define "$out.domain.xml" >"$out.virsh.log" 2>&1 ||
        ! virsh_ start "$name" >>"$out.virsh.log" 2>&1; then
        record_fail start "virsh define/start failed: $(tail -n 3 "$out.virsh.log" | tr '\n' ' ')"
        libvirt_cleanup
        suite_done
        return
    fi
    QEMU_PID="$(cat "/run/libvirt/qemu/$name.pid" 2>/dev/null || true)"
    cp "/var/log/libvirt/qemu/$name.log" "$out.qemu.log" 2>/dev/null || true
    local user
    user="$(ps -o user= -p "${QEMU_PID:-0}" 2>/dev/null || true)"
    if [[ -z "$user" ]]; then
        record_fail qemu-unprivileged "no QEMU process for $name (pid '$QEMU_PID')"
    elif [[ "$user" == root ]]; then
        record_fail qemu-unprivileged "libvirt runs QEMU as root, so the socket's group is not tested"
    else
        record_pass qemu-unprivileged
    fi

    # The host's checks while the guest swaps, as in main.
    if wait_console 'VUZ-HOSTCHECK-MMSTAT' "$timeout"; then
        check_mm_stat vuz "$LV_CTL" "$out"
        console_send "go"
    else
        record_fail swap-under-pressure/mm-stat "the guest never reached the point to check it"
    fi
    if wait_console 'VUZ-HOSTCHECK-FREED' "$timeout"; then
        check_discard_frees vuz "$LV_CTL" "$out"
        console_send "go"
    else
        record_fail swap-under-pressure/discard-frees-host-memory \
            "the guest never reached the point to check it"
    fi

    # The guest powers itself off: libvirt sees a shutdown, not a crash or a destroy.
    local state
    poll_until "$timeout" "domain $name to shut off" libvirt_domain_off "$name" || true
    state="$(libvirt_domain_state "$name")"
    cp "/var/log/libvirt/qemu/$name.log" "$out.qemu.log" 2>/dev/null || true
    if [[ "$state" == "shut off (shutdown)" ]]; then
        record_pass powered-off
    else
        record_fail powered-off "the domain is '$state', expected 'shut off (shutdown)' (console: $out.console.log)"
    fi
    collect_results "$out" libvirt \
        swap-under-pressure/{non-rotational,swapon,anon-pages,swap-used,tmpfs-files,swapoff}
    if ! wait_exit "$LV_PID" 30; then
        record_fail daemon-exit "the daemon still runs 30 s after QEMU exited"
    elif [[ "$EXIT_RC" != 0 ]]; then
        record_fail daemon-exit "the daemon exited with status $EXIT_RC"
    else
        record_pass daemon-exit
    fi
    libvirt_cleanup
    suite_done
}

# suite units: multi-page units. A Debian 6.12 guest (setup.sh's units/ kernel, the same root
# fs) swaps out 64 KiB folios (mTHP), which reach the disk as 64 KiB writes of contiguous,
# aligned pages (the guest turns the block layer's merges off, which would join neighbouring
# swap-outs into longer writes; VUZ_UNITS_NOMERGES=0 keeps them): the daemon started with
# --unit-max 64K (VUZ_UNIT_MAX) must store them as units (units.units_stored > 0 in stats-json
# while the pages are out), and every page must verify.
# The same workload then swaps to a second disk whose daemon stores page by page
# (--unit-max 4K; VUZ_UNITS_COMPARE=0 leaves it out), and the two daemons' mem_used_total go to
# the log and to results/guest/units.figures. A daemon without --unit-max fails
# units/unit-max-flag and units/units-stored and runs without it, so that the rest still runs;
# VUZ_UNIT_MAX= (empty) runs both daemons without it and skips units/units-stored.
suite_units() {
    local out="$RESULTS_DIR/units" ram="$GUEST_RAM_MIB" timeout="${VUZ_UNITS_TIMEOUT:-600}"
    local pressure_mib=$((ram * 3 / 2)) unit_max="${VUZ_UNIT_MAX-64K}" compare="${VUZ_UNITS_COMPARE:-1}"
    local kernel="$GUEST/units"
    if [[ "$DEVICE_KIND" != vuz ]]; then
        record_skip units/suite "the device is qemu-storage-daemon, and the suite checks the daemon's units"
        return
    fi
    if [[ ! -f "$kernel/ready" ]]; then
        record_fail units/kernel "no 6.12 kernel in the guest cache ($kernel): setup.sh found no linux-image-6.12.N+deb12-amd64-unsigned (VUZ_UNITS_KERNEL_PKG names one)"
        return
    fi
    local units_args=() page_args=()
    if [[ -z "$unit_max" ]]; then
        record_skip units/unit-max-flag "VUZ_UNIT_MAX is empty: both daemons run without --unit-max"
    elif ! "$VUZ_BIN" --help 2>&1 | grep -q -- '--unit-max'; then
        record_fail units/unit-max-flag "$VUZ_BIN has no --unit-max: both daemons run without it"
    else
        record_pass units/unit-max-flag
        units_args=("--unit-max=$unit_max")
        page_args=(--unit-max=4K)
    fi
    local DEVICE_ARGS=(${units_args[@]+"${units_args[@]}"})
    start_device UN vuz units 512M 1 vuz-units RW "$RESULTS_DIR" || {
        record_fail units/device "the daemon with units did not start (log: $RESULTS_DIR/units.daemon.log)"
        return
    }
    local qargs pp_append=""
    mapfile -t qargs < <(vhost_user_args vuz0 "$UN_SOCK" 1)
    if [[ "$compare" == 1 ]]; then
        DEVICE_ARGS=(${page_args[@]+"${page_args[@]}"})
        start_device PP vuz units-per-page 512M 1 vuz-per-page RW "$RESULTS_DIR" || {
            record_fail units/device "the per-page daemon did not start (log: $RESULTS_DIR/units-per-page.daemon.log)"
            return
        }
        mapfile -t -O "${#qargs[@]}" qargs < <(vhost_user_args vuz1 "$PP_SOCK" 1)
        pp_append="vuz.pp=$PP_SERIAL"
    fi
    log "units: ${pressure_mib} MiB anonymous in ${ram} MiB RAM$([[ "$compare" == 1 ]] && echo ", twice (units, then page by page)"), seed $SEED," \
        "kernel $(sed -n 's/^kernel_package=//p' "$kernel/manifest")"
    KERNEL_DIR="$kernel" APPEND="vuz.un=$UN_SERIAL $pp_append vuz.seed=$SEED vuz.pressure_mib=$pressure_mib \
vuz.nomerges=${VUZ_UNITS_NOMERGES:-2}" SMP=2 run_guest_bg "$GUEST" "$out" units "$timeout" "${qargs[@]}"

    local -A fig=()
    if wait_console 'VUZ-HOSTCHECK-UNITS .* ready' "$timeout"; then
        units_figures "$UN_CTL" "$out" units 'VUZ-HOSTCHECK-UNITS'
        check_multi_page_writes
        check_units_stored "$unit_max" "${#units_args[@]}" "$out"
        console_send "go"
    else
        record_fail units/multi-page-writes "the guest never reached the point to check it"
        record_fail units/units-stored "the guest never reached the point to check it"
    fi
    local checks=(units/{mthp-enabled,swapon,checksums,mthp-swpout,swapoff,no-io-errors})
    if [[ "$compare" == 1 ]]; then
        if wait_console 'VUZ-HOSTCHECK-PER-PAGE .* ready' "$timeout"; then
            units_figures "$PP_CTL" "$out.per-page" per-page 'VUZ-HOSTCHECK-PER-PAGE'
            console_send "go"
        fi
        checks+=(units/per-page/{swapon,checksums,mthp-swpout,swapoff})
    fi
    qemu_finish units "$timeout"
    collect_results "$out" units "${checks[@]}"
    units_report "$out.figures" "$unit_max"
    suite_done
}

# units_figures CTL OUT KEY MARKER: while the guest holds its pages on swap, the daemon's
# stats-json (kept in OUT.stats.json) and mm_stat, and what the guest said on its MARKER line,
# into fig[KEY.*].
units_figures() {
    local ctl="$1" out="$2" key="$3" marker="$4" mm line word
    timeout 10 "$VUZ_BIN" ctl --control-socket "$ctl" stats --json >"$out.stats.json" 2>&1 || true
    fig[$key.units_stored]="$(jq -r '.units.units_stored // "absent"' "$out.stats.json" 2>/dev/null || echo absent)"
    fig[$key.unit_members]="$(jq -r '.units.unit_members // "absent"' "$out.stats.json" 2>/dev/null || echo absent)"
    # Write requests against pages swapped out: with 64 KiB swap-outs, fewer requests than pages.
    fig[$key.write_requests]="$(timeout 10 "$VUZ_BIN" ctl --control-socket "$ctl" metrics 2>/dev/null |
        awk '/^vhost_user_zram_requests_total\{.*type="write"/ { print $NF }')"
    if read -r -a mm < <(ctl_line "$ctl" mm_stat "$out") && ((${#mm[@]} == 9)); then
        fig[$key.orig_data_size]="${mm[0]}" fig[$key.compr_data_size]="${mm[1]}"
        fig[$key.mem_used_total]="${mm[2]}" fig[$key.same_pages]="${mm[5]}"
    fi
    line="$(tr -d '\r' <"$CONSOLE_LOG" | grep -m1 -- "$marker")"
    for word in $line; do
        [[ "$word" != *=* ]] || fig[$key.${word%%=*}]="${word#*=}"
    done
    log "units ($key): mm_stat ${mm[*]:-?}; units_stored ${fig[$key.units_stored]}," \
        "unit_members ${fig[$key.unit_members]}, write requests ${fig[$key.write_requests]:-?};" \
        "guest: ${line#*"$marker" }"
}

# check_multi_page_writes: the guest's 64 KiB swap-outs reached the daemon as writes of several
# pages: it served fewer write requests than the guest swapped out pages (with merges off,
# exactly pswpout - 15 x swpout_64k, and mkswap's).
check_multi_page_writes() {
    local name=units/multi-page-writes writes="${fig[units.write_requests]:-}" pages="${fig[units.pswpout]:-}"
    if [[ ! "$writes" =~ ^[0-9]+$ || ! "$pages" =~ ^[0-9]+$ ]]; then
        record_fail "$name" "no figures: write requests '$writes', pswpout '$pages'"
    elif ((writes < pages)); then
        record_pass "$name"
    else
        record_fail "$name" "$writes write requests for $pages pages swapped out (${fig[units.swpout_64k]:-?} as 64 KiB folios)"
    fi
}

# check_units_stored UNIT_MAX FLAG_GIVEN OUT: the daemon with units stored some of the guest's
# 64 KiB writes as units.
check_units_stored() {
    local unit_max="$1" given="$2" out="$3" name=units/units-stored stored="${fig[units.units_stored]}"
    local why="(guest: ${fig[units.swpout_64k]:-?} 64 KiB folios swapped out whole; stats: $out.stats.json)"
    if [[ -z "$unit_max" ]]; then
        record_skip "$name" "VUZ_UNIT_MAX is empty: the daemon runs without --unit-max"
    elif ((given == 0)); then
        record_fail "$name" "not tried: the daemon has no --unit-max"
    elif [[ "$stored" == absent ]]; then
        record_fail "$name" "stats-json has no units.units_stored $why"
    elif [[ "$stored" =~ ^[0-9]+$ ]] && ((stored > 0)); then
        record_pass "$name"
    else
        record_fail "$name" "units.units_stored is '$stored' with --unit-max $unit_max $why"
    fi
}

# units_report FILE UNIT_MAX: the figures of both daemons, in the log and in FILE.
units_report() {
    local file="$1" unit_max="$2" key
    for key in "${!fig[@]}"; do
        echo "$key=${fig[$key]}"
    done | sort >"$file"
    log "units: with --unit-max ${unit_max:-(none)}: mem_used_total ${fig[units.mem_used_total]:-?}" \
        "for orig_data_size ${fig[units.orig_data_size]:-?}, units_stored ${fig[units.units_stored]:-?}," \
        "unit_members ${fig[units.unit_members]:-?}; the guest swapped out ${fig[units.pswpout]:-?} pages," \
        "${fig[units.swpout_64k]:-?} of them as 64 KiB folios, in ${fig[units.write_requests]:-?} write requests"
    [[ -z "${fig[per-page.mem_used_total]:-}" ]] ||
        log "units: page by page: mem_used_total ${fig[per-page.mem_used_total]}" \
            "for orig_data_size ${fig[per-page.orig_data_size]:-?}; the guest swapped out" \
            "${fig[per-page.pswpout]:-?} pages, ${fig[per-page.swpout_64k]:-?} of them as 64 KiB folios," \
            "in ${fig[per-page.write_requests]:-?} write requests"
    log "units: figures in $file"
}

usage() { sed -n '/^# Usage:/,/^[^#]/s/^# \{0,1\}//p' "$0"; }

main() {
    local accel=auto device=auto suites=main,multiqueue,lifecycle,survive,migrate,units bench=yes
    while (($#)); do
        case "$1" in
            --accel) accel="$2" && shift ;;
            --device) device="$2" && shift ;;
            --suites) suites="$2" && shift ;;
            --no-bench) bench=no ;;
            --daemon-arg) DAEMON_ARGS+=("$2") && shift ;;
            --bench-only) suites="" ;;
            -h | --help) usage && exit 0 ;;
            *) usage >&2 && exit 2 ;;
        esac
        shift
    done
    install_cleanup_trap
    local start=$SECONDS
    GUEST="$("$GT_DIR/setup.sh" | tail -n 1)"
    rm -rf "$RESULTS_DIR"
    mkdir -p "$RESULTS_DIR"
    resolve_device_kind "$device"
    log "device under test: $DEVICE_KIND; guest: $GUEST; results: $RESULTS_DIR"
    pick_accel "$accel" "$GUEST" "$RESULTS_DIR"

    local suite t0
    for suite in ${suites//,/ }; do
        t0=$SECONDS
        log "=== suite $suite"
        "suite_$suite"
        log "=== suite $suite took $((SECONDS - t0)) s"
    done
    if [[ "$bench" == yes ]]; then
        t0=$SECONDS
        log "=== fio bench"
        if "$REPO_DIR/ci/fio-bench.sh" --guest "$GUEST" --accel "$ACCEL" --device "$DEVICE_KIND"; then
            record_pass fio-bench
        else
            record_fail fio-bench "ci/fio-bench.sh failed (logs in $REPO_DIR/results/fio)"
        fi
        log "=== fio bench took $((SECONDS - t0)) s"
    fi
    log "guest stage took $((SECONDS - start)) s on $ACCEL"
    echo "$PASSED passed, $FAILED failed"
    ((FAILED == 0))
}

main "$@"
