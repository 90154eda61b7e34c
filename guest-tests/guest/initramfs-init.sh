#!/bin/busybox sh
# shellcheck shell=dash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# /init of the guest's initramfs: loads the virtio and ext4 modules (the Debian kernel has them
# as modules), finds the root disk by its serial, mounts it and hands over to /vuz/init.sh there.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "VUZ-INITRAMFS-FAIL $*"
    poweroff -f
}

# modules.list holds the modules in dependency order, worked out on the host.
while read -r mod; do
    insmod "/lib/modules/$mod" || fail "insmod $mod"
done </lib/modules/modules.list

root_serial=vuz-rootfs
root=""
# Bounded poll for the root disk to show up (the virtio probe is asynchronous).
tries=0
while [ -z "$root" ]; do
    for s in /sys/block/vd*/serial; do
        [ -e "$s" ] || continue
        if [ "$(cat "$s")" = "$root_serial" ]; then
            root="${s#/sys/block/}"
            root="${root%/serial}"
        fi
    done
    [ -n "$root" ] && break
    tries=$((tries + 1))
    [ "$tries" -gt 300 ] && fail "no disk with serial $root_serial"
    usleep 100000
done

mkdir -p /newroot
mount -t ext4 -o rw "/dev/$root" /newroot || fail "mount /dev/$root"
for fs in proc sys dev; do
    mount --move "/$fs" "/newroot/$fs"
done
exec switch_root /newroot /vuz/init.sh
