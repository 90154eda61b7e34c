# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The migrate suite (sourced by run.sh): a swapping guest is live-migrated, with its swap, from
# one QEMU and daemon to another on this host, the way README.md's "Live migration" section
# tells an operator to do it. Sourced by run.sh after lib.sh; not run.
#
# 1. The source daemon and QEMU; the guest (vuz.test=migrate) puts swap on the disk and runs the
#    pressure program (fill, then verify passes), as the survive suite's guest does.
# 2. A failed migration: a destination daemon is started with --incoming, `ctl migrate` starts
#    the stream, and the destination daemon is SIGKILLed mid-stream. The source must report the
#    migration failed; the VM is stopped and resumed (`stop`, `cont`) and goes on swapping.
# 3. The migration: a new destination daemon, a destination QEMU with -incoming (sharing a copy
#    of the root image: snapshot=on's private overlay would not migrate), `ctl migrate`, then
#    QEMU's own `migrate`. After the switchover the guest runs on the destination and verifies
#    every page it swapped; the source QEMU is told to quit and its daemon must end with 0.

# mg_daemon NAME ARGS...: starts a daemon for this suite, logging to
# $RESULTS_DIR/migrate.NAME.daemon.log; sets MG_PID.
MG_PID=""
mg_daemon() {
    local name="$1" log="$RESULTS_DIR/migrate.$1.daemon.log"
    shift
    echo "=== $(date +%T.%N) host: starting $VUZ_BIN $*" >>"$log"
    "$VUZ_BIN" "$@" >>"$log" 2>&1 &
    MG_PID=$!
    track_pid "$MG_PID"
    log "migrate: $name daemon (pid $MG_PID): $*"
}

# mg_ctl CTL ARGS...: a ctl command to the daemon behind the control socket CTL.
mg_ctl() {
    local ctl="$1"
    shift
    timeout 30 "$VUZ_BIN" ctl --control-socket "$ctl" "$@"
}

# mg_state CTL: the state line of `ctl migrate-status` (empty when the daemon does not answer).
mg_state() { mg_ctl "$1" migrate-status 2>/dev/null | awk '$1 == "state" { print $2 }'; }

# mg_field CTL KEY: one value of `ctl migrate-status`.
mg_field() { mg_ctl "$1" migrate-status 2>/dev/null | awk -v k="$2" '$1 == k { print $2 }'; }

# mg_wait_state CTL REGEX SECONDS: waits until the migration state matches REGEX.
mg_wait_state() {
    local deadline=$((SECONDS + $3))
    until [[ "$(mg_state "$1")" =~ ^($2)$ ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# mg_writes CTL: write requests the daemon served so far.
mg_writes() {
    mg_ctl "$1" metrics 2>/dev/null |
        awk '/^vhost_user_zram_requests_total\{.*type="write"/ { print $NF; found = 1 } END { exit !found }'
}

# mg_wait_writes CTL N SECONDS: waits until the daemon has served N more writes than now.
mg_wait_writes() {
    local base now deadline=$((SECONDS + $3))
    base="$(mg_writes "$1")" || base=0
    while :; do
        now="$(mg_writes "$1")" || now="$base"
        ((now - base >= $2)) && return 0
        if guest_or_device_ended || ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

# mg_hmp MONITOR COMMAND...: QEMU human monitor commands; prints their output.
mg_hmp() { timeout 30 python3 "$GT_DIR/hmp.py" "$@"; }

# mg_qemu_migrated MONITOR SECONDS: waits until QEMU's migration has completed; 1 if it failed
# or took too long.
mg_qemu_migrated() {
    local deadline=$((SECONDS + $2)) status
    while :; do
        status="$(mg_hmp "$1" "info migrate" | awk -F': ' '/^Migration status/ { print $2 }')"
        case "$status" in
            completed) return 0 ;;
            failed | cancelled) return 1 ;;
        esac
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

suite_migrate() {
    local out="$RESULTS_DIR/migrate" ram="$GUEST_RAM_MIB" dir
    local timeout="${VUZ_MIGRATE_TIMEOUT:-600}" pressure_mib=$((ram * 22 / 10))
    if [[ "$DEVICE_KIND" != vuz ]]; then
        record_skip migrate/suite "the device is qemu-storage-daemon; the suite migrates vhost-user-zram's pages"
        return
    fi
    if ! "$VUZ_BIN" --help 2>&1 | grep -q -- '--incoming'; then
        record_fail migrate/suite "$VUZ_BIN has no --incoming option"
        return
    fi
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vuz-migrate.XXXXXX")"
    track_path "$dir"
    head -c 32 /dev/urandom | base64 >"$dir/token"
    chmod 600 "$dir/token"
    # Both QEMUs use one writable copy of the root image (shared storage, as in production).
    cp "$GUEST/rootfs.img" "$dir/rootfs.img"
    local common=(--size 512M --num-queues 1 --serial vuz-migrate --migrate-token "$dir/token"
        --log-level "${VUZ_LOG_LEVEL:-info}" ${DAEMON_ARGS[@]+"${DAEMON_ARGS[@]//@DIR@/$dir}"})
    local src_ctl="$dir/src.ctl" src_pid dst_pid qargs
    mg_daemon source --socket-path "$dir/src.sock" --control-socket "$src_ctl" "${common[@]}"
    src_pid="$MG_PID"
    WATCH_PIDS=("$src_pid")
    if ! poll_until 30 "the source daemon's socket" unix_listening "$dir/src.sock"; then
        record_fail migrate/suite "the source daemon did not start (log: $RESULTS_DIR/migrate.source.daemon.log)"
        return
    fi
    mapfile -t qargs < <(vhost_user_args vuz0 "$dir/src.sock" 1)
    # Four verify passes, so that the guest still swaps in while it is migrated.
    ROOT_IMG="$dir/rootfs.img" SMP=2 \
        APPEND="vuz.sv=vuz-migrate vuz.seed=$SEED vuz.pressure_mib=$pressure_mib vuz.passes=4" \
        run_guest_bg "$GUEST" "$out" migrate "$timeout" "${qargs[@]}"
    local src_qemu="$QEMU_PID" src_mon="$MONITOR_SOCK"
    log "migrate: ${pressure_mib} MiB anonymous in ${ram} MiB RAM, seed $SEED"
    if ! wait_console 'VUZ-SURVIVE-SWAP-OUT' "$timeout" || ! mg_wait_writes "$src_ctl" 256 "$timeout"; then
        record_fail migrate/suite "the guest never swapped (console: $out.console.log)"
        qemu_finish migrate 30
        return
    fi

    mg_failed_migration "$dir" "$src_ctl" "$src_mon" "${common[@]}"

    # The migration itself.
    mg_daemon destination --socket-path "$dir/dst.sock" --control-socket "$dir/dst.ctl" \
        --incoming "unix:$dir/stream.sock" "${common[@]}"
    dst_pid="$MG_PID"
    if ! poll_until 30 "the destination daemon's socket" unix_listening "$dir/dst.sock"; then
        record_fail migrate/switchover "the destination daemon did not start (log: $RESULTS_DIR/migrate.destination.daemon.log)"
        qemu_finish migrate 30
        return
    fi
    mapfile -t qargs < <(vhost_user_args vuz0 "$dir/dst.sock" 1)
    ROOT_IMG="$dir/rootfs.img" SMP=2 INCOMING="unix:$dir/qemu.mig" \
        APPEND="vuz.sv=vuz-migrate vuz.seed=$SEED vuz.pressure_mib=$pressure_mib vuz.passes=4" \
        run_guest_bg "$GUEST" "$out.destination" migrate "$timeout" "${qargs[@]}"
    # The guest's console is the source's file until the switchover, the destination's after.
    local dst_qemu="$QEMU_PID" dst_mon="$MONITOR_SOCK" dst_console="$CONSOLE_LOG"
    CONSOLE_LOG="$out.console.log" QEMU_PID="$src_qemu"
    WATCH_PIDS=("$src_pid" "$dst_pid")
    mg_wait_writes "$src_ctl" 256 60 || true
    local started
    if ! started="$(mg_ctl "$src_ctl" migrate "unix:$dir/stream.sock" 2>&1)"; then
        record_fail migrate/switchover "ctl migrate failed: $started"
        stop_pid "$dst_qemu"
        qemu_finish migrate 30
        return
    fi
    log "migrate: ctl migrate: $started"
    # A round or two of pre-copy while the guest swaps, then QEMU's migration. A local Unix
    # socket: no bandwidth cap; the guest dirties RAM fast under TCG, so allow 1 s of downtime.
    mg_wait_state "$src_ctl" 'precopy|synced' 60 || true
    mg_hmp "$src_mon" "migrate_set_parameter max-bandwidth 1G" \
        "migrate_set_parameter downtime-limit 1000" "migrate -d unix:$dir/qemu.mig" >/dev/null
    if mg_qemu_migrated "$src_mon" "$timeout"; then
        record_pass migrate/qemu-migrated
    else
        record_fail migrate/qemu-migrated "QEMU's migration did not complete: $(mg_hmp "$src_mon" "info migrate" | tr '\n' ' ')"
    fi
    QEMU_PID="$dst_qemu" MONITOR_SOCK="$dst_mon" CONSOLE_LOG="$dst_console"
    if mg_wait_state "$src_ctl" completed 60; then
        record_pass migrate/switchover
    else
        record_fail migrate/switchover "the source reports $(mg_state "$src_ctl") (destination: $(mg_state "$dir/dst.ctl"))"
    fi
    log "migrate: source status: $(mg_ctl "$src_ctl" migrate-status 2>&1 | tr '\n' ' ')"
    log "migrate: destination status: $(mg_ctl "$dir/dst.ctl" migrate-status 2>&1 | tr '\n' ' ')"
    mg_hmp "$src_mon" quit >/dev/null 2>&1 || true
    if wait_exit "$src_qemu" 30 && wait_exit "$src_pid" 30 && [[ "$EXIT_RC" == 0 ]]; then
        record_pass migrate/source-daemon-exit
    else
        record_fail migrate/source-daemon-exit "the source daemon did not exit with 0 after its QEMU quit (status ${EXIT_RC:-none}; log: $RESULTS_DIR/migrate.source.daemon.log)"
    fi
    stop_pid "$src_qemu"
    untrack_pid "$src_qemu"
    WATCH_PIDS=("$dst_pid")
    if wait_console 'VUZ-SURVIVE-VERIFIED' "$timeout"; then
        record_pass migrate/guest-runs-on-destination
    else
        record_fail migrate/guest-runs-on-destination "the guest did not finish on the destination (console: $out.destination.console.log)"
    fi
    qemu_finish migrate.destination "$timeout"
    # Both halves of the console, for the guest's results.
    cat "$out.console.log" "$dst_console" >"$out.both.console.log"
    CONSOLE_LOG="$out.both.console.log"
    collect_results "$out.both" migrate \
        migrate/{swapon,checksums,swapped-out,swapped-in,no-io-errors,swapoff}
    if ! wait_exit "$dst_pid" 30; then
        record_fail migrate/destination-daemon-exit "the destination daemon still runs 30 s after its QEMU exited"
    elif [[ "$EXIT_RC" != 0 ]]; then
        record_fail migrate/destination-daemon-exit "status $EXIT_RC (log: $RESULTS_DIR/migrate.destination.daemon.log)"
    else
        record_pass migrate/destination-daemon-exit
    fi
    stop_pid "$dst_pid"
    suite_done
}

# mg_failed_migration DIR SRC_CTL SRC_MONITOR DAEMON_ARGS...: a destination daemon SIGKILLed
# mid-stream. The source must report the failure and keep serving; the VM, stopped and resumed
# (`stop`, `cont`: what QEMU does after a failed migration), goes on swapping.
mg_failed_migration() {
    local dir="$1" src_ctl="$2" src_mon="$3" status
    shift 3
    mg_daemon doomed --socket-path "$dir/doomed.sock" --control-socket "$dir/doomed.ctl" \
        --incoming "unix:$dir/doomed.stream" "$@"
    local doomed="$MG_PID"
    if ! poll_until 30 "the doomed destination's stream socket" test -S "$dir/doomed.stream"; then
        record_fail migrate/destination-killed "the destination daemon did not listen (log: $RESULTS_DIR/migrate.doomed.daemon.log)"
        stop_pid "$doomed"
        return
    fi
    if ! status="$(mg_ctl "$src_ctl" migrate "unix:$dir/doomed.stream" 2>&1)"; then
        record_fail migrate/destination-killed "ctl migrate failed: $status"
        stop_pid "$doomed"
        return
    fi
    # Mid-stream: some pages sent, not all.
    local deadline=$((SECONDS + 30))
    until (($(mg_field "$src_ctl" pages || echo 0) > 0)) || ((SECONDS >= deadline)); do
        sleep 0.05
    done
    kill -KILL "$doomed" 2>/dev/null || true
    wait "$doomed" 2>/dev/null || true
    untrack_pid "$doomed"
    if mg_wait_state "$src_ctl" failed 30; then
        record_pass migrate/destination-killed
    else
        record_fail migrate/destination-killed "the source reports '$(mg_state "$src_ctl")' 30 s after its destination died"
    fi
    log "migrate: after the kill: $(mg_ctl "$src_ctl" migrate-status 2>&1 | tr '\n' ' ')"
    mg_hmp "$src_mon" stop >/dev/null
    sleep 1
    mg_hmp "$src_mon" cont >/dev/null
    if mg_wait_writes "$src_ctl" 128 120; then
        record_pass migrate/source-resumes
    else
        record_fail migrate/source-resumes "the guest did not swap through the source daemon after cont"
    fi
}
