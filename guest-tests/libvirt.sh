# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Host-side helpers of the libvirt suite: bringing up libvirtd (without systemd), the domain
# XML around contrib/libvirt-disk.xml, and the domain's life (define, start, wait, undefine).
# Sourced by run.sh after lib.sh; not run.

# shellcheck shell=bash
# LIBVIRT_SKIP, LIBVIRT_DIR, CONSOLE_LOG and CONSOLE_IN are read by run.sh and lib.sh.
# shellcheck disable=SC2034

LIBVIRT_URI="qemu:///system"
# Why the libvirt suite cannot run here, set by libvirt_up.
LIBVIRT_SKIP=""

# virsh_ ARGS...: virsh against the system instance, bounded.
virsh_() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }

libvirt_answers() { virsh_ version >/dev/null 2>&1; }

# libvirt_up LOGDIR: libvirtd answers. When it is installed but not running (no systemd, as in
# a container), starts virtlogd and libvirtd in the foreground as children of this shell,
# stopped at exit. Fails with LIBVIRT_SKIP set to the reason when libvirt cannot run here.
libvirt_up() {
    local logdir="$1" daemon
    LIBVIRT_SKIP=""
    libvirt_answers && return 0
    for daemon in virsh virtlogd libvirtd; do
        if ! command -v "$daemon" >/dev/null; then
            LIBVIRT_SKIP="$daemon is not installed (apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients)"
            return 1
        fi
    done
    if ((EUID != 0)); then
        LIBVIRT_SKIP="libvirtd is not running, and starting it needs root"
        return 1
    fi
    if ! pgrep -x virtlogd >/dev/null; then
        log "starting virtlogd"
        virtlogd >"$logdir/virtlogd.log" 2>&1 &
        track_pid $!
    fi
    log "starting libvirtd"
    libvirtd >"$logdir/libvirtd.log" 2>&1 &
    local pid=$!
    track_pid "$pid"
    if ! poll_until 30 "libvirtd to answer" libvirt_answers; then
        LIBVIRT_SKIP="libvirtd did not answer within 30 s: $(tail -n 3 "$logdir/libvirtd.log" | tr '\n' ' ')"
        return 1
    fi
}

# libvirt_qemu_group: the group libvirt runs QEMU in: qemu.conf's `group =`, else Debian's
# default, kvm (user libvirt-qemu, group kvm).
libvirt_qemu_group() {
    local group
    group="$(sed -n 's/^[[:space:]]*group[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
        /etc/libvirt/qemu.conf 2>/dev/null | tail -n 1)"
    echo "${group:-kvm}"
}

# contrib_element TAG [ATTRIBUTES]: the element TAG of contrib/libvirt-disk.xml, from its
# opening line (`<TAG` and ATTRIBUTES at the start of a line) to its closing one.
contrib_element() {
    sed -n "/^[[:space:]]*<$1$2/,/^[[:space:]]*<\/$1>/p" "$REPO_DIR/contrib/libvirt-disk.xml"
}

# libvirt_domain_xml NAME TYPE DIR SOCK CMDLINE: a domain that boots the test guest's kernel
# straight (vmlinuz, initramfs.cpio.gz and rootfs.img in DIR, console on the FIFO pair DIR/con),
# with <memoryBacking>, <features> (<acpi/>) and the vhost-user <disk> exactly as
# contrib/libvirt-disk.xml has them, only the socket path replaced by SOCK.
libvirt_domain_xml() {
    local name="$1" type="$2" dir="$3" sock="$4" cmdline="$5" memory_backing features disk cpu
    memory_backing="$(contrib_element memoryBacking '>')"
    features="$(contrib_element features '>')"
    disk="$(contrib_element disk " type='vhostuser'" | sed "s|/run/vhost-user-zram/vm1.sock|$sock|")"
    [[ -n "$memory_backing" && "$features" == *"<acpi/>"* && "$disk" == *"path='$sock'"* ]] ||
        die "contrib/libvirt-disk.xml lacks <memoryBacking>, <features> with <acpi/> or a vhostuser <disk> on /run/vhost-user-zram/vm1.sock"
    cpu="<cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>"
    [[ "$type" == kvm ]] && cpu="<cpu mode='host-passthrough'/>"
    # One vCPU of at most two: QEMU 7.2's TCG leaves out memory fences with a single possible
    # vCPU (see run_guest_bg in lib.sh).
    cat <<EOF
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>$GUEST_RAM_MIB</memory>
  <vcpu current='1'>2</vcpu>
$memory_backing
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initramfs.cpio.gz</initrd>
    <cmdline>$cmdline</cmdline>
  </os>
$features
  $cpu
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$dir/rootfs.img'/>
      <target dev='vda' bus='virtio'/>
      <serial>$ROOT_SERIAL</serial>
    </disk>
$disk
    <serial type='pipe'>
      <source path='$dir/con'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# libvirt_guest_dir GUEST: a directory QEMU's unprivileged user can read, holding a copy of
# the guest (the cache lives under root's home, which it cannot enter; the root fs is a
# private, writable copy) and the console FIFO pair. Sets LIBVIRT_DIR, CONSOLE_LOG and
# CONSOLE_IN, and starts copying the console to CONSOLE_LOG.
libvirt_guest_dir() {
    local guest="$1" out="$2"
    new_tmpdir LIBVIRT_DIR
    chmod 0755 "$LIBVIRT_DIR"
    cp "$guest/vmlinuz" "$guest/initramfs.cpio.gz" "$LIBVIRT_DIR/"
    cp --sparse=always "$guest/rootfs.img" "$LIBVIRT_DIR/"
    mkfifo "$LIBVIRT_DIR/con.in" "$LIBVIRT_DIR/con.out"
    CONSOLE_LOG="$out.console.log"
    CONSOLE_IN="$LIBVIRT_DIR/con.in"
    : >"$CONSOLE_LOG"
    # Open for reading and writing, so that neither this nor QEMU's open waits for the other.
    cat <>"$LIBVIRT_DIR/con.out" >"$CONSOLE_LOG" &
    track_pid $!
}

# Domains this run defined: destroyed and undefined at exit, whatever the reason (before
# libvirtd, if this run started it, is stopped).
LIBVIRT_DOMAINS=()
track_cleanup libvirt_cleanup
libvirt_cleanup() {
    local name
    for name in "${LIBVIRT_DOMAINS[@]}"; do
        virsh_ destroy "$name" >/dev/null 2>&1 || true
        virsh_ undefine "$name" >/dev/null 2>&1 || true
    done
    LIBVIRT_DOMAINS=()
}

# libvirt_domain_state NAME: `shut off (shutdown)`, `running (booted)`... from virsh.
libvirt_domain_state() {
    virsh_ domstate --reason "$1" 2>/dev/null | head -n 1
}

libvirt_domain_off() { [[ "$(libvirt_domain_state "$1")" == "shut off"* ]]; }
