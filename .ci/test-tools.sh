#!/usr/bin/env bash
# Installs the tools the test suite drives, once; reuses what is there.
#   Debian: prometheus (promtool and the server, started by the tests on loopback only)
#   PyPI, in .venv-test: tritonclient[http], kserve, pytest (tests/python)
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

# Python clients for the protocol tests (tritonclient, kserve, pytest) in a test-only venv,
# reinstalled only when tests/python/requirements.txt changes.
REQ=tests/python/requirements.txt
STAMP=.venv-test/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x .venv-test/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo ">> installing the Python test clients into .venv-test ($REQ)"
  [ -x .venv-test/bin/python ] || "${PYTHON:-python3}" -m venv .venv-test
  .venv-test/bin/python -m pip install --quiet --disable-pip-version-check -r "$REQ"
  echo "$want" > "$STAMP"
fi
