#!/bin/sh
# Buildroot post-image script of every appliance defconfig (BR2_ROOTFS_POST_IMAGE_SCRIPT):
#   post-image.sh BINARIES_DIR BOARD    (BOARD from BR2_ROOTFS_POST_SCRIPT_ARGS)
# The disk image BINARIES_DIR/BOARD.img, with the partition table board/mkimage.py gives
# the board (board/boardlib.py: names, types, sizes, offsets and GUIDs from board.toml):
# the ESP (GRUB as the removable-media loader, grub.cfg choosing the boot slot, grubenv),
# root-a filled with the squashfs (kernel and initramfs in its /boot), root-b empty, and the
# empty data partition that the first boot grows and formats. The slot image alone is
# BINARIES_DIR/BOARD.rootfs.img.
set -eu
binaries=$1
board=$2
repo=$(cd "$(dirname "$0")/../../.." && pwd)
cfg=$("$HOST_DIR/bin/python3" "$repo/board/boardlib.py" image "$board" "$TARGET_DIR" "$binaries")
# Buildroot's wrapper runs genimage with its own temporary folders (post-image scripts
# run from Buildroot's top folder).
support/scripts/genimage.sh -c "$cfg"
(cd "$binaries" && sha256sum "$board.img" > "$board.img.sha256")
echo "post-image: $binaries/$board.img"
