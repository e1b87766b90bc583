# shellcheck shell=bash
# Sourced by setup.sh and bench-setup.sh: installs, with apt-get, only the Debian packages
# that are missing, so that a second run only checks.
#   apt_ensure WHO PACKAGE...   (WHO prefixes the message)
apt_ensure() {
  local who=$1
  shift
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "$who: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
