#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# fio benchmark of vhost-user-zram against qemu-storage-daemon, both seen by the same guest
# through vhost-user-blk: one boot, two disks of the same size and QEMU config (one queue each),
# the same fio suite on each in turn (4 KiB randwrite/randread, 1 MiB seq write/read, iodepth 16,
# libaio, direct=1, time-based). The guest prints the fio JSON on its serial console between
# markers; it is cut out into results/fio/<label>.json and summarised in one table (also in
# results/fio/table.txt). Under TCG the absolute numbers are low: the ratio is the point.
#
# Usage: ci/fio-bench.sh [--guest DIR] [--accel auto|kvm|tcg] [--device auto|vuz|qsd]
#                        [--runtime SECONDS] [--size SIZE]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../guest-tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../guest-tests/lib.sh"

OUT_DIR="${VUZ_RESULTS_DIR:-$REPO_DIR/results}/fio"
WORKLOADS=(randwrite-4k randread-4k seqwrite-1m seqread-1m)

# extract_json LABEL: the fio JSON the guest printed for LABEL, into $OUT_DIR/LABEL.json.
extract_json() {
    local label="$1" file="$OUT_DIR/$1.json"
    tr -d '\r' <"$OUT_DIR/bench.console.log" |
        awk -v b="VUZ-FIO-JSON-BEGIN $label" -v e="VUZ-FIO-JSON-END $label" \
            '$0 == e { on = 0 } on { print } $0 == b { on = 1 }' >"$file"
    if ! jq -e '.jobs | length > 0' "$file" >/dev/null 2>&1; then
        log "no valid fio JSON for $label on the console ($OUT_DIR/bench.console.log)"
        return 1
    fi
}

# job_stat LABEL WORKLOAD FIELD: iops or MB/s (reads and writes together) of one job.
job_stat() {
    jq -r --arg job "$2" --arg field "$3" '
        .jobs[] | select(.jobname == $job) |
        if $field == "iops" then (.read.iops + .write.iops)
        else ((.read.bw_bytes + .write.bw_bytes) / 1000000) end' "$OUT_DIR/$1.json"
}

# print_table A B: one line per workload, A's and B's IOPS and MB/s and the IOPS ratio A/B.
print_table() {
    local a="$1" b="$2" w ia ma ib mb ratio
    local sa="${3:-A}" sb="${4:-B}"
    echo "fio, ${RUNTIME} s per workload, iodepth 16, direct, libaio: $sa = $a, $sb = $b"
    printf '%-14s %10s %10s %10s %10s %10s\n' workload "$sa IOPS" "$sa MB/s" "$sb IOPS" "$sb MB/s" \
        "$sa/$sb"
    for w in "${WORKLOADS[@]}"; do
        ia="$(job_stat "$a" "$w" iops)" ma="$(job_stat "$a" "$w" mbs)"
        ib="$(job_stat "$b" "$w" iops)" mb="$(job_stat "$b" "$w" mbs)"
        ratio="$(awk -v x="$ia" -v y="$ib" 'BEGIN { if (y > 0) printf "%.2f", x / y; else print "n/a" }')"
        LC_ALL=C printf '%-14s %10.0f %10.1f %10.0f %10.1f %10s\n' "$w" "$ia" "$ma" "$ib" "$mb" "$ratio"
    done
}

main() {
    local guest="" accel=auto device=auto size=256M
    RUNTIME=10
    while (($#)); do
        case "$1" in
            --guest) guest="$2" && shift ;;
            --accel) accel="$2" && shift ;;
            --device) device="$2" && shift ;;
            --runtime) RUNTIME="$2" && shift ;;
            --size) size="$2" && shift ;;
            -h | --help) sed -n '/^# Usage:/,/^[^#]/s/^# \{0,1\}//p' "$0" && exit 0 ;;
            *) die "unknown argument $1" ;;
        esac
        shift
    done
    install_cleanup_trap
    [[ -n "$guest" ]] || guest="$("$GT_DIR/setup.sh" | tail -n 1)"
    rm -rf "$OUT_DIR"
    mkdir -p "$OUT_DIR"
    resolve_device_kind "$device"
    device="$DEVICE_KIND"
    ACCEL=""
    pick_accel "$accel" "$guest" "$OUT_DIR"

    local zlabel=vhost-user-zram
    if [[ "$device" != vuz ]]; then
        warn "vhost-user-zram is not available: benchmarking qemu-storage-daemon against itself"
        zlabel=qsd-as-dut
    fi
    start_device A "$device" "$zlabel" "$size" 1 vuz-bench RW "$OUT_DIR"
    start_device B qsd qemu-storage-daemon "$size" 1 - RW "$OUT_DIR"
    local b_nth=0
    [[ "$A_SERIAL" == "$B_SERIAL" ]] && b_nth=1
    local qargs
    mapfile -t qargs < <(vhost_user_args vuz0 "$A_SOCK" 1; vhost_user_args vuz1 "$B_SOCK" 1)

    local timeout=$((240 + 2 * 6 * RUNTIME)) t0=$SECONDS
    log "fio bench: $size per disk, ${RUNTIME} s per workload, on $ACCEL"
    APPEND="vuz.bench_labels=a,b vuz.bench_a=$A_SERIAL vuz.bench_b=$B_SERIAL \
vuz.bench_b_nth=$b_nth vuz.bench_runtime=$RUNTIME vuz.bench_size=$(numfmt --from=iec "$size")" SMP=1 \
        run_guest_bg "$guest" "$OUT_DIR/bench" bench "$timeout" "${qargs[@]}"
    if ! poll_until "$timeout" "the bench guest to finish" guest_or_device_ended; then
        dump_virtio "$OUT_DIR/bench.virtio-dump.txt"
        die "the bench guest did not finish in ${timeout} s"
    fi
    # vhost-user-zram exits when QEMU closes the socket, a moment before QEMU itself is gone.
    wait_exit "$QEMU_PID" 10 || die "a device process exited while the bench ran (logs in $OUT_DIR)"
    log "bench guest finished in $((SECONDS - t0)) s"

    extract_json a || die "fio did not report for $zlabel"
    extract_json b || die "fio did not report for qemu-storage-daemon"
    mv "$OUT_DIR/a.json" "$OUT_DIR/$zlabel.json"
    mv "$OUT_DIR/b.json" "$OUT_DIR/qemu-storage-daemon.json"
    print_table "$zlabel" qemu-storage-daemon zram qsd | tee "$OUT_DIR/table.txt"
}

main "$@"
