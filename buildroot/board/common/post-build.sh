#!/bin/sh
# Buildroot post-build script of every appliance defconfig (BR2_ROOTFS_POST_BUILD_SCRIPT):
#   post-build.sh TARGET_DIR BOARD      (BOARD from BR2_ROOTFS_POST_SCRIPT_ARGS)
# Makes the target folder the appliance's root the way board/mkimage.py makes the Debian
# one, from the same files: the overlay of board/common/rootfs with the board's console in
# inittab, board/BOARD/board.toml and leds.toml in /etc/sdwan, the runtime modules list, no
# lab or PoP tools; checks that the serial console runs socket-console only; then puts the
# kernel Buildroot built (BINARIES_DIR) and the initramfs into /boot: the squashfs made next
# is a whole boot slot.
set -eu
target=$1
board=$2
repo=$(cd "$(dirname "$0")/../../.." && pwd)
exec "$HOST_DIR/bin/python3" "$repo/board/boardlib.py" rootfs "$board" "$target"
