#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The multi-page units comparison: vhost-user-zram per page (--unit-max=4K), with units of each
# --units size, and kernel zram, on a real-memory corpus and on the swap-like mix, with lz4 and
# zstd. One vhost-user-zram-bench --compare-units run per data set and algorithm; inside a run
# the configurations go back to back on the same pages (with --rounds N > 1 they alternate and
# each figure is the median round). Every run fills the device in 64 KiB requests, then reads
# single pages at random and the device in order in 32 KiB requests (readahead). The tables
# are stitched into one markdown table, ratios against per-page of the same data set and
# algorithm, the units' targets marked met or missed; the runs' full output, JSON and tables
# stay in --out.
#
# Usage: ci/units-bench.sh [--corpus FILE] [--size SIZE] [--duration SECONDS] [--rounds N]
#                          [--units SIZES] [--algorithms LIST] [--out DIR] [--no-build]
#                          [-- BENCH-ARGS...]
# Defaults: --size 1G --duration 5 --rounds 3 --units 16K,64K --algorithms lz4,zstd,
# --out results/units-bench. Without --corpus only the swap-like mix runs. BENCH-ARGS go to
# every bench run (e.g. --daemon-bin PATH, --no-verify, --queues 2). Needs root for kernel zram
# (skipped otherwise).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

# table_rows FILE: the rows of a bench --units-table file (its header and separator left out).
table_rows() {
    sed -n '3,$p' "$1" | grep '^| '
}

# table_notes FILE LABEL: its lines about skipped or failed columns, saying the data set.
table_notes() {
    grep '^- ' "$1" | sed "s|^- |- $2: |" || true
}

main() {
    local corpus="" size=1G duration=5 rounds=3 units=16K,64K algorithms=lz4,zstd
    local out="" build=1
    local -a extra=()
    while (($#)); do
        case "$1" in
            --corpus) corpus="$2" && shift ;;
            --size) size="$2" && shift ;;
            --duration) duration="$2" && shift ;;
            --rounds) rounds="$2" && shift ;;
            --units) units="$2" && shift ;;
            --algorithms) algorithms="$2" && shift ;;
            --out) out="$2" && shift ;;
            --no-build) build=0 ;;
            -h | --help) usage ;;
            --) shift && extra=("$@") && break ;;
            *) echo "unknown argument: $1" >&2 && usage 1 ;;
        esac
        shift
    done
    local target="${CARGO_TARGET_DIR:-$REPO_DIR/target}"
    local bench="$target/release/vhost-user-zram-bench"
    if ((build)); then
        (cd "$REPO_DIR" && cargo build --release --bins --locked)
    fi
    out="${out:-$REPO_DIR/results/units-bench}"
    mkdir -p "$out"

    local -a sets=()
    if [[ -n "$corpus" ]]; then
        [[ -r "$corpus" ]] || { echo "cannot read corpus $corpus" >&2 && exit 1; }
        sets+=(real)
    fi
    sets+=(mix)
    local set algorithm name
    local -a algs data
    IFS=, read -r -a algs <<<"$algorithms"
    for set in "${sets[@]}"; do
        data=()
        [[ "$set" == real ]] && data=(--corpus "$corpus")
        for algorithm in "${algs[@]}"; do
            name="$set-$algorithm"
            echo "== $name: $bench --compare-units $units --algorithm $algorithm" >&2
            # A run that fails still leaves its table (failed columns say why): go on.
            "$bench" --compare-units "$units" --algorithm "$algorithm" "${data[@]}" \
                --size "$size" --duration "$duration" --rounds "$rounds" \
                --request-size 64K --read-size 4K --seqread-size 32K \
                --phases fill,randread,seqread \
                --json "$out/$name.json" --units-table "$out/$name.md" \
                "${extra[@]}" >"$out/$name.txt" || echo "$name: the bench failed (see $out/$name.txt)" >&2
        done
    done

    local first header
    {
        echo "## Benchmark (one run, side by side, on the real-memory corpus and on the swap-like mix)"
        echo
        echo "$size device, fill in 64 KiB requests, random 4 KiB reads and 32 KiB sequential reads" \
            "for $duration s each, rounds: $rounds; ratios against per-page of the same data set and" \
            "algorithm; targets (on the real corpus): memory ≤ 0.85×, write CPU per page ≤ 0.7×," \
            "random 4 KiB read IOPS ≥ 0.7×, sequential reads ≥ 1.0×."
        echo
        first="$out/${sets[0]}-${algs[0]}.md"
        [[ -s "$first" ]] || { echo "no table in $first" >&2 && exit 1; }
        # The header without the data set: each set gets a row of its own.
        header="$(head -n 1 "$first" | sed 's/^| [^|]* |/| |/')"
        echo "$header"
        sed -n 2p "$first"
        local -a files parts
        local label columns tmp
        tmp="$(mktemp -d)"
        # shellcheck disable=SC2064
        trap "rm -rf '$tmp'" EXIT
        columns=$(($(head -n 1 "$first" | tr -cd '|' | wc -c) - 2))
        for set in "${sets[@]}"; do
            files=() parts=()
            for algorithm in "${algs[@]}"; do
                [[ -s "$out/$set-$algorithm.md" ]] || continue
                files+=("$out/$set-$algorithm.md")
                table_rows "$out/$set-$algorithm.md" >"$tmp/$set-$algorithm"
                parts+=("$tmp/$set-$algorithm")
            done
            ((${#files[@]})) || continue
            label="$(head -n 1 "${files[0]}" | cut -d'|' -f2 | sed 's/^ *//; s/ *$//')"
            echo "| **$label** |$(printf ' |%.0s' $(seq 1 "$columns"))"
            # One row per figure, the algorithms next to each other.
            paste -d '\n' "${parts[@]}"
        done
        echo
        for set in "${sets[@]}"; do
            for algorithm in "${algs[@]}"; do
                [[ -s "$out/$set-$algorithm.md" ]] &&
                    table_notes "$out/$set-$algorithm.md" "$([[ $set == real ]] && echo "real corpus" || echo "swap-like mix")"
            done
        done
        echo "- memory: mem_used_total after the fill, once the daemon's workers drained (kernel" \
            "zram: its mm_stat; it leaves its slot table out, vhost-user-zram counts it)."
        echo "- write CPU per page: the daemon's utime + stime (all threads, /proc/PID/stat) from the" \
            "fill's start until its workers drained, per page written; kernel zram compresses in" \
            "the bench's own context (–)."
        echo "- random reads: IOPS and p99 latency of 4 KiB reads at random pages, verified."
        echo "- sequential reads: MiB/s of 32 KiB reads in device order (starting over at the end)."
        echo "- units stored / pages in units: ctl stats --json units after the fill; read" \
            "amplification: bytes decompressed per byte read from units during the phase, and the" \
            "share of those reads served from a thread's decoded units."
    } | tee "$out/table.md"
}

main "$@"
