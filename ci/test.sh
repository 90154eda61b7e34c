#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The one command that runs every test of vhost-user-zram on a fresh Debian 12 machine:
# installs what the tests need (apt packages, cargo-nextest, cargo-fuzz, the guest kernel via
# guest-tests/setup.sh), then runs, in order:
#   1. formatting and clippy,
#   2. the unit, property, stress, protocol and libblkio end-to-end tests (cargo nextest),
#   3. a short fuzz smoke of request parsing,
#   4. the guest tests (a real QEMU guest swaps to the daemon) and the fio comparison.
# Each stage prints PASS/FAIL; the last line counts the stages.
#
# Environment: SKIP_GUEST=1 skips stage 4, SKIP_FUZZ=1 skips stage 3, FUZZ_SECONDS (default 30).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '\n==> %s\n' "$*"; }

need_root_apt() {
    local missing=()
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
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pin[@]}" "${missing[@]}" >/dev/null
    fi
}

passed=0
failed=0
stage() {
    local name=$1
    shift
    log "stage: $name"
    local start=$SECONDS
    if "$@"; then
        echo "PASS stage $name ($((SECONDS - start)) s)"
        passed=$((passed + 1))
    else
        echo "FAIL stage $name ($((SECONDS - start)) s)"
        failed=$((failed + 1))
    fi
}

need_root_apt qemu-system-x86 qemu-utils busybox-static cpio fio e2fsprogs ||
    echo "warning: installing the guest-test packages failed; the guest stage will say what is missing"
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

lint() {
    cargo fmt --all -- --check && cargo clippy --all-targets --locked -- -D warnings
}

unit_and_e2e() {
    cargo build --release --locked --bins &&
        cargo nextest run --locked --release --no-fail-fast
}

fuzz_smoke() {
    if [ -n "${SKIP_FUZZ:-}" ]; then
        echo "skipped (SKIP_FUZZ)"
        return 0
    fi
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz || return 1
    # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list) | while read -r target; do
        (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
            -max_total_time="${FUZZ_SECONDS:-30}" -rss_limit_mb=4096) || exit 1
    done
}

guest() {
    if [ -n "${SKIP_GUEST:-}" ]; then
        echo "skipped (SKIP_GUEST)"
        return 0
    fi
    VUZ_REQUIRE_DAEMON=1 VUZ_BIN="$root/target/release/vhost-user-zram" bash guest-tests/run.sh
}

stage lint lint
stage tests unit_and_e2e
[ -d fuzz ] && stage fuzz fuzz_smoke
[ -d guest-tests ] && stage guest guest

echo
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
