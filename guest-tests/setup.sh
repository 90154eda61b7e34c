#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Prepares the host for the guest tests: installs the Debian packages they need if missing, and
# builds the guest (Debian kernel, an initramfs that loads the virtio/ext4 modules, and an ext4
# root fs image holding busybox, fio and its libraries, the pressure program and the test
# scripts) into the cache, keyed on the kernel version and a hash of these scripts. The units
# suite's second kernel (Debian 12's 6.12, which swaps out 64 KiB folios) goes with its own
# initramfs into units/ of the same directory and boots the same root fs.
# Prints the cache directory of the guest on stdout.
#
# Usage: guest-tests/setup.sh [--force]
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Modules to load, in the order the issue lists them; their dependencies are added from
# modules.dep. crc32c_generic is a soft (crypto API) dependency of ext4/jbd2, so it is named.
# A kernel that has one of them built in (6.12: virtio and virtio_pci) loads the rest.
GUEST_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk crc16 mbcache jbd2 crc32c_generic ext4)

APT_UPDATED=no
apt_update_once() {
    if [[ "$APT_UPDATED" == no ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=yes
    fi
}

ensure_packages() {
    local missing=() cmd
    for cmd in qemu-system-x86_64 qemu-storage-daemon cpio fio mke2fs jq xz; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ -x /bin/busybox ]] && file_is_static /bin/busybox || missing+=(busybox-static)
    if ((${#missing[@]})); then
        log "missing: ${missing[*]}; installing ${APT_PACKAGES[*]}"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >&2
    fi
}

# file_is_static FILE: FILE needs no shared library (ldd comes with libc, unlike readelf).
file_is_static() {
    local out
    out="$(LC_ALL=C ldd "$1" 2>&1 || true)" # ldd fails on a static binary
    [[ "$out" == *"not a dynamic executable"* || "$out" == *"statically linked"* ]]
}

# resolve_modules MODDIR: prints the .ko paths (relative to MODDIR) of GUEST_MODULES and their
# dependencies, each after everything it depends on.
resolve_modules() {
    local moddir="$1" name line path deps dep i
    local -A seen=()
    local order=()
    for name in "${GUEST_MODULES[@]}"; do
        grep -qE "(^|/)${name}\.ko\$" "$moddir/modules.builtin" 2>/dev/null && continue
        line="$(grep -E "(^|/)${name}\.ko(\.xz)?:" "$moddir/modules.dep")" ||
            die "module $name not found in modules.dep"
        path="${line%%:*}"
        read -r -a deps <<<"${line#*:}"
        # modules.dep lists a module's dependencies so that the last must be loaded first.
        for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
            dep="${deps[i]}"
            [[ -n "${seen[$dep]:-}" ]] || { seen[$dep]=1 && order+=("$dep"); }
        done
        [[ -n "${seen[$path]:-}" ]] || { seen[$path]=1 && order+=("$path"); }
    done
    printf '%s\n' "${order[@]}"
}

download_kernel() {
    local pkg="$1" debs="$GUEST_CACHE_ROOT/debs"
    mkdir -p "$debs"
    if ! compgen -G "$debs/${pkg}_*.deb" >/dev/null; then
        log "downloading $pkg"
        (cd "$debs" && apt-get download "$pkg" >&2 2>&1) ||
            { apt_update_once && (cd "$debs" && apt-get download "$pkg" >&2); }
    fi
    compgen -G "$debs/${pkg}_*.deb" | sort -V | tail -n 1
}

build_pressure() {
    local out="$1"
    log "building the static pressure program"
    (
        cd "$GT_DIR/pressure"
        CARGO_TARGET_DIR="$GUEST_CACHE_ROOT/pressure-target" \
            RUSTFLAGS='-C target-feature=+crt-static' \
            cargo build --release --target x86_64-unknown-linux-gnu >&2
    )
    cp "$GUEST_CACHE_ROOT/pressure-target/x86_64-unknown-linux-gnu/release/pressure" "$out"
    file_is_static "$out" || die "the pressure program is not static"
}

build_initramfs() {
    local kroot="$1" kver="$2" out="$3" work="$4/initramfs" mod
    local moddir="$kroot/lib/modules/$kver"
    log "building the initramfs"
    mkdir -p "$work"/{bin,dev,proc,sys,newroot,lib/modules}
    cp /bin/busybox "$work/bin/busybox"
    cp "$GT_DIR/guest/initramfs-init.sh" "$work/init"
    chmod 755 "$work/init"
    busybox depmod -b "$kroot" "$kver"
    resolve_modules "$moddir" >"$work/modules.order"
    while read -r mod; do
        cp "$moddir/$mod" "$work/lib/modules/"
        if [[ "$mod" == *.xz ]]; then
            xz -d "$work/lib/modules/$(basename "$mod")"
            mod="${mod%.xz}"
        fi
        basename "$mod" >>"$work/lib/modules/modules.list"
    done <"$work/modules.order"
    rm "$work/modules.order"
    log "guest modules: $(tr '\n' ' ' <"$work/lib/modules/modules.list")"
    (cd "$work" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$out"
}

# copy_with_libs ROOT BINARY: copies BINARY and every shared library ldd lists (and the
# loader) into ROOT at the same paths.
copy_with_libs() {
    local root="$1" bin="$2" lib
    install -D -m 755 "$bin" "$root$bin"
    while read -r lib; do
        [[ -n "$lib" && -e "$lib" ]] || continue
        [[ -e "$root$lib" ]] || install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
    done < <(ldd "$bin" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}')
}

build_rootfs() {
    local out="$1" pressure="$2" work="$3/rootfs" mib
    log "building the root fs image (mke2fs -d)"
    mkdir -p "$work"/{bin,dev,proc,sys,tmp,run,mnt,etc,vuz}
    cp /bin/busybox "$work/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        [[ "$applet" == busybox ]] || ln -s busybox "$work/bin/$applet"
    done
    copy_with_libs "$work" "$(command -v fio)"
    cp "$GT_DIR/guest/init.sh" "$GT_DIR/guest/tests.sh" "$work/vuz/"
    chmod 755 "$work/vuz/init.sh"
    cp "$pressure" "$work/vuz/pressure"
    echo "root:x:0:0:root:/:/bin/sh" >"$work/etc/passwd"
    # Size: the content plus 25 % and 32 MiB for the lifecycle marker and ext4 metadata.
    mib=$(($(du -sm "$work" | cut -f1) * 5 / 4 + 32))
    truncate -s "${mib}M" "$out"
    mke2fs -q -t ext4 -L vuzroot -E root_owner=0:0 -d "$work" -F "$out" >&2
}

# extract_kernel DEB WORK OUT: the kernel of the package DEB (vmlinuz) and an initramfs that
# loads its modules, into OUT; WORK is scratch space. Sets KVER to the kernel's version.
KVER=""
extract_kernel() {
    local deb="$1" work="$2" out="$3" kroot="$2/kernel"
    dpkg-deb -x "$deb" "$kroot"
    KVER="$(basename "$(compgen -G "$kroot/lib/modules/*" | head -n 1)")"
    mkdir -p "$out"
    cp "$kroot/boot/vmlinuz-$KVER" "$out/vmlinuz"
    build_initramfs "$kroot" "$KVER" "$out/initramfs.cpio.gz" "$work"
    rm -rf "$kroot"
}

# build_guest PKG DIR: the guest for the kernel package PKG into DIR.
build_guest() {
    local pkg="$1" dir="$2" deb work
    log "building the guest for $pkg into $dir"
    deb="$(download_kernel "$pkg")"
    work="$(mktemp -d "${TMPDIR:-/tmp}/vuz-setup.XXXXXX")"
    track_path "$work"
    extract_kernel "$deb" "$work" "$work/out"
    build_pressure "$work/out/pressure"
    build_rootfs "$work/out/rootfs.img" "$work/out/pressure" "$work"
    printf 'kernel_package=%s\nkernel_version=%s\ninputs_hash=%s\n' \
        "$pkg" "$KVER" "$(inputs_hash)" >"$work/out/manifest"
    touch "$work/out/ready"

    # Replace this key's directory, and drop guests built from older inputs.
    mkdir -p "$GUEST_CACHE_ROOT"
    find "$GUEST_CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -name '6.1.0-*' ! -path "$dir" \
        -exec rm -rf {} +
    rm -rf "$dir"
    mv "$work/out" "$dir"
    log "guest ready: $dir ($(du -sh "$dir" | cut -f1))"
}

# build_units_kernel DIR FORCE: the units suite's kernel and its initramfs into DIR/units, unless
# they are there for the package apt offers now. Without such a package it warns and builds
# nothing: the units suite then fails, the others run.
build_units_kernel() {
    local dir="$1" force="$2" pkg deb work
    pkg="$(units_kernel_package)"
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg="$(units_kernel_package)"
    fi
    if [[ -z "$pkg" ]]; then
        warn "apt offers no linux-image-6.12.N+deb12-amd64-unsigned (bookworm-security): the units suite will fail"
        return
    fi
    if [[ -f "$dir/units/ready" && "$force" == no ]] &&
        grep -qxF "kernel_package=$pkg" "$dir/units/manifest"; then
        return
    fi
    log "building the units kernel $pkg into $dir/units"
    deb="$(download_kernel "$pkg")"
    work="$(mktemp -d "${TMPDIR:-/tmp}/vuz-setup.XXXXXX")"
    track_path "$work"
    extract_kernel "$deb" "$work" "$work/out"
    printf 'kernel_package=%s\nkernel_version=%s\n' "$pkg" "$KVER" >"$work/out/manifest"
    touch "$work/out/ready"
    rm -rf "$dir/units"
    mv "$work/out" "$dir/units"
    log "units kernel ready: $dir/units ($(du -sh "$dir/units" | cut -f1))"
}

main() {
    local force=no
    [[ "${1:-}" == --force ]] && force=yes
    ensure_packages
    install_cleanup_trap
    local pkg
    pkg="$(kernel_package)"
    if [[ -z "$pkg" ]]; then
        apt_update_once
        pkg="$(kernel_package)"
    fi
    [[ -n "$pkg" ]] || die "apt offers no linux-image-6.1.0-NN-amd64 package"
    local dir
    dir="$(guest_dir "$pkg")"
    if [[ -f "$dir/ready" && "$force" == no ]]; then
        log "guest image is cached: $dir"
    else
        build_guest "$pkg" "$dir"
    fi
    build_units_kernel "$dir" "$force"
    echo "$dir"
}

main "$@"
