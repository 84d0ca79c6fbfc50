#!/bin/bash
# Build and cache everything the guest end-to-end test (crates/umdev-tests/tests/guest_mtty.rs)
# needs, outside the git clone:
#
#   $CACHE/root/                        Debian trixie minbase chroot with trixie-backports QEMU
#                                       (QEMU >= 10.1 has the vfio-user-pci client; the host's
#                                       bookworm libc is too old for it, hence the chroot)
#   $CACHE/root/umdev/vmlinuz           Debian's kernel, taken from its .deb (unpacked, not installed)
#   $CACHE/root/umdev/initramfs.cpio.gz busybox initramfs built by make-initramfs.sh
#   $CACHE/ready                        written last; the test runs only when it exists
#
# CACHE is ${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}.
# Idempotent: a second run only checks stamps (and rebuilds the initramfs if its inputs changed).
# Needs root (debootstrap, chroot). Installs debootstrap on the host with apt-get if missing.
# Never installs QEMU on the host (bookworm's qemu-system-x86 would remove qemu-utils).
#
# Environment:
#   UMDEV_GUEST_CACHE   cache directory (see above)
#   UMDEV_GUEST_MIRROR  Debian mirror URL; default: the first Debian URI in the host's apt sources
#   UMDEV_GUEST_FORCE=1 throw the cache away and build from scratch
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}
ROOT=$CACHE/root
# Bump when the chroot recipe below changes, so cached chroots are rebuilt.
RECIPE=1
SUITE=trixie

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}
log() { echo "setup.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"

# The Debian mirror, taken from the host's apt configuration rather than written down here.
host_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822: the first URIs: line of a stanza that is not the security archive.
        uri=$(awk 'tolower($1)=="uris:" && $2 !~ /security/ {print $2; exit}' "$f")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
        if [ -n "$uri" ]; then
            echo "$uri"
            return
        fi
    done
}

ensure_host_tool() { # <command> <package>
    command -v "$1" >/dev/null 2>&1 && return
    log "installing $2 on the host"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >&2; then
        apt-get update -q >&2 || die "apt-get update failed on the host"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >&2 ||
            die "could not install $2 on the host"
    fi
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}

in_root() { # <root> <shell command>
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive sh -ec "$*"
}

# Build the chroot and the kernel into $1 (a scratch directory).
build_root() {
    local root=$1 mirror kver t0
    mirror=${UMDEV_GUEST_MIRROR:-$(host_mirror)}
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt sources; set UMDEV_GUEST_MIRROR"
    log "mirror $mirror"
    ensure_host_tool debootstrap debootstrap

    t0=$SECONDS
    debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >&2 ||
        die "debootstrap $SUITE from $mirror failed (log: $root/debootstrap/debootstrap.log)"
    log "debootstrap took $((SECONDS - t0)) s"

    # The host turns apt's Release expiry check off; the chroot needs the same or
    # `apt-get update` fails with "Release file ... is expired".
    echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99umdev-no-valid-until"
    echo "deb $mirror $SUITE-backports main" >"$root/etc/apt/sources.list.d/$SUITE-backports.list"

    t0=$SECONDS
    in_root "$root" "apt-get update -q
        apt-get install -y -q --no-install-recommends -t $SUITE-backports qemu-system-x86
        apt-get install -y -q --no-install-recommends busybox-static cpio xz-utils kmod
        apt-get clean" >&2 || die "installing QEMU and tools in the chroot failed"
    log "package installs took $((SECONDS - t0)) s"
    in_root "$root" "qemu-system-x86_64 -device help | grep -q vfio-user-pci" ||
        die "the chroot's QEMU has no vfio-user-pci device"

    # The kernel: download the package linux-image-amd64 points at and unpack it (no install,
    # so no initramfs-tools hooks run). Modules stay unpacked for make-initramfs.sh.
    t0=$SECONDS
    in_root "$root" 'rm -rf /umdev/kernel && mkdir -p /umdev/kernel && cd /umdev/kernel
        chown _apt /umdev/kernel # lets apt download as _apt instead of warning
        pkg=$(apt-cache depends linux-image-amd64 | awk "/Depends: linux-image-[0-9]/ {print \$2; exit}")
        [ -n "$pkg" ] || { echo "no linux-image package found" >&2; exit 1; }
        apt-get download "$pkg"
        dpkg-deb -x linux-image-*.deb tree
        # The package ships usr/lib/modules; kmod with -b/-d looks under lib/modules.
        [ -e tree/lib ] || ln -s usr/lib tree/lib
        rm -f linux-image-*.deb' >&2 || die "downloading or unpacking the kernel failed"
    kver=$(ls "$root/umdev/kernel/tree/usr/lib/modules")
    [ -n "$kver" ] && [ -f "$root/umdev/kernel/tree/boot/vmlinuz-$kver" ] ||
        die "no vmlinuz in the unpacked kernel package"
    cp "$root/umdev/kernel/tree/boot/vmlinuz-$kver" "$root/umdev/vmlinuz"
    # modules.dep is made at install time, not shipped; make-initramfs.sh resolves with it.
    in_root "$root" "depmod -b /umdev/kernel/tree $kver" || die "depmod failed"
    echo "$kver" >"$root/umdev/kernel-version"
    log "kernel $kver fetched in $((SECONDS - t0)) s"
    echo "$RECIPE" >"$root/umdev/recipe"
}

T_START=$SECONDS
mkdir -p "$CACHE" || die "cannot create $CACHE"
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"

if [ "${UMDEV_GUEST_FORCE:-0}" = 1 ]; then
    rm -f "$CACHE/ready"
    rm -rf "$ROOT"
fi

if [ "$(cat "$ROOT/umdev/recipe" 2>/dev/null)" != "$RECIPE" ]; then
    rm -f "$CACHE/ready"
    rm -rf "$ROOT" "$ROOT.tmp"
    log "building the $SUITE chroot in $ROOT"
    build_root "$ROOT.tmp"
    mv "$ROOT.tmp" "$ROOT"
fi

# The initramfs is cheap: rebuild it whenever its inputs change.
INPUTS=$(cat "$HERE/make-initramfs.sh" "$HERE/init" "$HERE/devcheck.c" "$HERE/nvmecheck.c" "$HERE/fbcheck.c" "$HERE/check.h" "$ROOT/umdev/kernel-version" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ROOT/umdev/initramfs.inputs" 2>/dev/null)" != "$INPUTS" ] ||
    [ ! -s "$ROOT/umdev/initramfs.cpio.gz" ]; then
    rm -f "$CACHE/ready"
    UMDEV_GUEST_CACHE=$CACHE "$HERE/make-initramfs.sh" "$ROOT/umdev/initramfs.cpio.gz" ||
        die "make-initramfs.sh failed"
    echo "$INPUTS" >"$ROOT/umdev/initramfs.inputs"
fi

for f in umdev/vmlinuz umdev/initramfs.cpio.gz usr/bin/qemu-system-x86_64; do
    [ -s "$ROOT/$f" ] || die "$ROOT/$f is missing; rerun with UMDEV_GUEST_FORCE=1"
done
if [ ! -f "$CACHE/ready" ]; then
    {
        echo "root=$ROOT"
        echo "kernel-version=$(cat "$ROOT/umdev/kernel-version")"
        echo "qemu=$(in_root "$ROOT" 'qemu-system-x86_64 --version | head -n1')"
    } >"$CACHE/ready"
fi
log "ready in $((SECONDS - T_START)) s: $CACHE"
