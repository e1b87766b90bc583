#!/usr/bin/env bash
# Installs the peer tunnels bench/dataplane measures the socket against (Debian 12
# packages), so `make bench` compares against all of them instead of reporting them
# "not installed". `make bench` runs it after scripts/setup.sh; `make test` does not:
# its smoke run of the benches only measures the tunnels that are present.
# Idempotent: apt-get runs only for what is missing.
set -euo pipefail

APT_PACKAGES=(
  wireguard-go wireguard-tools  # wireguard-go, wg
  openvpn                       # openvpn (the bench makes its keys with openssl)
  nebula                        # nebula, nebula-cert
  fastd
)

if [ "$(id -u)" != 0 ]; then
  echo "bench-setup: run as root (packages need apt-get; the benches need namespaces)" >&2
  exit 1
fi

# shellcheck source=scripts/apt-ensure.sh
. "$(dirname "$0")/apt-ensure.sh"
apt_ensure bench-setup "${APT_PACKAGES[@]}"

echo "bench-setup: ready"
