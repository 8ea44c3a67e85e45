#!/usr/bin/env bash
# Installs the tools the test suite drives, once; reuses what is there.
#   Debian: prometheus (promtool and the server, started by the tests on loopback only)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo ">> installing ${missing[*]} (Debian packages)"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install prometheus
command -v promtool >/dev/null || { echo "promtool missing after install" >&2; exit 1; }
