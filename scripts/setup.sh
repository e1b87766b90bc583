#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine for the firmware: the system packages the
# build, the lab and the tests use, then a virtual environment in .venv with the
# firmware installed (which compiles the C fast path through cffi).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential libssl-dev openssl       # the fast path and its build
  clang libclang-rt-14-dev                 # libFuzzer and sanitizers
  iproute2 nftables conntrack iputils-ping # the lab: namespaces, NAT, routers
  iperf3 tcpdump procps
  coturn stun-client                       # STUN interoperability tests
  busybox traceroute                       # console: udhcpc/udhcpd for DHCP WANs, traceroute
  chrony                                   # time sync (lab configs get set_clock = false: -x, never the host clock)
  shellcheck bmap-tools fdisk e2fsprogs    # flash.sh, its lint and its loop-device tests
  xz-utils zstd python3-fusepy
  dbus-daemon grub-common                  # A/B installs on the host: rauc service's private bus, grub-editenv
  qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64  # the appliance image:
  squashfs-tools mtools dosfstools kmod binutils grub-common         # board/mkimage.py and
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross                        # the system tests
  rauc                                     # update bundles: board/mkbundle.py and their checks
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (the lab needs network namespaces; packages need apt-get)" >&2
  exit 1
fi

# shellcheck source=scripts/apt-ensure.sh
. scripts/apt-ensure.sh
apt_ensure setup "${APT_PACKAGES[@]}"

# The aarch64 image is assembled from Debian's arm64 packages (apt-get download pkg:arm64).
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding the arm64 package architecture (for the aarch64 image)"
  dpkg --add-architecture arm64
  apt-get update -q >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native firmware -newer "$stamp" \
      \( -name '*.c' -o -name '*.h' -o -name '*.py' -o -name '*.toml' \) -print -quit)" ]; then
  echo "setup: installing the firmware into .venv (builds the C fast path)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# The lab's control-plane flooder (native/flood/flood.c: tests/lab/test_control_flood.py,
# bench/flood); rebuilt when its source is newer.
.venv/bin/python -c 'from sdwan.lab.flood import build_flooder; build_flooder()'
echo "setup: ready"
