# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The guest-side checks, sourced by /vuz/init.sh (busybox sh). Each suite is one guest boot;
# each check prints exactly one `VUZ-RESULT PASS name` or `VUZ-RESULT FAIL name: reason`.
# Devices under test are found by the serial the host passes on the kernel command line.

# shellcheck shell=sh

pass() { echo "VUZ-RESULT PASS $1"; }
fail() { echo "VUZ-RESULT FAIL $1: $2"; }

# check NAME REASON COMMAND...: PASS if COMMAND succeeds, else FAIL with REASON.
check() {
    name="$1" reason="$2"
    shift 2
    if "$@"; then pass "$name"; else fail "$name" "$reason"; fi
}

# show_tail FILE: the end of a log, indented, for the console log of a failed check.
show_tail() { tail -n "${2:-15}" "$1" | sed 's/^/    | /'; }

# dev_by_serial SERIAL [NTH]: the vdX whose serial is SERIAL; when several disks share it
# (qemu-storage-daemon has one fixed serial) the NTH of them (from 0) in PCI address order, which
# is the order of the -device options on QEMU's command line.
dev_by_serial() {
    nth="${2:-0}"
    for s in /sys/block/vd*/serial; do
        [ -e "$s" ] || continue
        d="${s%/serial}"
        [ "$(cat "$s")" = "$1" ] && echo "$(readlink -f "$d/device") ${d#/sys/block/}"
    done | sort | awk -v n="$nth" 'NR == n + 1 { print $2; found = 1 } END { exit !found }'
}

# serials: every virtio disk with its serial, for messages.
serials() {
    for s in /sys/block/vd*/serial; do
        d="${s#/sys/block/}"
        printf '%s=%s ' "${d%/serial}" "$(cat "$s" 2>/dev/null)"
    done
}

# need_dev VAR KEY: sets VAR to the disk the host named with vuz.KEY=SERIAL (and vuz.KEY_nth=N
# when the serial is not unique), or reports FAIL and returns 1.
need_dev() {
    serial="$(param "$2")"
    d="$(dev_by_serial "$serial" "$(param "${2}_nth")")" || {
        fail "find-device-$2" "no virtio disk with serial '$serial' (have: $(serials))"
        return 1
    }
    echo "device $2: /dev/$d (serial $serial)"
    eval "$1=\$d"
}

# nonzero_bytes DEV OFFSET_MIB LEN_MIB: how many non-zero bytes the range holds (O_DIRECT read).
nonzero_bytes() {
    dd if="/dev/$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | tr -d '\000' | wc -c
}

# range_sum DEV OFFSET_MIB LEN_MIB: sha256 of a range (O_DIRECT read).
range_sum() {
    dd if="/dev/$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}

# fio_verify NAME DEV FIO_ARGS...: a write-then-verify fio job with crc32c checksums.
fio_verify() {
    name="$1" dev="$2"
    shift 2
    log="/tmp/fio-$(echo "$name" | tr '/' '-').log"
    if fio --name="$(basename "$name")" --filename="/dev/$dev" --direct=1 --ioengine=libaio \
        --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 "$@" >"$log" 2>&1 &&
        grep -q 'err= 0' "$log" && ! grep -q 'verify: bad' "$log"; then
        pass "$name"
    else
        fail "$name" "fio verify failed ($(grep -m1 -E 'fio: |verify: bad|err= *[1-9]' "$log"))"
        show_tail "$log"
    fi
}

# fio_verify_buffered NAME DEV FIO_ARGS...: the same through the page cache: write and fsync,
# drop the cache, then verify what the device returns (fio replays the same offsets).
fio_verify_buffered() {
    name="$1" dev="$2"
    shift 2
    log="/tmp/fio-$(echo "$name" | tr '/' '-').log"
    set -- --name="$(basename "$name")" --filename="/dev/$dev" --direct=0 --ioengine=psync \
        --verify=crc32c --verify_fatal=1 "$@"
    if fio "$@" --do_verify=0 --end_fsync=1 >"$log" 2>&1 && grep -q 'err= 0' "$log" &&
        sync && echo 3 >/proc/sys/vm/drop_caches &&
        fio "$@" --verify_only >>"$log" 2>&1 && [ "$(grep -c 'err= 0' "$log")" = 2 ] &&
        grep -q 'READ: bw=' "$log" && ! grep -q 'verify: bad' "$log"; then
        pass "$name"
    else
        fail "$name" "buffered fio verify failed ($(grep -m1 -E 'fio: |verify: bad|err= *[1-9]' "$log"))"
        show_tail "$log"
    fi
}

# ---------------------------------------------------------------------------------------------
# swap-under-pressure: swap on the device, ~3x RAM of anonymous memory and tmpfs data forced
# out to it and read back, every page verified.

swap_under_pressure() {
    dev="$1" anon_mib="$(param pressure_mib)" tmpfs_mib="$(param tmpfs_mib)"
    t=swap-under-pressure
    # The README's guest setup: Linux reports a virtio disk as rotational, and swap discards
    # freed slots only on a non-rotational disk, so the host would never get the memory back.
    # The udev rule the README gives sets queue/rotational to 0 before swapon; this is its
    # effect, and `swapon -dpages` (util-linux: --discard=pages) is the fstab line's option.
    rotational="$(cat "/sys/block/$dev/queue/rotational")"
    echo "VUZ-NOTE /dev/$dev reports rotational=$rotational before the udev rule's setting"
    echo 0 >"/sys/block/$dev/queue/rotational"
    check "$t/non-rotational" "/sys/block/$dev/queue/rotational is still $(cat "/sys/block/$dev/queue/rotational")" \
        [ "$(cat "/sys/block/$dev/queue/rotational")" = 0 ]
    if ! mkswap "/dev/$dev" >/tmp/mkswap.log 2>&1 ||
        ! swapon -dpages "/dev/$dev" 2>>/tmp/mkswap.log; then
        fail "$t/swapon" "mkswap/swapon -dpages /dev/$dev failed: $(tail -n 1 /tmp/mkswap.log)"
        return
    fi
    pass "$t/swapon"

    # tmpfs files: half incompressible, half text; checksummed before the pressure.
    mkdir -p /mnt/tmpfs
    mount -t tmpfs -o "size=$((tmpfs_mib + 8))m" tmpfs /mnt/tmpfs
    half=$((tmpfs_mib / 4))
    for i in 1 2; do
        head -c "${half}m" /dev/urandom >"/mnt/tmpfs/random$i"
        yes "vhost-user-zram tmpfs file $i, a line of swap-like text" | head -c "${half}m" \
            >"/mnt/tmpfs/text$i"
    done
    (cd /mnt/tmpfs && sha256sum random1 random2 text1 text2) >/run/tmpfs.sums

    # The pressure program holds its pages after the first verification pass until the host
    # has read the daemon's mm_stat, then verifies them all again.
    seed="$(param seed)"
    echo "pressure: ${anon_mib} MiB anonymous + ${tmpfs_mib} MiB tmpfs, seed $seed"
    /vuz/pressure --mib "$anon_mib" --seed "$seed" --passes 2 --hold-marker PRESSURE-HOLD \
        </dev/console >/tmp/pressure.log 2>&1 &
    ppid=$!
    n=0
    while ! grep -q -E 'PRESSURE-HOLD|PRESSURE-RESULT' /tmp/pressure.log && kill -0 "$ppid" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt 6000 ] && break # 600 s
        usleep 100000
    done
    used_kib="$(awk 'NR > 1 { s += $4 } END { print s + 0 }' /proc/swaps)"
    echo "swap in use during the hold: ${used_kib} KiB"
    cat /proc/swaps
    # The host answers this line (after its mm_stat check) with a line on the console.
    echo "VUZ-HOSTCHECK-MMSTAT swap_used_kib=$used_kib"
    wait "$ppid"
    prc=$?
    cat /tmp/pressure.log
    if [ "$prc" = 0 ] && grep -q 'PRESSURE-RESULT ok' /tmp/pressure.log; then
        pass "$t/anon-pages"
    else
        fail "$t/anon-pages" "$(grep -m1 -E 'PRESSURE-(RESULT|BAD)' /tmp/pressure.log || echo "exit $prc")"
    fi
    # Expect most of what did not fit in RAM out on swap: at least the anonymous size minus RAM.
    ram_kib="$(awk '/^MemTotal/ { print $2 }' /proc/meminfo)"
    want_kib=$((anon_mib * 1024 - ram_kib))
    check "$t/swap-used" "only ${used_kib} KiB on swap, expected >= ${want_kib} KiB" \
        [ "$used_kib" -ge "$want_kib" ]

    if (cd /mnt/tmpfs && sha256sum -c /run/tmpfs.sums) >/tmp/sums.log 2>&1; then
        pass "$t/tmpfs-files"
    else
        fail "$t/tmpfs-files" "checksums differ after swapping: $(grep -v ': OK' /tmp/sums.log | head -n 2 | tr '\n' ' ')"
    fi
    rm -f /mnt/tmpfs/*
    umount /mnt/tmpfs

    # Every page on swap is free now, with swap still on: the guest discards the freed swap
    # clusters, and the host checks that its memory came back (notify_free up, mem_used_total
    # down). Swap must stay on meanwhile: swapoff frees slots without discarding them.
    used_kib="$(awk 'NR > 1 { s += $4 } END { print s + 0 }' /proc/swaps)"
    echo "swap in use after freeing: ${used_kib} KiB"
    echo "VUZ-HOSTCHECK-FREED swap_used_kib=$used_kib"
    read -r -t 300 answer </dev/console || echo "no answer from the host: '$answer'"
    check "$t/swapoff" "swapoff /dev/$dev failed" swapoff "/dev/$dev"
}

# ---------------------------------------------------------------------------------------------
# block-semantics: data integrity with fio verify, discard, serial, capacity, read-only.

block_semantics() {
    dev="$1" rodev="$2"
    t=block-semantics
    want_bytes="$(param rw_bytes)"
    got_bytes=$(($(cat "/sys/block/$dev/size") * 512))
    check "$t/capacity" "device has $got_bytes bytes, expected $want_bytes" \
        [ "$got_bytes" = "$want_bytes" ]

    fio_verify "$t/fio-verify-4k" "$dev" --rw=randwrite --bs=4k --offset=0 --size=32m
    fio_verify "$t/fio-verify-64k" "$dev" --rw=randwrite --bs=64k --offset=32m --size=64m
    # 512-byte I/O at 512-byte (not 4 KiB) aligned offsets, then mixed sizes at odd alignments.
    lbs="$(cat "/sys/block/$dev/queue/logical_block_size")"
    echo "logical block size of /dev/$dev: $lbs"
    if [ "$lbs" -le 512 ]; then
        fio_verify "$t/fio-verify-512-unaligned" "$dev" --rw=randwrite --bs=512 --offset=96m \
            --size=2m
        fio_verify "$t/fio-verify-mixed-unaligned" "$dev" --rw=randwrite --bsrange=512-36k \
            --blockalign=512 --offset=98m --size=8m
    else
        # Linux refuses O_DIRECT I/O smaller than the logical block size (zram's is 4 KiB too),
        # so the same I/O goes through the page cache: the device sees read-modify-write of
        # whole blocks, and the verify reads come from the device once the cache is dropped.
        echo "VUZ-NOTE 512-byte I/O is buffered: the logical block size is $lbs"
        fio_verify_buffered "$t/fio-verify-512-unaligned" "$dev" --rw=randwrite --bs=512 \
            --offset=96m --size=2m
        fio_verify_buffered "$t/fio-verify-mixed-unaligned" "$dev" --rw=randwrite \
            --bsrange=512-36k --blockalign=512 --offset=98m --size=8m
    fi

    discard_zeroes "$dev"

    # The serial given to the daemon (--serial) is what the guest reads.
    want="$(param rw)"
    got="$(cat "/sys/block/$dev/serial")"
    check "$t/serial" "serial is '$got', expected '$want'" [ "$got" = "$want" ]

    read_only "$rodev"
}

discard_zeroes() {
    dev="$1" name="block-semantics/discard-zeroes"
    max="$(cat "/sys/block/$dev/queue/discard_max_bytes")"
    if [ "$max" = 0 ]; then
        fail "$name" "the device does not advertise discard (discard_max_bytes=0)"
        return
    fi
    # Fill [128, 144) MiB with random data, discard [130, 134) MiB, check that the discarded
    # range reads as zeros and its neighbours are untouched.
    dd if=/dev/urandom of="/dev/$dev" bs=1M seek=128 count=16 oflag=direct 2>/dev/null
    before_lo="$(range_sum "$dev" 128 2)" before_hi="$(range_sum "$dev" 134 10)"
    if [ "$(nonzero_bytes "$dev" 130 4)" = 0 ]; then
        fail "$name" "the random data written before the discard reads back as zeros"
        return
    fi
    if ! blkdiscard -o $((130 << 20)) -l $((4 << 20)) "/dev/$dev" 2>/tmp/discard.err; then
        fail "$name" "blkdiscard failed: $(cat /tmp/discard.err)"
        return
    fi
    left="$(nonzero_bytes "$dev" 130 4)"
    if [ "$left" != 0 ]; then
        fail "$name" "$left non-zero bytes in the discarded range"
    elif [ "$(range_sum "$dev" 128 2)" != "$before_lo" ] ||
        [ "$(range_sum "$dev" 134 10)" != "$before_hi" ]; then
        fail "$name" "data next to the discarded range changed"
    else
        pass "$name"
    fi
}

read_only() {
    dev="$1" t=block-semantics/read-only
    check "$t/ro-flag" "/sys/block/$dev/ro is $(cat "/sys/block/$dev/ro"), expected 1" \
        [ "$(cat "/sys/block/$dev/ro")" = 1 ]
    if dd if=/dev/urandom of="/dev/$dev" bs=4096 count=1 oflag=direct conv=fsync 2>/tmp/ro.err; then
        fail "$t/write-refused" "a 4 KiB write to the read-only disk succeeded"
    elif grep -q -E 'Operation not permitted|Read-only|I/O error|Permission denied' /tmp/ro.err; then
        pass "$t/write-refused"
    else
        fail "$t/write-refused" "the write failed, but not with EPERM/EROFS/EIO: $(cat /tmp/ro.err)"
    fi
    check "$t/read-works" "reading the read-only disk failed" \
        dd if="/dev/$dev" of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null
}

suite_main() {
    rw="" ro=""
    need_dev rw rw || return
    need_dev ro ro || return
    swap_under_pressure "$rw"
    block_semantics "$rw" "$ro"
}

# libvirt: the same swap test on the disk of contrib/libvirt-disk.xml, in a guest that libvirt
# started (one boot; the host checks the daemon in the middle, as in main).

suite_libvirt() {
    rw=""
    need_dev rw rw || return
    swap_under_pressure "$rw"
}

# ---------------------------------------------------------------------------------------------
# multi-queue: two queues on both sides, one fio job pinned to each vCPU.

suite_multiqueue() {
    need_dev dev mq || return
    t=multi-queue
    queues="$(find "/sys/block/$dev/mq/" -mindepth 1 -maxdepth 1 -type d | wc -l)"
    check "$t/hw-queues" "the disk has $queues hardware queues, expected 2" [ "$queues" = 2 ]
    fio_verify "$t/fio-verify-4k" "$dev" --rw=randwrite --bs=4k --size=32m --numjobs=2 \
        --offset_increment=32m --cpus_allowed=0-1 --cpus_allowed_policy=split
    fio_verify "$t/fio-verify-64k" "$dev" --rw=randwrite --bs=64k --offset=64m --size=64m \
        --numjobs=2 --offset_increment=64m --cpus_allowed=0-1 --cpus_allowed_policy=split
    # Both virtqueues really completed requests: each has its own MSI-X vector, named
    # virtioN-req.Q in /proc/interrupts.
    vdev="$(basename "$(readlink -f "/sys/block/$dev/device")")"
    q0="$(queue_interrupts "$vdev-req.0")" q1="$(queue_interrupts "$vdev-req.1")"
    check "$t/both-queues-used" "interrupts of $vdev-req.0 and req.1: $q0 and $q1" \
        [ "$q0" -gt 0 -a "$q1" -gt 0 ]
}

# queue_interrupts NAME: the interrupts (all CPUs) of the /proc/interrupts line named NAME.
queue_interrupts() {
    awk -v name="$1" -v cpus="$(nproc)" '
        $NF == name { for (i = 2; i <= cpus + 1; i++) s += $i }
        END { print s + 0 }' /proc/interrupts
}

# ---------------------------------------------------------------------------------------------
# lifecycle: data written before a guest reboot (virtio reset) is intact after it. A marker on
# the root fs (a QEMU snapshot overlay, kept across the reboot) tells the boots apart.

LIFECYCLE_MARKER=/vuz/lifecycle.phase
lifecycle_fio() {
    fio --name=lifecycle --filename="/dev/$1" --rw=write --bs=64k --offset=0 --size=32m \
        --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 "$2" \
        >/tmp/lifecycle-fio.log 2>&1 && grep -q 'err= 0' /tmp/lifecycle-fio.log
}

suite_lifecycle() {
    need_dev dev lc || return
    t=lifecycle
    phase="$(cat "$LIFECYCLE_MARKER" 2>/dev/null || echo none)"
    echo "lifecycle: boot phase before this boot: $phase"
    case "$phase" in
        none)
            if ! lifecycle_fio "$dev" --do_verify=0; then
                fail "$t/write-before-reboot" "fio write failed"
                show_tail /tmp/lifecycle-fio.log
                return
            fi
            # And a random MiB at the end of the disk, checksummed on the root fs.
            last=$(($(cat "/sys/block/$dev/size") / 2048 - 1))
            dd if=/dev/urandom of="/dev/$dev" bs=1M seek="$last" count=1 oflag=direct 2>/dev/null
            echo "$last $(range_sum "$dev" "$last" 1)" >/vuz/lifecycle.sum
            pass "$t/write-before-reboot"
            echo rebooted >"$LIFECYCLE_MARKER"
            sync
            echo "VUZ-LIFECYCLE-REBOOTING"
            reboot -f
            ;;
        rebooted)
            echo "done" >"$LIFECYCLE_MARKER"
            sync
            read -r last sum </vuz/lifecycle.sum
            if ! lifecycle_fio "$dev" --verify_only; then
                fail "$t/data-after-reboot" "fio verify of the first 32 MiB failed"
                show_tail /tmp/lifecycle-fio.log
            elif [ "$(range_sum "$dev" "$last" 1)" != "$sum" ]; then
                fail "$t/data-after-reboot" "the last MiB changed across the reboot"
            else
                pass "$t/data-after-reboot"
            fi
            ;;
        *) fail "$t/data-after-reboot" "the guest booted a third time" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# survive: the host kills the daemon under the guest and starts it again on the same state and
# socket (QEMU reconnects), while the guest swaps out and while it swaps in; every page must
# verify and the kernel must have seen no I/O error. The guest only marks its phases on the
# console: the fill of the pressure program is the swap-out (PRESSURE-FILLED ends it), its
# verify passes fault the pages back in.

# vmstat_get NAME: a counter of /proc/vmstat.
vmstat_get() { awk -v n="$1" '$1 == n { print $2 }' /proc/vmstat; }

# io_errors: the kernel's messages about failed block I/O, if any.
io_errors() { dmesg | grep -E 'I/O error|blk_update_request|Buffer I/O error|critical medium'; }

# (The migrate suite runs the same test under its own name, with more verify passes so that
# the guest still swaps while it is migrated.)
suite_survive() {
    dev=""
    need_dev dev sv || return
    t="${1:-survive}" anon_mib="$(param pressure_mib)" seed="$(param seed)"
    passes="$(param passes)"
    echo 0 >"/sys/block/$dev/queue/rotational"
    if ! mkswap "/dev/$dev" >/tmp/mkswap.log 2>&1 ||
        ! swapon -dpages "/dev/$dev" 2>>/tmp/mkswap.log; then
        fail "$t/swapon" "mkswap/swapon -dpages /dev/$dev failed: $(tail -n 1 /tmp/mkswap.log)"
        return
    fi
    pass "$t/swapon"
    in0="$(vmstat_get pswpin)" out0="$(vmstat_get pswpout)"
    echo "pressure: ${anon_mib} MiB anonymous, seed $seed"
    echo "VUZ-SURVIVE-SWAP-OUT"
    # Its lines go to the console as well: the host takes PRESSURE-FILLED for the end of the
    # swap-out phase.
    /vuz/pressure --mib "$anon_mib" --seed "$seed" --passes "${passes:-2}" </dev/null 2>&1 | tee /tmp/pressure.log
    swapped_in=$(($(vmstat_get pswpin) - in0)) swapped_out=$(($(vmstat_get pswpout) - out0))
    echo "VUZ-SURVIVE-VERIFIED pswpin=$swapped_in pswpout=$swapped_out"
    if grep -q 'PRESSURE-RESULT ok' /tmp/pressure.log; then
        pass "$t/checksums"
    else
        fail "$t/checksums" "$(grep -m1 -E 'PRESSURE-RESULT' /tmp/pressure.log || echo 'the pressure program died'); $(grep -c PRESSURE-BAD /tmp/pressure.log) bad page(s) shown"
    fi
    # At least what did not fit in RAM went out and came back in (in 4 KiB pages).
    ram_kib="$(awk '/^MemTotal/ { print $2 }' /proc/meminfo)"
    want=$(((anon_mib * 1024 - ram_kib) / 4))
    check "$t/swapped-out" "only $swapped_out pages swapped out, expected >= $want" \
        [ "$swapped_out" -ge "$want" ]
    check "$t/swapped-in" "only $swapped_in pages swapped in, expected >= $want" \
        [ "$swapped_in" -ge "$want" ]
    errs="$(io_errors)"
    if [ -z "$errs" ]; then
        pass "$t/no-io-errors"
    else
        fail "$t/no-io-errors" "$(echo "$errs" | head -n 2 | tr '\n' ' ')"
        echo "$errs" | head -n 20 | sed 's/^/    | /'
    fi
    check "$t/swapoff" "swapoff /dev/$dev failed" swapoff "/dev/$dev"
}

# survive-new: a second QEMU process on the socket of a daemon whose state holds the pages of
# the survive guest (a copy of its state). This frontend is not that guest's QEMU: it must get
# an empty device. Then the refusal: the host kills the daemon and starts it with no state at
# all, and this frontend, which had written data, must get I/O errors back, never zeros.
suite_survive_new() {
    dev=""
    need_dev dev sv || return
    t=survive
    # The old guest's swap header is in the first page and its first swap slots follow it.
    nz="$({
        dd if="/dev/$dev" bs=1M count=16 iflag=direct 2>/tmp/first.err
        echo $? >/tmp/first.rc
    } | tr -d '\000' | wc -c)"
    if [ "$(cat /tmp/first.rc)" != 0 ]; then
        fail "$t/identity-new-frontend-reads-zeros" "reading the first 16 MiB failed: $(tail -n 1 /tmp/first.err)"
    else
        check "$t/identity-new-frontend-reads-zeros" \
            "$nz non-zero bytes in the first 16 MiB: the old guest's data is visible to a new frontend" \
            [ "$nz" = 0 ]
    fi
    echo "VUZ-HOSTCHECK-IDENTITY"
    read -r -t 300 answer </dev/console || echo "no answer from the host: '$answer'"

    head -c 1048576 /dev/urandom >/tmp/ref.bin
    sum="$(sha256sum </tmp/ref.bin | cut -d' ' -f1)"
    if ! dd if=/tmp/ref.bin of="/dev/$dev" bs=1M oflag=direct conv=fsync 2>/tmp/write.err ||
        [ "$(range_sum "$dev" 0 1)" != "$sum" ]; then
        fail "$t/refused-reads-fail" "writing and reading back 1 MiB before the restart failed: $(tail -n 1 /tmp/write.err)"
        refusal_ready=no
    else
        refusal_ready=yes
    fi
    errors_before="$(io_errors | wc -l)"
    # The host kills the daemon, deletes its state and starts it again, then answers.
    echo "VUZ-HOSTCHECK-REFUSE"
    read -r -t 300 answer </dev/console || echo "no answer from the host: '$answer'"
    [ "$refusal_ready" = yes ] || return
    if timeout 120 dd if="/dev/$dev" of=/tmp/back.bin bs=1M count=1 iflag=direct 2>/tmp/back.err; then
        if cmp -s /tmp/back.bin /tmp/ref.bin; then
            fail "$t/refused-reads-fail" "the read returned the data written before the restart, which the daemon no longer has"
        elif [ "$(tr -d '\000' </tmp/back.bin | wc -c)" = 0 ]; then
            fail "$t/refused-reads-fail" "the read returned zeros instead of an I/O error"
        else
            fail "$t/refused-reads-fail" "the read returned data that is neither what was written nor zeros"
        fi
    elif grep -q -E 'I/O error|Input/output error' /tmp/back.err; then
        pass "$t/refused-reads-fail"
        echo "VUZ-NOTE the read after the restart: $(tail -n 1 /tmp/back.err)"
    else
        fail "$t/refused-reads-fail" "the read failed, but not with EIO: $(tail -n 1 /tmp/back.err)"
    fi
    errs="$(io_errors | tail -n +$((errors_before + 1)) | grep "dev $dev")"
    check "$t/refused-kernel-reports-io-error" "the kernel logged no I/O error for /dev/$dev" \
        [ -n "$errs" ]
    echo "$errs" | head -n 5 | sed 's/^/    | /'
}

# ---------------------------------------------------------------------------------------------
# units: a 6.12 guest swaps out 64 KiB folios (mTHP), so its swap writes are 64 KiB of
# contiguous, aligned pages (with merges off): the daemon with --unit-max 64K stores each as one
# object. The same workload then goes to a second disk whose daemon stores page by page, when
# the host gives one (vuz.pp=), so that the host can set the two daemons' memory side by side.
# Every page is verified; the host reads each daemon while the pages are out.

MTHP=/sys/kernel/mm/transparent_hugepage

# mthp_stat NAME: a counter of the 64 KiB size (hugepages-64kB/stats/NAME; 0 if absent).
mthp_stat() { cat "$MTHP/hugepages-64kB/stats/$1" 2>/dev/null || echo 0; }

# mthp_stats: every counter of the 64 KiB size, NAME=VALUE on one line.
mthp_stats() {
    for f in "$MTHP"/hugepages-64kB/stats/*; do
        [ -e "$f" ] && printf '%s=%s ' "${f##*/}" "$(cat "$f")"
    done
}

# mthp_setup: anonymous faults get 64 KiB folios, never 2 MiB ones (whose swap-out would be
# 2 MiB writes). A size set to `always` applies whatever the global `enabled` says.
mthp_setup() {
    name=units/mthp-enabled
    if [ ! -w "$MTHP/hugepages-64kB/enabled" ]; then
        fail "$name" "kernel $(uname -r) has no $MTHP/hugepages-64kB/enabled (mTHP needs 6.8, its swap-out 6.10)"
        return 1
    fi
    echo always >"$MTHP/hugepages-64kB/enabled"
    echo never >"$MTHP/hugepages-2048kB/enabled"
    echo "VUZ-NOTE THP enabled: $(cat "$MTHP/enabled"); 64kB: $(cat "$MTHP/hugepages-64kB/enabled"); 2048kB: $(cat "$MTHP/hugepages-2048kB/enabled"); defrag: $(cat "$MTHP/defrag")"
    if ! grep -q '\[always\]' "$MTHP/hugepages-64kB/enabled"; then
        fail "$name" "hugepages-64kB/enabled is '$(cat "$MTHP/hugepages-64kB/enabled")' after echo always"
        return 1
    fi
    pass "$name"
}

# units_swap DEV NAME MARKER: swap on DEV (non-rotational, as mTHP swap-out needs: the swap
# allocator hands out aligned runs of slots only from a solid-state device's clusters), the
# pressure program's pages out and back, every one verified; at the hold, MARKER on the console
# for the host, with how many 64 KiB folios went out whole. Checks NAME/swapon, NAME/checksums,
# NAME/mthp-swpout and NAME/swapoff.
units_swap() {
    dev="$1" t="$2" marker="$3" anon_mib="$(param pressure_mib)" seed="$(param seed)"
    echo 0 >"/sys/block/$dev/queue/rotational"
    # The block layer merges neighbouring swap-outs into longer writes (about 170 KiB on
    # average here); with nomerges=2 each 64 KiB folio is one 64 KiB write, the write a unit is
    # made of (vuz.nomerges=0 on the command line keeps the merges).
    nomerges="$(param nomerges)"
    echo "${nomerges:-2}" >"/sys/block/$dev/queue/nomerges"
    if ! mkswap "/dev/$dev" >/tmp/mkswap.log 2>&1 ||
        ! swapon -dpages "/dev/$dev" 2>>/tmp/mkswap.log; then
        fail "$t/swapon" "mkswap/swapon -dpages /dev/$dev failed: $(tail -n 1 /tmp/mkswap.log)"
        return
    fi
    q="/sys/block/$dev/queue"
    echo "VUZ-NOTE $t: /dev/$dev nomerges=$(cat "$q/nomerges") max_sectors_kb=$(cat "$q/max_sectors_kb") max_segments=$(cat "$q/max_segments") max_segment_size=$(cat "$q/max_segment_size")"
    check "$t/swapon" "/dev/$dev is rotational ($(cat "/sys/block/$dev/queue/rotational"))" \
        [ "$(cat "/sys/block/$dev/queue/rotational")" = 0 ]
    out0="$(mthp_stat swpout)" fb0="$(mthp_stat swpout_fallback)"
    fault0="$(mthp_stat anon_fault_alloc)" ffb0="$(mthp_stat anon_fault_fallback)"
    pages0="$(vmstat_get pswpout)"
    echo "pressure ($t on /dev/$dev): ${anon_mib} MiB anonymous, seed $seed"
    # A log of the previous run would end the wait below before this one has begun.
    rm -f /tmp/pressure.log
    /vuz/pressure --mib "$anon_mib" --seed "$seed" --passes 2 --hold-marker PRESSURE-HOLD \
        </dev/console >/tmp/pressure.log 2>&1 &
    ppid=$!
    n=0
    while ! grep -q -E 'PRESSURE-HOLD|PRESSURE-RESULT' /tmp/pressure.log && kill -0 "$ppid" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt 6000 ] && break # 600 s
        usleep 100000
    done
    swpout=$(($(mthp_stat swpout) - out0)) fallback=$(($(mthp_stat swpout_fallback) - fb0))
    faulted=$(($(mthp_stat anon_fault_alloc) - fault0))
    fault_fallback=$(($(mthp_stat anon_fault_fallback) - ffb0))
    pages=$(($(vmstat_get pswpout) - pages0))
    used_kib="$(awk 'NR > 1 { s += $4 } END { print s + 0 }' /proc/swaps)"
    echo "VUZ-NOTE $t: hugepages-64kB/stats: $(mthp_stats)"
    echo "VUZ-NOTE $t: vmstat: $(grep -E '^(thp_|compact_(stall|fail|success)|pgmigrate|pswp)' /proc/vmstat | tr ' \n' '= ')"
    echo "VUZ-NOTE $t: 64 KiB folios faulted $faulted (fallbacks to 4 KiB $fault_fallback), swapped out whole $swpout (split first $fallback); pswpout $pages pages; swap in use ${used_kib} KiB"
    # The host answers (after reading its daemon) with a line, which lets the pressure
    # program's next pass start. It waits for the line's last word.
    echo "$marker swpout_64k=$swpout swpout_fallback_64k=$fallback pswpout=$pages swap_used_kib=$used_kib ready"
    wait "$ppid"
    prc=$?
    cat /tmp/pressure.log
    if [ "$prc" = 0 ] && grep -q 'PRESSURE-RESULT ok' /tmp/pressure.log; then
        pass "$t/checksums"
    else
        fail "$t/checksums" "$(grep -m1 -E 'PRESSURE-(RESULT|BAD)' /tmp/pressure.log || echo "exit $prc")"
    fi
    check "$t/mthp-swpout" "no 64 KiB folio was swapped out whole (hugepages-64kB/stats: swpout +$swpout, swpout_fallback +$fallback, anon_fault_alloc +$faulted)" \
        [ "$swpout" -gt 0 ]
    check "$t/swapoff" "swapoff /dev/$dev failed" swapoff "/dev/$dev"
}

suite_units() {
    un=""
    need_dev un un || return
    mthp_setup || return
    units_swap "$un" units VUZ-HOSTCHECK-UNITS
    if [ -n "$(param pp)" ]; then
        pp=""
        need_dev pp pp && units_swap "$pp" units/per-page VUZ-HOSTCHECK-PER-PAGE
    fi
    errs="$(io_errors)"
    if [ -z "$errs" ]; then
        pass units/no-io-errors
    else
        fail units/no-io-errors "$(echo "$errs" | head -n 2 | tr '\n' ' ')"
        echo "$errs" | head -n 20 | sed 's/^/    | /'
    fi
}

# ---------------------------------------------------------------------------------------------
# bench: the fio suite of ci/fio-bench.sh, on each device in turn; JSON out on the console.

# bench_jobfile DEV SIZE RUNTIME: the measured fio suite, after a fill of the whole region.
bench_jobfile() {
    # Swap-like data for the writes: 50 % compressible buffers (about what kernel zram reports
    # for real swap), refilled for every I/O so the device never sees a reused buffer. The
    # fill job lays the whole region down first, so reads hit stored data.
    printf '[global]\nfilename=/dev/%s\ndirect=1\nioengine=libaio\niodepth=16\nsize=%s\n' "$1" "$2"
    printf 'buffer_compress_percentage=50\nbuffer_compress_chunk=4k\nrefill_buffers\n'
    printf 'randrepeat=0\n\n[fill]\nrw=write\nbs=1m\n'
    for w in randwrite-4k randread-4k seqwrite-1m seqread-1m; do
        case "$w" in
            randwrite-4k) rw=randwrite bs=4k ;;
            randread-4k) rw=randread bs=4k ;;
            seqwrite-1m) rw=write bs=1m ;;
            seqread-1m) rw=read bs=1m ;;
        esac
        printf '\n[%s]\nstonewall\nrw=%s\nbs=%s\ntime_based\nruntime=%s\n' "$w" "$rw" "$bs" "$3"
    done
}

suite_bench() {
    runtime="$(param bench_runtime)"
    size="$(param bench_size)"
    labels="$(param bench_labels | tr ',' ' ')"
    # Warm-up, not measured: under TCG the first run of a code path pays for translating it,
    # which would favour whichever device goes second.
    for label in $labels; do
        need_dev dev "bench_$label" || continue
        bench_jobfile "$dev" "$size" 2 >/tmp/warmup.fio
        echo "bench: warm-up on $label (/dev/$dev), uptime $(cut -d' ' -f1 /proc/uptime) s"
        fio /tmp/warmup.fio >/dev/null 2>&1 || echo "bench: warm-up on $label failed"
    done
    for label in $labels; do
        need_dev dev "bench_$label" || continue
        bench_jobfile "$dev" "$size" "$runtime" >/tmp/bench.fio
        echo "bench: measuring $label (/dev/$dev), uptime $(cut -d' ' -f1 /proc/uptime) s"
        if fio --output-format=json --output="/tmp/bench-$label.json" /tmp/bench.fio \
            >"/tmp/bench-$label.log" 2>&1; then
            echo "VUZ-FIO-JSON-BEGIN $label"
            cat "/tmp/bench-$label.json"
            echo "VUZ-FIO-JSON-END $label"
            pass "bench/fio-$label"
        else
            fail "bench/fio-$label" "fio failed"
            show_tail "/tmp/bench-$label.log"
        fi
    done
}
