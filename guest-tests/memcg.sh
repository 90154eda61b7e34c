# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Memory cgroups for the guest tests: a daemon started in a cgroup of its own with a memory
# limit, and what the kernel says about it afterwards (peak usage, OOM kills). cgroup v1's memory
# controller is used where it is mounted (this is what CI has), else v2's.
# Sourced by run.sh after lib.sh; not run.

# shellcheck shell=bash
# MEMCG_WHY, MEMCG_LIMIT and MEMCG_DIR are read by run.sh.
# shellcheck disable=SC2034

# memcg_create NAME MIB: creates a memory cgroup limited to MIB MiB and sets MEMCG_DIR,
# MEMCG_VERSION (1 or 2) and MEMCG_LIMIT (bytes). Returns 1 (with MEMCG_WHY) when the host has
# no memory controller we may use. The cgroup is removed by the cleanup trap.
memcg_create() {
    local name="$1" mib="$2" v1=/sys/fs/cgroup/memory v2
    MEMCG_LIMIT=$((mib << 20))
    MEMCG_DIR=""
    if [[ -w "$v1" ]] && [[ -f "$v1/memory.limit_in_bytes" ]]; then
        MEMCG_VERSION=1
        MEMCG_DIR="$(mktemp -d "$v1/$name.XXXXXX" 2>/dev/null)" || {
            MEMCG_WHY="cannot create a cgroup under $v1"
            return 1
        }
        echo "$MEMCG_LIMIT" >"$MEMCG_DIR/memory.limit_in_bytes"
    else
        v2="$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)"
        if [[ -z "$v2" ]] || ! grep -qw memory "$v2/cgroup.subtree_control" 2>/dev/null; then
            MEMCG_WHY="the host has neither cgroup v1's memory controller nor v2's at its root"
            return 1
        fi
        MEMCG_VERSION=2
        MEMCG_DIR="$(mktemp -d "$v2/$name.XXXXXX" 2>/dev/null)" || {
            MEMCG_WHY="cannot create a cgroup under $v2"
            return 1
        }
        echo "$MEMCG_LIMIT" >"$MEMCG_DIR/memory.max"
    fi
    ((${#MEMCG_DIRS[@]})) || track_cleanup memcg_cleanup
    MEMCG_DIRS+=("$MEMCG_DIR")
    log "memory cgroup $MEMCG_DIR (v$MEMCG_VERSION), limit $mib MiB"
}

# The cgroups this run made, removed at exit.
MEMCG_DIRS=()

# memcg_remove DIR: removes the cgroup once its processes are gone (bounded).
memcg_remove() {
    local dir="$1" i
    [[ -d "$dir" ]] || return 0
    for ((i = 0; i < 50; i++)); do
        rmdir "$dir" 2>/dev/null && return 0
        sleep 0.1
    done
    warn "could not remove the cgroup $dir: $(tr '\n' ' ' <"$dir/cgroup.procs" 2>/dev/null)"
}

# memcg_cleanup: at exit, stops what still runs in this run's cgroups and removes them.
memcg_cleanup() {
    local dir pid
    for dir in ${MEMCG_DIRS[@]+"${MEMCG_DIRS[@]}"}; do
        [[ -d "$dir" ]] || continue
        while read -r pid; do
            stop_pid "$pid"
        done <"$dir/cgroup.procs"
        memcg_remove "$dir"
    done
}

# memcg_peak: the most memory the cgroup was charged, in bytes.
memcg_peak() {
    case "$MEMCG_VERSION" in
        1) cat "$MEMCG_DIR/memory.max_usage_in_bytes" ;;
        2) cat "$MEMCG_DIR/memory.peak" 2>/dev/null || cat "$MEMCG_DIR/memory.current" ;;
    esac
}

# memcg_oom_kills: how many processes the kernel killed in the cgroup for want of memory.
memcg_oom_kills() {
    case "$MEMCG_VERSION" in
        1) awk '$1 == "oom_kill" { print $2 }' "$MEMCG_DIR/memory.oom_control" ;;
        2) awk '$1 == "oom_kill" { print $2 }' "$MEMCG_DIR/memory.events" ;;
    esac
}

# memcg_filesystem_ok DIR: DIR is not on tmpfs or ramfs, whose pages a writer's cgroup is
# charged for (a backing file there would not take memory out of the cgroup).
memcg_filesystem_ok() {
    case "$(stat -f -c %T "$1")" in
        tmpfs | ramfs) return 1 ;;
        *) return 0 ;;
    esac
}
