#!/bin/bash
# make-initramfs.sh <out.cpio.gz>
#
# Pack the guest's initramfs: busybox (static, from the cached chroot), tests/guest/init as /init,
# devcheck, nvmecheck and fbcheck (tests/guest/*.c, built here with the host's `gcc -static`:
# the guest programs that drive umdev's test device, an mnvme controller's block device and
# an mbochs display), and the driver modules the checks need (serial for mtty,
# uio_pci_generic for the test device's INTx, nvme for mnvme, bochs for mbochs) if the cached
# kernel builds them as modules.
# Needs the chroot that setup.sh builds (it calls this script itself); the packing tools (cpio,
# modprobe) run inside that chroot so the host needs nothing extra.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}
ROOT=$CACHE/root
# The guest drivers the test needs. Whichever the kernel builds as modules go into the image,
# with their dependencies, in load order.
WANT_MODULES="8250 8250_pci uio_pci_generic nvme bochs"

die() {
    echo "make-initramfs.sh: error: $*" >&2
    exit 1
}

[ $# = 1 ] || die "usage: make-initramfs.sh <out.cpio.gz>"
OUT=$1
[ -x "$ROOT/bin/busybox" ] || die "no busybox in $ROOT; run tests/guest/setup.sh"
KVER=$(cat "$ROOT/umdev/kernel-version" 2>/dev/null) || die "no kernel in $ROOT; run tests/guest/setup.sh"
KTREE=/umdev/kernel/tree # inside the chroot

STAGE_REL=/umdev/initramfs.stage
STAGE=$ROOT$STAGE_REL
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$ROOT/bin/busybox" "$STAGE/bin/busybox"
install -m 0755 "$HERE/init" "$STAGE/init"
command -v gcc >/dev/null || die "gcc is needed to build devcheck (apt-get install gcc libc6-dev)"
for prog in devcheck nvmecheck fbcheck; do
    gcc -static -O2 -Wall -Werror -pthread -o "$STAGE/bin/$prog" "$HERE/$prog.c" ||
        die "building $prog.c with gcc -static failed (libc6-dev provides the static libc)"
done
# The kernel opens /dev/console for /init before devtmpfs is mounted.
mknod -m 0600 "$STAGE/dev/console" c 5 1 2>/dev/null || true

# Report how the kernel builds the serial drivers; the log of setup.sh then shows it.
grep -E '^CONFIG_SERIAL_8250(_PCI|_NR_UARTS|_RUNTIME_UARTS)?=' "$ROOT$KTREE/boot/config-$KVER" >&2 || true

: >"$STAGE/modules.list"
for m in $WANT_MODULES; do
    # `modprobe --show-depends` prints "builtin NAME" or "insmod PATH" lines in load order.
    deps=$(chroot "$ROOT" modprobe -d "$KTREE" -S "$KVER" --show-depends "$m") ||
        die "modprobe cannot resolve $m for $KVER"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        name=$(basename "$path")
        name=${name%.xz}
        name=${name%.zst}
        grep -qx "$name" "$STAGE/modules.list" && continue
        # busybox insmod wants the plain ELF object.
        case $path in
        *.xz) xz -dc "$ROOT$path" >"$STAGE/lib/modules/$name" ;;
        *.zst) die "zstd-compressed module $path is not handled" ;;
        *) cp "$ROOT$path" "$STAGE/lib/modules/$name" ;;
        esac
        echo "$name" >>"$STAGE/modules.list"
    done <<<"$deps"
done
echo "make-initramfs.sh: modules: $(tr '\n' ' ' <"$STAGE/modules.list")" >&2

mkdir -p "$(dirname "$OUT")"
chroot "$ROOT" sh -ec "cd $STAGE_REL && find . | LC_ALL=C sort | cpio -o -H newc --quiet" |
    gzip -9n >"$OUT.tmp" || die "packing the initramfs failed"
mv "$OUT.tmp" "$OUT"
rm -rf "$STAGE"
echo "make-initramfs.sh: wrote $OUT ($(du -k "$OUT" | cut -f1) KiB)" >&2
