#!/bin/sh
# Build a Debian test image for tests/qemu, and cache it outside the repository.
#
#   build-image.sh [--arch armhf|arm64] DEB   print the paths of a qcow2 with DEB installed (built
#                                             if not cached), and of the kernel and initrd booting it
#
#   armhf (the default): Debian 12 "bookworm", the armmp kernel
#   arm64:               Debian 13 "trixie", the arm64 kernel
#
# Output on stdout, one "name=path" per line: image, kernel, initrd. Progress goes to stderr.
# Cache: $FACTORY_AGENT_QEMU_CACHE, default /var/cache/factory-agent-qemu. Three layers per
# architecture, each reused while its inputs are unchanged (arm64's names start with "arm64-"):
#   rootfs-KEY.tar.zst   debootstrap of the suite with the package's Depends (KEY: the package
#                        list, the suite and this script's revision); minutes cold, most of it the
#                        second stage running the guest's dpkg under qemu-user
#   kernel-KV-KEY/       Debian's kernel and a small busybox initrd made on the host (KEY: the
#                        initrd's recipe); kept until that recipe changes or the directory is removed
#   image-KEY-DEBSHA.qcow2  that rootfs, the .deb installed with dpkg (it fails on a missing
#                        dependency), plus the harness units: one per .deb, ~30 s
# Needs root, binfmt_misc (registered here) and the host packages `make qemu-deps` installs. The
# guest's packages come from the guest's suite, never from the host's apt lists: debootstrap, and
# apt-get on lists of its own for the kernel and busybox. The Debian mirror is the host's own (its
# apt sources) unless FACTORY_AGENT_QEMU_MIRROR is set.
set -eu

REVISION=1  # bump when the rootfs recipe below changes
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${FACTORY_AGENT_QEMU_CACHE:-/var/cache/factory-agent-qemu}
BASE_PKGS="systemd-sysv systemd udev dbus kmod iproute2 procps python3 python3-cffi-backend"
# Modules the initrd loads (dependencies resolved from modules.dep): the armmp kernel builds
# virtio, ext4 and 9p as modules. ext4 asks the crypto API for crc32c, which modules.dep does not
# show: load it first.
INITRD_MODULES="crc32c_generic ext4 virtio_mmio virtio_blk virtio_net virtio-rng virtio_console 9p 9pnet_virtio"

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

ARCH=armhf
if [ "${1:-}" = --arch ]; then
    [ $# -ge 2 ] || die "usage: build-image.sh [--arch armhf|arm64] DEB"
    ARCH=$2; shift 2
fi
# SUITE, the kernel flavour, the qemu-user binfmt entry, and the cache names' prefix
case $ARCH in
    armhf) SUITE=bookworm KFLAVOUR=armmp QEMU_USER=arm PREFIX= ;;
    arm64) SUITE=trixie KFLAVOUR=arm64 QEMU_USER=aarch64 PREFIX=arm64- ;;
    *) die "unknown architecture $ARCH (armhf or arm64)" ;;
esac
[ $# -eq 1 ] || die "usage: build-image.sh [--arch armhf|arm64] DEB"
DEB=$(readlink -f "$1")
[ -f "$DEB" ] || die "no such package: $1"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-img mkfs.ext4 depmod cpio zstd xz dpkg-deb apt-get apt-cache; do
    command -v "$tool" >/dev/null || die "$tool is missing: run 'make qemu-deps'"
done
mkdir -p "$CACHE"

mirror() {
    # FACTORY_AGENT_QEMU_MIRROR, else tests/debian-mirror.sh's (FACTORY_AGENT_MIRROR or the host's sources).
    FACTORY_AGENT_MIRROR=${FACTORY_AGENT_QEMU_MIRROR:-${FACTORY_AGENT_MIRROR:-}} sh "$HERE/../debian-mirror.sh" \
        || die "set FACTORY_AGENT_QEMU_MIRROR"
}

register_binfmt() {
    b=/proc/sys/fs/binfmt_misc
    [ -e $b/register ] || mount -t binfmt_misc binfmt_misc $b
    [ -e "$b/qemu-$QEMU_USER" ] || cat "/usr/lib/binfmt.d/qemu-$QEMU_USER.conf" > $b/register
    grep -q enabled "$b/qemu-$QEMU_USER" || die "binfmt_misc entry qemu-$QEMU_USER is not enabled"
}

# apt-get or apt-cache ($2) on the host, with lists of the guest's suite and architecture kept in
# $1: never the host's lists, whose suite may not be the guest's.
guest_apt() {
    d=$1 tool=$2; shift 2
    if [ ! -d "$d/lists" ]; then
        mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/parts"
        : > "$d/status"
        keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        [ -f "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.pgp
        echo "deb [arch=$ARCH signed-by=$keyring] $(mirror) $SUITE main" > "$d/sources.list"
    fi
    "$tool" -q -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts="$d/parts" \
        -o Dir::State::Lists="$d/lists" -o Dir::State::Status="$d/status" -o Dir::Cache="$d/cache" \
        -o APT::Architecture="$ARCH" -o APT::Architectures::="$ARCH" -o Acquire::Languages=none \
        -o APT::Sandbox::User=root "$@"
}

# The package's own Depends, as debootstrap's --include wants them: names only, first alternative.
deb_depends() {
    dpkg-deb -f "$DEB" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' \
        -e 's/[[:space:]]//g' | grep -v '^$'
}

# ---- layer 1: the base root file system --------------------------------------------------
PKGS=$( (for p in $BASE_PKGS; do echo "$p"; done; deb_depends) | sort -u | tr '\n' ' ')
ROOTFS_KEY=$(printf '%s %s %s' "$REVISION" "$SUITE" "$PKGS" | sha256sum | cut -c1-16)
ROOTFS_TAR=$CACHE/${PREFIX}rootfs-$ROOTFS_KEY.tar.zst

customize_rootfs() {
    r=$1
    echo "$ARCH-board" > "$r/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 %s-board\n' "$ARCH" > "$r/etc/hosts"
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
    work=$(mktemp -d "$CACHE/${PREFIX}rootfs-build.XXXXXX")
    trap 'umount_below "$work"; rm -rf "$work"' EXIT
    m=$(mirror)
    log "debootstrap $SUITE $ARCH ($(echo "$PKGS" | wc -w) packages named) from the host's mirror"
    debootstrap --foreign --arch="$ARCH" --variant=minbase --include="$(echo "$PKGS" | tr ' ' ',' | sed 's/,$//')" \
        "$SUITE" "$work/rootfs" "$m" >&2
    only_packages_installed "$work/rootfs"
    register_binfmt
    log "second stage ($ARCH dpkg under qemu-user: minutes)"
    chroot "$work/rootfs" /debootstrap/debootstrap --second-stage >&2
    customize_rootfs "$work/rootfs"
    tar -C "$work/rootfs" --numeric-owner -cf - . | zstd -q -T0 -6 -o "$work/rootfs.tar.zst"
    mv "$work/rootfs.tar.zst" "$ROOTFS_TAR"
    umount_below "$work"; rm -rf "$work"; trap - EXIT
}

# The second stage reads the suite's whole Packages index (60 MB for trixie) with emulated grep
# and perl, once per pre-dependency: keep in it only the packages the first stage fetched.
only_packages_installed() {
    for f in "$1"/var/lib/apt/lists/*_Packages; do
        awk 'NR == FNR { keep[$1] = 1; next }
             /^Package: / { name = $2 }
             { stanza = stanza $0 "\n" }
             /^$/ { if (name in keep) printf "%s", stanza; stanza = ""; name = "" }
             END { if (name in keep) printf "%s", stanza }' "$1/debootstrap/debpaths" "$f" > "$f.kept"
        mv "$f.kept" "$f"
    done
}

umount_below() {
    # Never remove a tree with something still mounted below it.
    grep -o " $1/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
}

# ---- layer 2: kernel and initrd --------------------------------------------------------
# The newest linux-image-FLAVOUR of the guest's suite, and busybox-static, into $1 (with the
# package lists in $1/apt); the versioned kernel package's name on stdout.
fetch_kernel() {
    guest_apt "$1/apt" apt-get update >&2
    kpkg=$(guest_apt "$1/apt" apt-cache depends "linux-image-$KFLAVOUR" \
           | sed -n "s/^ *Depends: \(linux-image-[0-9].*-$KFLAVOUR\)\(:$ARCH\)\{0,1\}\$/\1/p" | head -n 1)
    [ -n "$kpkg" ] || die "no linux-image-$KFLAVOUR in $SUITE $ARCH on $(mirror)"
    (cd "$1" && guest_apt "$1/apt" apt-get download "$kpkg" busybox-static >&2)
    echo "$kpkg"
}

# busybox insmod loads only plain .ko files: Debian 13's kernels ship .ko.xz
decompress() {
    case $1 in
        *.xz) xz -d "$1" ;;
        *.zst) zstd -q -d --rm "$1" ;;
        *.gz) gzip -d "$1" ;;
    esac
}

build_kernel() {
    work=$(mktemp -d "$CACHE/${PREFIX}kernel-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    kpkg=$(fetch_kernel "$work")
    kdir=$CACHE/${PREFIX}kernel-${kpkg#linux-image-}-$INITRD_KEY
    dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
    # Debian 13 ships the modules in usr/lib/modules, Debian 12 in lib/modules: one tree at both
    # paths, for whichever the host's depmod reads.
    if [ -d "$work/k/usr/lib/modules" ]; then
        [ -e "$work/k/lib" ] || ln -s usr/lib "$work/k/lib"
    else
        mkdir -p "$work/k/usr/lib" && ln -s ../../lib/modules "$work/k/usr/lib/modules"
    fi
    kv=$(ls "$work/k/lib/modules")
    mdir=$work/k/lib/modules/$kv
    depmod -b "$work/k" "$kv"
    mods=$work/modlist
    : > "$mods"
    for m in $INITRD_MODULES; do
        path=$(find "$mdir/" -name "$m.ko*" | head -n 1)
        if [ -z "$path" ]; then
            grep -q "/$m\.ko\$" "$mdir/modules.builtin" || die "kernel $kv has no module $m"
            log "$m is built into $kv"
            continue
        fi
        rel=${path#"$mdir/"}
        # modules.dep lists a module's dependencies, deepest last: load them in reverse first.
        deps=$(sed -n "s|^$rel: *||p" "$mdir/modules.dep")
        for d in $(echo "$deps" | tr ' ' '\n' | sed '/^$/d' | tac) "$rel"; do
            grep -qx "$d" "$mods" || echo "$d" >> "$mods"
        done
    done
    while read -r rel; do decompress "$mdir/$rel"; done < "$mods"
    sed -i -e 's/\.ko\.\(xz\|zst\|gz\)$/.ko/' "$mods"
    i=$work/initrd
    mkdir -p "$i/bin" "$i/lib/modules" "$i/dev" "$i/proc" "$i/sys" "$i/newroot"
    cp "$(find "$work/bb" -path '*bin/busybox' -type f | head -n 1)" "$i/bin/busybox"
    for s in sh mount umount insmod switch_root sleep cat mkdir; do ln -s busybox "$i/bin/$s"; done
    while read -r rel; do
        cp "$mdir/$rel" "$i/lib/modules/"
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
    (cd "$mdir" && cp --parents modules.order modules.builtin modules.builtin.modinfo \
        "$work/out/modules/" && xargs cp --parents -t "$work/out/modules/" < "$mods")
    echo "$kv" > "$work/out/version"
    rm -rf "$kdir"; mv "$work/out" "$kdir"
    rm -rf "$work"; trap - EXIT
    KDIR=$kdir
}

# ---- layer 3: the image with the package installed --------------------------------------
build_image() {
    img=$1 kdir=$2
    work=$(mktemp -d "$CACHE/${PREFIX}image-build.XXXXXX")
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
    mkfs.ext4 -q -F -L "$ARCH-root" -d "$r" "$work/root.raw" 2G >&2
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

# Keyed by the initrd's recipe (its /init and module list); the kernel is the suite's newest when
# the layer is made.
INITRD_KEY=$( (cat "$HERE/initrd-init"; echo "$INITRD_MODULES") | sha256sum | cut -c1-8)
KDIR=$(find "$CACHE" -maxdepth 1 -type d -name "${PREFIX}kernel-*-$KFLAVOUR-$INITRD_KEY" | sort | tail -n 1)
if [ -z "$KDIR" ] || [ ! -f "$KDIR/version" ]; then
    t0=$(date +%s)
    build_kernel
    log "kernel and initrd made in $(( $(date +%s) - t0 )) s: $KDIR"
    find "$CACHE" -maxdepth 1 -name "${PREFIX}kernel-*" ! -name "$(basename "$KDIR")" -exec rm -rf {} +
fi

DEBSHA=$( (cat "$DEB" "$HERE/guest/"*; echo "$KDIR") | sha256sum | cut -c1-16)
IMAGE=$CACHE/${PREFIX}image-$ROOTFS_KEY-$DEBSHA.qcow2
if [ ! -f "$IMAGE" ]; then
    t0=$(date +%s)
    build_image "$IMAGE" "$KDIR"
    log "image made in $(( $(date +%s) - t0 )) s: $IMAGE"
    # Older images of other packages are of no further use.
    find "$CACHE" -maxdepth 1 -name "${PREFIX}image-*.qcow2" ! -name "$(basename "$IMAGE")" -delete
fi

echo "image=$IMAGE"
echo "kernel=$KDIR/vmlinuz"
echo "initrd=$KDIR/initrd.img"
