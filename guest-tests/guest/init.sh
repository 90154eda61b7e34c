#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The guest's init on the root fs (/vuz/init.sh, started by the initramfs). Reads which suite to
# run from the kernel command line (vuz.test=NAME), runs it from /vuz/tests.sh, reports each
# check as a `VUZ-RESULT PASS|FAIL` console line for the host, then powers the guest off.

export PATH=/bin:/usr/bin:/sbin:/usr/sbin
mount -t tmpfs -o size=16m tmpfs /tmp
mount -t tmpfs -o size=4m tmpfs /run
# param NAME: the value of vuz.NAME= on the kernel command line (empty if absent).
param() {
    # shellcheck disable=SC2013 # the command line is one line of words
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "vuz.$1="*) echo "${word#*=}" ;;
        esac
    done
}

# Keep kernel messages off the console, which the host parses (fio JSON goes through it too),
# unless vuz.klog=1 asks for them (VUZ_GUEST_APPEND=vuz.klog=1 on the host) to debug a hang.
[ "$(param klog)" = 1 ] || dmesg -n 1
# fio links librbd, whose libceph-common has a 130 MiB .bss: with the default heuristic the
# loader's zero-fill mapping is refused in a 160 MiB guest. Untouched, it costs no memory.
echo 1 >/proc/sys/vm/overcommit_memory

# shellcheck source=guest-tests/guest/tests.sh disable=SC1091
. /vuz/tests.sh

suite="$(param test)"
echo "VUZ-GUEST-READY test=$suite kernel=$(uname -r) cpus=$(nproc)"
case "$suite" in
    probe) ;;
    main) suite_main ;;
    multiqueue) suite_multiqueue ;;
    lifecycle) suite_lifecycle ;;
    libvirt) suite_libvirt ;;
    survive) suite_survive ;;
    migrate) suite_survive migrate ;;
    survive-new) suite_survive_new ;;
    units) suite_units ;;
    bench) suite_bench ;;
    *) fail "guest" "unknown suite '$suite'" ;;
esac
echo "VUZ-GUEST-DONE test=$suite"
sync
poweroff -f
