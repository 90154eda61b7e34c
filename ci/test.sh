#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The one command that runs every test of vhost-user-zram on a fresh Debian 12 machine:
# installs what the tests need (apt packages, cargo-nextest, cargo-fuzz, the guest kernel via
# guest-tests/setup.sh), then runs, in order:
#   1. formatting and clippy,
#   2. the unit, property, stress, protocol and libblkio end-to-end tests (cargo nextest),
#   3. every fuzz target for FUZZ_RUNS executions (default 1,000,000) over FUZZ_JOBS
#      processes, starting from the seed corpus kept in fuzz/corpus/<target>/,
#   4. the guest tests (a real QEMU guest swaps to the daemon; the survive suite kills and
#      restarts the daemon under it) and the fio comparison, then the swap suite again with
#      --workers 0 and polling on, with a backing file and --writeback-above 8M, and in a
#      guest that libvirt starts (SKIP with the reason where libvirt cannot run).
# Each stage prints PASS, FAIL or SKIP (with the reason); the last line counts the stages.
#
# Environment: SKIP_GUEST=1 skips stage 4, SKIP_FUZZ=1 skips stage 3, FUZZ_RUNS (default
# 1000000) sets the executions per fuzz target, FUZZ_JOBS (default: the CPUs, at most 4) the
# processes that share them.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '\n==> %s\n' "$*"; }

# need_root_apt [--no-install-recommends] PACKAGE...: installs the packages that are missing.
need_root_apt() {
    local missing=() options=()
    if [[ "${1:-}" == --no-install-recommends ]]; then
        options+=("$1")
        shift
    fi
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq || return 1
        # Some images ship qemu-utils from bookworm-backports (10.x), which Breaks the
        # qemu-system-common 7.2 that qemu-system-x86 needs: take bookworm's qemu-utils with it.
        local pin=()
        if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] &&
            dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '^1:\(8\|9\|1[0-9]\)'; then
            pin=(--allow-downgrades qemu-utils/bookworm)
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${options[@]}" "${pin[@]}" "${missing[@]}" >/dev/null
    fi
}

passed=0
failed=0
skipped=0
# A stage function calls `skip REASON` and returns its status to report the stage as SKIP.
skip_reason=
SKIPPED=77
skip() {
    skip_reason=$1
    return $SKIPPED
}
stage() {
    local name=$1
    shift
    log "stage: $name"
    local start=$SECONDS status
    skip_reason=
    "$@"
    status=$?
    if [ "$status" -eq 0 ]; then
        echo "PASS stage $name ($((SECONDS - start)) s)"
        passed=$((passed + 1))
    elif [ "$status" -eq "$SKIPPED" ] && [ -n "$skip_reason" ]; then
        echo "SKIP stage $name: $skip_reason"
        skipped=$((skipped + 1))
    else
        echo "FAIL stage $name ($((SECONDS - start)) s)"
        failed=$((failed + 1))
    fi
}

need_root_apt qemu-system-x86 qemu-utils busybox-static cpio fio e2fsprogs ||
    echo "warning: installing the guest-test packages failed; the guest stage will say what is missing"
# libvirt for the libvirt guest suite; it runs without systemd (the suite starts virtlogd and
# libvirtd itself). Its recommendations (lvm2, dnsmasq, swtpm...) are not needed.
need_root_apt --no-install-recommends libvirt-daemon-system libvirt-clients ||
    echo "warning: installing libvirt failed; the libvirt guest suite will say it is skipped"
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

lint() {
    # The lz4-c feature's codec is built (and linted) with the unit tests in every build.
    cargo fmt --all -- --check && cargo clippy --all-targets --locked -- -D warnings
}

unit_and_e2e() {
    cargo build --release --locked --bins &&
        cargo nextest run --locked --release --no-fail-fast
}

# Runs every fuzz target FUZZ_RUNS times in all, split over FUZZ_JOBS processes (default: one
# per CPU, at most 4), from its committed seed corpus (fuzz/corpus/<target>, read only: new
# inputs go to a scratch directory), and prints the executions done. A crash, a leak or a
# timeout fails the stage; libFuzzer leaves the input in fuzz/artifacts/<target>/.
# Without comparison tracing the target runs about 1.5 times faster (4,500 exec/s per process
# on a loaded 2-core machine, against 3,100); the seed corpus already holds the request types
# and lengths that tracing would find. 1M executions took 300 s in one process there with the
# load average at 3 to 5; two processes on an idle 2-core machine take about a quarter of that.
fuzz() {
    [ -n "${SKIP_FUZZ:-}" ] && { skip "SKIP_FUZZ is set"; return; }
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz || return 1
    local runs=${FUZZ_RUNS:-1000000} jobs=${FUZZ_JOBS:-$(nproc)} target job scratch logs
    ((jobs > 4)) && jobs=4
    ((jobs < 1)) && jobs=1
    local per_job=$(((runs + jobs - 1) / jobs))
    # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
    export RUSTC_BOOTSTRAP=1
    for target in $(cd fuzz && cargo fuzz list); do
        mkdir -p "fuzz/corpus/$target"
        (cd fuzz && cargo fuzz build -O --no-trace-compares "$target") || return 1
        scratch=$(mktemp -d)
        logs=$(mktemp -d)
        local pids=() failed=0 executions=0 rate=0 done_runs job_rate
        for ((job = 0; job < jobs; job++)); do
            (cd fuzz && cargo fuzz run -O --no-trace-compares "$target" "$scratch" "corpus/$target" -- \
                -runs="$per_job" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1) \
                >"$logs/$job.log" 2>&1 &
            pids+=($!)
        done
        for ((job = 0; job < jobs; job++)); do
            wait "${pids[$job]}" || failed=1
            done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$job.log" | tail -1)
            job_rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$job.log" | tail -1)
            executions=$((executions + ${done_runs:-0}))
            rate=$((rate + ${job_rate:-0}))
        done
        echo "fuzz $target: $executions executions in $jobs process(es), $rate exec/s"
        rm -rf "$scratch"
        if ((failed)) || ((executions < runs)); then
            for log in "$logs"/*.log; do tail -n 40 "$log"; done
            rm -rf "$logs"
            return 1
        fi
        rm -rf "$logs"
    done
}

guest() {
    [ -n "${SKIP_GUEST:-}" ] && { skip "SKIP_GUEST is set"; return; }
    # Every default suite (main, multiqueue, lifecycle, survive: the daemon SIGKILLed and
    # SIGTERMed under a swapping guest, about 2 minutes, and migrate: the swapping guest
    # live-migrated to a second QEMU and daemon, about 2 minutes) and the fio comparison with the
    # default compression workers, then the swap suite again with the queue thread compressing
    # (--workers 0) and the queues polling (--poll-max-us 50): both write paths, and polling
    # off and on, in a guest;
    # and once more with a backing file and --writeback-above low, so swapped pages really go
    # to the file and come back from it; last, the swap suite in a guest libvirt starts from
    # contrib/libvirt-disk.xml (one boot, about 2 minutes under TCG).
    VUZ_REQUIRE_DAEMON=1 VUZ_BIN="$root/target/release/vhost-user-zram" bash guest-tests/run.sh &&
        VUZ_RESULTS_DIR="$root/results/inline" VUZ_REQUIRE_DAEMON=1 \
            VUZ_BIN="$root/target/release/vhost-user-zram" \
            bash guest-tests/run.sh --suites main --no-bench --daemon-arg --workers=0 \
            --daemon-arg --poll-max-us=50 &&
        VUZ_RESULTS_DIR="$root/results/writeback" VUZ_REQUIRE_DAEMON=1 VUZ_EXPECT_WRITEBACK=1 \
            VUZ_BIN="$root/target/release/vhost-user-zram" \
            bash guest-tests/run.sh --suites main --no-bench \
            --daemon-arg --backing-file=@DIR@/backing --daemon-arg --writeback-above=8M &&
        VUZ_RESULTS_DIR="$root/results/libvirt" VUZ_REQUIRE_DAEMON=1 \
            VUZ_BIN="$root/target/release/vhost-user-zram" \
            bash guest-tests/run.sh --suites libvirt --no-bench
}

no_directory() {
    skip "there is no $1 directory"
}

stage lint lint
stage tests unit_and_e2e
if [ -d fuzz ]; then stage fuzz fuzz; else stage fuzz no_directory fuzz; fi
if [ -d guest-tests ]; then stage guest guest; else stage guest no_directory guest-tests; fi

echo
echo "stages: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
