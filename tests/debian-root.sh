#!/bin/sh
# A Debian root of another suite than the host's, for a test leg on that suite's own python3 and
# packages (the Debian 13 leg on a Debian 12 host, the Debian 12 one on a Debian 13 host), or for
# running the whole `make test` as if on a host of that suite.
#
#   debian-root.sh build SUITE PACKAGE...   print the path of a root with PACKAGEs (built if not cached)
#   debian-root.sh run ROOT DIR CMD...      run CMD as root in ROOT, in DIR (bind-mounted at its own path)
#
# build: debootstrap (minbase, the host's architecture) from the Debian archive of the host's apt
# sources (tests/debian-mirror.sh), then PACKAGEs installed in it by tests/apt-install.sh (so A/B
# alternatives work as on a host). Cached in $FACTORY_AGENT_ROOT_CACHE (default
# /var/cache/factory-agent-roots), keyed by REVISION, suite and packages; renamed into place when
# complete, so an interrupted build leaves nothing that looks usable.
#
# run: the cached root is never written. CMD sees a throwaway overlay over it (its upper layer on a
# tmpfs), in private mount and PID namespaces: every mount and every process CMD leaves behind goes
# when it ends. Inside: /proc of its own, the host's /sys (cgroup tree included: systemd 257's
# busctl reads it) and /dev, tmpfs /run and /tmp, / a mount point (unshare --propagation needs
# one), the host's network, resolv.conf, CA bundle and /etc/pip.conf (for apt and pip), DIR's
# ancestors with their modes, and the directories $FACTORY_AGENT_ROOT_SHARE names (space-separated
# HOST_DIR[:ROOT_DIR], at ROOT_DIR or their own path: a cache to keep across runs, say). The exit
# status is CMD's.
set -eu

REVISION=1  # bump when the recipe below (or apt-install.sh's choice of packages) changes
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${FACTORY_AGENT_ROOT_CACHE:-/var/cache/factory-agent-roots}

log() { printf 'debian-root: %s\n' "$*" >&2; }
die() { printf 'debian-root: error: %s\n' "$*" >&2; exit 1; }

# ---- build ------------------------------------------------------------------------------------
build() {
    [ $# -ge 1 ] || die "usage: debian-root.sh build SUITE PACKAGE..."
    suite=$1; shift
    key=$(echo "$REVISION $suite $*" | sha256sum | cut -c1-16)
    root=$CACHE/$suite-$key
    if [ -x "$root/usr/bin/python3" ] && [ -f "$root/.complete" ]; then
        echo "$root"; return
    fi
    [ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
    command -v debootstrap >/dev/null || die "debootstrap is missing (make deps installs it)"
    mkdir -p "$CACHE"
    work=$(mktemp -d "$CACHE/$suite-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    m=$(sh "$HERE/debian-mirror.sh")
    t0=$(date +%s)
    log "debootstrap $suite $(dpkg --print-architecture) from $m (minutes, once)"
    debootstrap --variant=minbase "$suite" "$work/root" "$m" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap $suite failed"; }
    r=$work/root
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$m" "$suite" "$suite" > "$r/etc/apt/sources.list.d/debian.sources"
    rm -f "$r/etc/apt/sources.list"
    # Nothing installed here may start a service (there is no init in the root).
    printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
    chmod 0755 "$r/usr/sbin/policy-rc.d"
    cp "$HERE/apt-install.sh" "$r/var/tmp/apt-install.sh"
    log "installing $# package(s) in the $suite root"
    enter "$r" / sh /var/tmp/apt-install.sh "$@" >"$work/apt.log" 2>&1 \
        || { tail -n 30 "$work/apt.log" >&2; die "installing packages in the $suite root failed"; }
    rm -rf "$r/var/tmp/apt-install.sh" "$r/var/cache/apt/archives/"*.deb
    touch "$r/.complete"
    rm -rf "$root"
    mv "$r" "$root"
    rm -rf "$work"; trap - EXIT
    # Roots of older recipes or package lists are of no further use.
    find "$CACHE" -maxdepth 1 -name "$suite-*" ! -name "$(basename "$root")" -exec rm -rf {} +
    log "$suite root made in $(( $(date +%s) - t0 )) s: $root"
    echo "$root"
}

# ---- run --------------------------------------------------------------------------------------
# enter ROOT DIR CMD...: CMD in ROOT (written in place when ROOT is a build; an overlay otherwise).
enter() {
    r=$1 dir=$2; shift 2
    [ "$(id -u)" = 0 ] || die "must run as root (mount, chroot)"
    exec_in=$(cat <<'EOF'
set -eu
r=$1 dir=$2 overlay=$3 share=$4; shift 4
mount --make-rprivate /
if [ "$overlay" = 1 ]; then
    t=$(mktemp -d)
    mount -t tmpfs -o mode=0755 tmpfs "$t"
    mkdir "$t/upper" "$t/work" "$t/merged"
    mount -t overlay overlay -o "lowerdir=$r,upperdir=$t/upper,workdir=$t/work" "$t/merged"
    r=$t/merged
else
    mount --bind "$r" "$r"   # / a mount point inside
fi
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
mount -t tmpfs -o mode=0755 tmpfs "$r/run"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
if [ "$overlay" = 1 ]; then
    # The host's trust for its network (a proxy's CA in its bundle, pip told to use that bundle).
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
        if [ -f "$f" ]; then mkdir -p "$r$(dirname "$f")" && cp -L "$f" "$r$f"; fi
    done
fi
if [ "$dir" != / ]; then
    # DIR's ancestors with their modes (a clone in a 0700 directory stays in one), then DIR itself.
    p=
    for part in $(echo "${dir#/}" | tr '/' ' '); do
        p=$p/$part
        [ -d "$r$p" ] || mkdir "$r$p"
        chmod "$(stat -c %a "$p")" "$r$p"
    done
    mount --bind "$dir" "$r$dir"
fi
for shared in $share; do
    from=${shared%%:*} to=${shared#*:}
    mkdir -p "$from" "$r$to"
    mount --bind "$from" "$r$to"
done
exec chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
    sh -c 'cd "$0" && exec "$@"' "$dir" "$@"
EOF
)
    overlay=0
    [ -f "$r/.complete" ] && overlay=1
    # --fork --pid: CMD is PID 1 of its own namespace; whatever it leaves running ends with it.
    unshare --mount --pid --fork --kill-child sh -c "$exec_in" sh "$r" "$dir" "$overlay" "${FACTORY_AGENT_ROOT_SHARE:-}" "$@"
}

case ${1:-} in
    build) shift; build "$@" ;;
    run)
        [ $# -ge 4 ] || die "usage: debian-root.sh run ROOT DIR CMD..."
        [ -f "$2/.complete" ] || die "$2 is not a root made by debian-root.sh build"
        [ -d "$3" ] || die "no such directory: $3"
        root=$2 dir=$(cd "$3" && pwd -P); shift 3
        enter "$root" "$dir" "$@" ;;
    *) die "usage: debian-root.sh build SUITE PACKAGE... | run ROOT DIR CMD..." ;;
esac
