#!/bin/sh
# Build the Debian 12 armhf test image for tests/qemu, and cache it outside the repository.
#
#   build-image.sh DEB        print the path of a qcow2 with DEB installed (built if not cached)
#
# Output on stdout, one "name=path" per line: image, kernel, initrd. Progress goes to stderr.
# Cache: $FACTORY_AGENT_QEMU_CACHE, default /var/cache/factory-agent-qemu. Three layers, each
# reused while its inputs are unchanged:
#   rootfs-KEY.tar.zst   debootstrap of bookworm armhf with the package's Depends (KEY: the
#                        package list and this script's revision); ~4-5 min cold, most of it the
#                        second stage running armhf dpkg under qemu-user
#   kernel-KV/           Debian's armmp kernel and a small busybox initrd made on the host
#   image-KEY-DEBSHA.qcow2  that rootfs, the .deb installed with dpkg (it fails on a missing
#                        dependency), plus the harness units: one per .deb, ~30 s
# Needs root, binfmt_misc (registered here) and the host packages `make qemu-deps` installs.
# The Debian mirror is the host's own (its apt sources) unless FACTORY_AGENT_QEMU_MIRROR is set.
set -eu

REVISION=1  # bump when the rootfs recipe below changes
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${FACTORY_AGENT_QEMU_CACHE:-/var/cache/factory-agent-qemu}
BASE_PKGS="systemd-sysv systemd udev dbus kmod iproute2 procps python3 python3-cffi-backend"
# Modules the initrd loads (dependencies resolved from modules.dep): the armmp kernel builds
# virtio, ext4 and 9p as modules. ext4 asks the crypto API for crc32c, which modules.dep does not
# show: load it first.
INITRD_MODULES="crc32c_generic ext4 virtio_mmio virtio_blk virtio_net virtio-rng virtio_console 9p 9pnet_virtio"

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: build-image.sh DEB"
DEB=$(readlink -f "$1")
[ -f "$DEB" ] || die "no such package: $1"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-img mkfs.ext4 depmod cpio zstd dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || die "$tool is missing: run 'make qemu-deps'"
done
mkdir -p "$CACHE"

mirror() {
    if [ -n "${FACTORY_AGENT_QEMU_MIRROR:-}" ]; then
        echo "$FACTORY_AGENT_QEMU_MIRROR"
        return
    fi
    # The first main-archive URI of the host's deb822 or one-line sources (not -security).
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
                     -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]*\)\{0,1\}\([^[:space:]]*\).*/\2/p' "$f" \
              | grep -v -e security -e '^$' | grep -i debian | head -n 1)
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    die "no Debian mirror in the host's apt sources: set FACTORY_AGENT_QEMU_MIRROR"
}

register_binfmt() {
    b=/proc/sys/fs/binfmt_misc
    [ -e $b/register ] || mount -t binfmt_misc binfmt_misc $b
    [ -e $b/qemu-arm ] || cat /usr/lib/binfmt.d/qemu-arm.conf > $b/register
    grep -q enabled $b/qemu-arm || die "binfmt_misc entry qemu-arm is not enabled"
}

# The package's own Depends, as debootstrap's --include wants them: names only, first alternative.
deb_depends() {
    dpkg-deb -f "$DEB" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' \
        -e 's/[[:space:]]//g' | grep -v '^$'
}

# ---- layer 1: the base root file system --------------------------------------------------
PKGS=$( (for p in $BASE_PKGS; do echo "$p"; done; deb_depends) | sort -u | tr '\n' ' ')
ROOTFS_KEY=$(printf '%s %s %s' "$REVISION" "$SUITE" "$PKGS" | sha256sum | cut -c1-16)
ROOTFS_TAR=$CACHE/rootfs-$ROOTFS_KEY.tar.zst

customize_rootfs() {
    r=$1
    echo armhf-board > "$r/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 armhf-board\n' > "$r/etc/hosts"
    : > "$r/etc/fstab"
    # Empty: a new random machine-id on every boot without systemd's first-boot presets (~10 s
    # under emulation); a board's harness passes systemd.machine_id= to keep one across boots.
    : > "$r/etc/machine-id"
    rm -f "$r/var/lib/systemd/random-seed"
    sed -i 's/^root:[^:]*:/root::/' "$r/etc/shadow"
    mkdir -p "$r/etc/systemd/network" "$r/etc/systemd/journald.conf.d"
    printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' > "$r/etc/systemd/network/50-dhcp.network"
    mkdir -p "$r/etc/systemd/system/multi-user.target.wants" "$r/etc/systemd/system/sockets.target.wants"
    ln -sf /lib/systemd/system/systemd-networkd.service "$r/etc/systemd/system/multi-user.target.wants/"
    ln -sf /lib/systemd/system/systemd-networkd.socket "$r/etc/systemd/system/sockets.target.wants/"
    # The journal also goes to the serial console: the host follows the boot (and the agent's
    # progress) in console.log while the guest runs.
    printf '[Journal]\nForwardToConsole=yes\nTTYPath=/dev/ttyAMA0\nMaxLevelConsole=info\n' \
        > "$r/etc/systemd/journald.conf.d/console.conf"
    for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
                fstrim.timer; do
        ln -sf /dev/null "$r/etc/systemd/system/$unit"
    done
    rm -rf "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"*
}

build_rootfs() {
    work=$(mktemp -d "$CACHE/rootfs-build.XXXXXX")
    trap 'umount_below "$work"; rm -rf "$work"' EXIT
    m=$(mirror)
    log "debootstrap $SUITE armhf ($(echo "$PKGS" | wc -w) packages named) from the host's mirror"
    debootstrap --foreign --arch=armhf --variant=minbase --include="$(echo "$PKGS" | tr ' ' ',' | sed 's/,$//')" \
        "$SUITE" "$work/rootfs" "$m" >&2
    register_binfmt
    log "second stage (armhf dpkg under qemu-user: minutes)"
    chroot "$work/rootfs" /debootstrap/debootstrap --second-stage >&2
    customize_rootfs "$work/rootfs"
    tar -C "$work/rootfs" --numeric-owner -cf - . | zstd -q -T0 -6 -o "$work/rootfs.tar.zst"
    mv "$work/rootfs.tar.zst" "$ROOTFS_TAR"
    umount_below "$work"; rm -rf "$work"; trap - EXIT
}

umount_below() {
    # Never remove a tree with something still mounted below it.
    grep -o " $1/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
}

# ---- layer 2: kernel and initrd --------------------------------------------------------
kernel_package() {
    apt-cache depends linux-image-armmp:armhf 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-armmp\)\(:armhf\)\{0,1\}$/\1/p' | head -n 1
}

build_kernel() {
    kdir=$1 kpkg=$2
    work=$(mktemp -d "$CACHE/kernel-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -q "$kpkg:armhf" busybox-static:armhf >&2 2>/dev/null) \
        || (cd "$work" && apt-get download "$kpkg:armhf" busybox-static:armhf >&2)
    dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
    kv=$(ls "$work/k/lib/modules")
    depmod -b "$work/k" "$kv"
    mods=$work/modlist
    : > "$mods"
    for m in $INITRD_MODULES; do
        path=$(find "$work/k/lib/modules/$kv" -name "$m.ko*" | head -n 1)
        [ -n "$path" ] || die "kernel $kv has no module $m"
        rel=${path#"$work/k/lib/modules/$kv/"}
        # modules.dep lists a module's dependencies, deepest last: load them in reverse first.
        deps=$(sed -n "s|^$rel: *||p" "$work/k/lib/modules/$kv/modules.dep")
        for d in $(echo "$deps" | tr ' ' '\n' | sed '/^$/d' | tac) "$rel"; do
            grep -qx "$d" "$mods" || echo "$d" >> "$mods"
        done
    done
    i=$work/initrd
    mkdir -p "$i/bin" "$i/lib/modules" "$i/dev" "$i/proc" "$i/sys" "$i/newroot"
    cp "$work/bb/bin/busybox" "$i/bin/busybox"
    for s in sh mount umount insmod switch_root sleep cat mkdir; do ln -s busybox "$i/bin/$s"; done
    while read -r rel; do
        case $rel in *.xz|*.zst|*.gz) die "compressed module $rel: busybox insmod cannot load it";; esac
        cp "$work/k/lib/modules/$kv/$rel" "$i/lib/modules/"
        basename "$rel" >> "$i/lib/modules/order"
    done < "$mods"
    cp "$HERE/initrd-init" "$i/init"
    chmod 0755 "$i/init"
    (cd "$i" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initrd.img"
    mkdir -p "$work/out/modules"
    cp "$work/k/boot/vmlinuz-$kv" "$work/out/vmlinuz"
    cp "$work/initrd.img" "$work/out/initrd.img"
    # The same modules in the guest's /lib/modules (depmod'ed below), so udev and modprobe there
    # see a consistent tree; the full 200 MB tree is not needed.
    (cd "$work/k/lib/modules/$kv" && cp --parents modules.order modules.builtin modules.builtin.modinfo \
        "$work/out/modules/" && xargs cp --parents -t "$work/out/modules/" < "$mods")
    echo "$kv" > "$work/out/version"
    rm -rf "$kdir"; mv "$work/out" "$kdir"
    rm -rf "$work"; trap - EXIT
}

# ---- layer 3: the image with the package installed --------------------------------------
build_image() {
    img=$1 kdir=$2
    work=$(mktemp -d "$CACHE/image-build.XXXXXX")
    trap 'umount_below "$work"; rm -rf "$work"' EXIT
    r=$work/rootfs
    mkdir "$r"
    zstd -q -dc "$ROOTFS_TAR" | tar -C "$r" --numeric-owner -xf -
    kv=$(cat "$kdir/version")
    mkdir -p "$r/lib/modules/$kv"
    cp -r "$kdir/modules/." "$r/lib/modules/$kv/"
    depmod -b "$r" "$kv"
    register_binfmt
    cp "$DEB" "$r/tmp/factory-agent.deb"
    log "installing $(basename "$DEB") (dpkg under qemu-user)"
    # Mounts for maintainer scripts (py3compile, deb-systemd-helper); none of them starts a unit.
    mount -t proc proc "$r/proc"
    chroot "$r" dpkg -i /tmp/factory-agent.deb >&2
    chroot "$r" sh -c 'test -L /etc/systemd/system/multi-user.target.wants/factory-agent.service' \
        || die "the package did not enable factory-agent.service"
    umount "$r/proc"
    rm -f "$r/tmp/factory-agent.deb"
    install -m 0755 "$HERE/guest/qemu-test-entry" "$r/usr/local/sbin/qemu-test-entry"
    install -m 0644 "$HERE/guest/qemu-provision.service" "$r/etc/systemd/system/qemu-provision.service"
    install -m 0644 "$HERE/guest/qemu-test.service" "$r/etc/systemd/system/qemu-test.service"
    ln -sf ../qemu-provision.service "$r/etc/systemd/system/multi-user.target.wants/qemu-provision.service"
    ln -sf ../qemu-test.service "$r/etc/systemd/system/multi-user.target.wants/qemu-test.service"
    mkdir -p "$r/mnt/host"
    mkfs.ext4 -q -F -L armhf-root -d "$r" "$work/root.raw" 2G >&2
    qemu-img convert -O qcow2 "$work/root.raw" "$work/root.qcow2"
    mv "$work/root.qcow2" "$img"
    umount_below "$work"; rm -rf "$work"; trap - EXIT
}

# ---- main ---------------------------------------------------------------------------------
if [ ! -f "$ROOTFS_TAR" ]; then
    t0=$(date +%s)
    build_rootfs
    log "rootfs built in $(( $(date +%s) - t0 )) s: $ROOTFS_TAR"
else
    log "rootfs cached: $ROOTFS_TAR"
fi

KPKG=$(kernel_package)
[ -n "$KPKG" ] || die "no linux-image-armmp:armhf in apt's lists: run 'make qemu-deps'"
# Keyed by the initrd's recipe too: its /init and module list.
INITRD_KEY=$( (cat "$HERE/initrd-init"; echo "$INITRD_MODULES") | sha256sum | cut -c1-8)
KDIR=$CACHE/kernel-${KPKG#linux-image-}-$INITRD_KEY
if [ ! -f "$KDIR/version" ]; then
    t0=$(date +%s)
    build_kernel "$KDIR" "$KPKG"
    log "kernel and initrd made in $(( $(date +%s) - t0 )) s: $KDIR"
    find "$CACHE" -maxdepth 1 -name 'kernel-*' ! -name "$(basename "$KDIR")" -exec rm -rf {} +
fi

DEBSHA=$( (cat "$DEB" "$HERE/guest/"*; echo "$KDIR") | sha256sum | cut -c1-16)
IMAGE=$CACHE/image-$ROOTFS_KEY-$DEBSHA.qcow2
if [ ! -f "$IMAGE" ]; then
    t0=$(date +%s)
    build_image "$IMAGE" "$KDIR"
    log "image made in $(( $(date +%s) - t0 )) s: $IMAGE"
    # Older images of other packages are of no further use.
    find "$CACHE" -maxdepth 1 -name 'image-*.qcow2' ! -name "$(basename "$IMAGE")" -delete
fi

echo "image=$IMAGE"
echo "kernel=$KDIR/vmlinuz"
echo "initrd=$KDIR/initrd.img"
