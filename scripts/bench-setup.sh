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

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench-setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "bench-setup: ready"
